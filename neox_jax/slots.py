"""The KV-cache slots' device programs, serving's (batching.py holds the host side that runs them).

Pure functions of (weights, state), each jitted per shape bucket. The state is every slot's KV cache (the model's
stacked [layers, slots, heads, S, h] or the CPU's per-layer [slots * heads, S, h]) and next-token logits
[slots, vocab]. `prefill` writes a chunk of one prompt into its slot at scalar positions; `decode` runs the first b
slots (a row bucket) one token each, every row at its own position (attention's per-row `cache_index`: a scatter)
and drawing with its own key and knobs (`generation.row_keys`); a row given the position past the cache's end is not
written. `resize` grows or cuts the positions held; `fork` copies a slot (a request's other choices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from neox_jax.generation import _weights, row_keys, sample
from neox_jax.model import cache_length

TOP_LOGPROBS = 5  # the most alternatives a token's log-probabilities list (OpenAI's completions cap)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def init_state(graphdef, params, slots: int, length: int, per_layer: bool):
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(slots, length, per_layer=per_layer)
    return {"cache": cache, "logits": jnp.zeros((slots, model.config.vocab_size), jnp.float32)}


@functools.partial(jax.jit, static_argnums=1)  # a new shape: nothing to donate to
def resize(state, length: int):
    """The cache holding `length` positions: padded, or cut to its first `length`."""
    def resize(x):
        have = x.shape[-2]
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, length - have), (0, 0)]) if length > have else \
            x[..., :length, :]
    return dict(state, cache=jax.tree.map(resize, state["cache"]))


def row_slice(cache, slot, heads: int, row=None):
    """One slot's cache (batch 1) out of the state's, or, given `row` (such a cache), the state's with it written in."""
    def one(x, new=None):
        per_layer = x.ndim == 3  # [slots * heads, S, h], else [layers, slots, heads, S, h]
        start = (slot * heads, 0, 0) if per_layer else (0, slot, 0, 0, 0)
        size = (heads,) + x.shape[1:] if per_layer else x.shape[:1] + (1,) + x.shape[2:]
        return jax.lax.dynamic_slice(x, start, size) if new is None else jax.lax.dynamic_update_slice(x, new, start)
    return jax.tree.map(one, cache) if row is None else jax.tree.map(one, cache, row)


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnums=3)
def prefill(graphdef, params, copies, state, slot, ids_c, start, last, scores: bool, next_ids_c=None):
    """Prompt tokens `ids_c` at positions start .. start + c of `slot`'s cache; the slot's logits become those after
    the chunk's token `last`. `scores`: also each position's log-probability of the next prompt token
    (`next_ids_c`) and its TOP_LOGPROBS alternatives (echo)."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    c = ids_c.shape[0]
    row = row_slice(state["cache"], slot, cfg.num_heads)
    s = cache_length(row)
    positions_1c = (start + jnp.arange(c))[None]
    mask_1cs = (jnp.arange(s)[None, None] <= positions_1c[..., None])
    weights = _weights(copies, 1)
    x_1cd, row = model.apply_layers(model.embed(ids_c[None]), positions_1c, mask_1cs, row, start,
                                    weights.get("layer_weights"))
    cache = row_slice(state["cache"], slot, cfg.num_heads, row=row)
    if scores:
        logits_cv = model.logits(x_1cd)[0]
        logits_v = jax.lax.dynamic_index_in_dim(logits_cv, last, keepdims=False)
        out = logprobs(logits_cv, next_ids_c)
    else:
        logits_v = model.logits(jax.lax.dynamic_slice_in_dim(x_1cd, last, 1, axis=1))[0, 0]
        out = None
    return {"cache": cache, "logits": state["logits"].at[slot].set(logits_v)}, out


def logprobs(logits_bv, token_b):
    """(log-probability of `token_b`, the TOP_LOGPROBS most likely ids, their log-probabilities), the model's own
    distribution (before temperature and filters, as OpenAI reports them)."""
    logp_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp_bv, TOP_LOGPROBS)
    return jnp.take_along_axis(logp_bv, token_b[:, None], axis=-1)[:, 0], top_ids, top_lp


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def fork(state, src, dst, heads: int):
    """Slot `dst` a copy of slot `src`: a request's other choices share its prefill."""
    row = row_slice(state["cache"], src, heads)
    return {"cache": row_slice(state["cache"], dst, heads, row=row),
            "logits": state["logits"].at[dst].set(state["logits"][src])}


def first_rows(cache, rows: int, heads: int):
    """The first `rows` slots' caches (the rows a decode step of that bucket reads and writes)."""
    return jax.tree.map(lambda x: x[:rows * heads] if x.ndim == 3 else x[:, :rows], cache)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def decode(graphdef, params, copies, state, rows):
    """A step of the first b slots (b = the length of `rows`' arrays, a bucket holding every decoding row): each
    row's next token drawn from its logits, written at its position `rows["pos"]` (past the cache's end: not
    written), and its next logits. -> (state, (tokens, their log-probs, top ids, top log-probs)), the scores computed
    only when a row asks for them (`rows["logprobs"]`; the vocabulary's softmax at every step otherwise)."""
    model = nnx.merge(graphdef, params)
    b = rows["pos"].shape[0]
    whole = b == state["logits"].shape[0]
    logits_bv = state["logits"][:b]
    token_b = sample(logits_bv, row_keys(rows["seed"], rows["count"]), rows["temperature"], rows["top_k"],
                     rows["top_p"])
    scores = jax.lax.cond(jnp.any(rows["logprobs"]), lambda: logprobs(logits_bv, token_b),
                          lambda: (jnp.zeros((b,)), jnp.zeros((b, TOP_LOGPROBS), jnp.int32),
                                   jnp.zeros((b, TOP_LOGPROBS))))
    pos_b = rows["pos"]
    cache = state["cache"] if whole else first_rows(state["cache"], b, model.config.num_heads)
    mask_b1s = (jnp.arange(cache_length(cache))[None] <= pos_b[:, None])[:, None]
    weights = _weights(copies, b)
    x_b1d, cache = model.apply_layers(model.embed(token_b[:, None]), pos_b[:, None], mask_b1s, cache, pos_b,
                                      weights.get("layer_weights"))
    logits_bv = model.logits(x_b1d, weights.get("output_kernel_vd"))[:, 0]
    if not whole:  # written back in place (the state is donated)
        cache = jax.tree.map(lambda x, part: jax.lax.dynamic_update_slice(x, part, (0,) * x.ndim), state["cache"],
                             cache)
        logits_bv = state["logits"].at[:b].set(logits_bv)
    return {"cache": cache, "logits": logits_bv}, (token_b, *scores)
