"""Generation: prefill, then decode with a KV cache; greedy, temperature, top-k and top-p.

Shapes are static so each compiles once: prompts are left-padded to a multiple of `bucket` tokens and the
positions prompt + max_new_tokens are rounded up the same way, so a new prompt length only recompiles when it
crosses a bucket. A whole generation runs in one jitted program of a few `while_loop`s, one per span of cache
positions (`read_spans`: the prompt plus a bucket, then doubling): the cache is grown to each span's end as the
span starts (one copy per span), and each decode step writes one token's keys and values per layer into it in
place and reads all of it (at most twice the positions filled). `stream` runs the same decode step from Python
and yields tokens as they come.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from neox_jax.model import GPTNeoX, cache_length, check_ids, require_lm_head

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 0 (or 1) switch those filters off (GPT-NeoX's defaults). Row r of a
    batch draws with seed + r (`row_keys`)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} (--{name.replace('_', '-')}): must be a finite number")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 is off)")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in [0, 1] (0 is off)")


def filter_logits(logits_bv, top_k, top_p):
    """-inf outside the top-k tokens and outside the smallest set whose probability reaches top_p (the most
    likely token always stays). top_k / top_p may be traced; 0 means off."""
    v = logits_bv.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(-jnp.sort(-logits_bv, axis=-1), jnp.full(logits_bv.shape[:-1] + (1,), k - 1), axis=-1)
    logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    sorted_desc = -jnp.sort(-logits_bv, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
    keep = (above < top_p) | (top_p <= 0) | (top_p >= 1)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)  # the lowest kept logit
    return jnp.where(logits_bv < threshold, -jnp.inf, logits_bv)


def row_keys(seeds_b, counts_b):
    """Each row's sampling key: its seed's key folded with the number of tokens it has drawn, so that a row's draws
    depend on its own seed and progress alone, whatever else shares the batch (serving's continuous batches)."""
    return jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.key(seed), i))(seeds_b, counts_b)


def sample(logits_bv, keys_b, temperature, top_k, top_p):
    """Each row's next token: the most likely where its temperature is 0, else drawn with its own key from its
    tempered, filtered distribution. The knobs are scalars or one per row [b]."""
    logits_bv = logits_bv.astype(F32)
    b = logits_bv.shape[0]
    temperature_b1, top_k_b1, top_p_b1 = (jnp.broadcast_to(x, (b,))[:, None] for x in (temperature, top_k, top_p))
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    drawing_b = temperature_b1[:, 0] > 0

    def draw(filtered: bool):  # the filters sort the vocabulary: only paid for when a drawing row asks for them
        scaled_bv = logits_bv / jnp.maximum(temperature_b1, 1e-6)
        if filtered:
            scaled_bv = filter_logits(scaled_bv, top_k_b1, top_p_b1)
        return jnp.where(drawing_b, jax.vmap(jax.random.categorical)(keys_b, scaled_bv).astype(jnp.int32), greedy_b)

    filters = drawing_b & ((top_k_b1[:, 0] > 0) | ((top_p_b1[:, 0] > 0) & (top_p_b1[:, 0] < 1)))
    return jax.lax.cond(jnp.any(filters), lambda: draw(True),
                        lambda: jax.lax.cond(jnp.any(drawing_b), lambda: draw(False), lambda: greedy_b))


def round_up(n: int, bucket: int) -> int:
    """`n` rounded up to a multiple of `bucket` (at least one bucket): the shapes programs are compiled for."""
    return max(bucket, math.ceil(n / bucket) * bucket)


def read_spans(prompt: int, length: int, bucket: int) -> list[int]:
    """The ends of the spans of cache positions decode steps read: the padded prompt plus one bucket, then doubling
    up to the cache length. A step writing position i reads up to the first end above i."""
    ends = [min(length, prompt + bucket)]
    while ends[-1] < length:
        ends.append(min(length, 2 * ends[-1]))
    return ends


def check_prompts(prompts, vocab_size: int):
    """Prompts are lists of token ids, each an integer in the vocabulary: a ValueError naming the prompt otherwise
    (an id out of range would read another embedding row silently, and a string would be taken for its characters)."""
    if isinstance(prompts, (str, bytes)) or any(isinstance(p, (str, bytes)) for p in prompts):
        raise ValueError("prompts are text: generate() takes token ids (lists of ints); tokenize them first, or call "
                         "generate_text(model, tokenizer, text)")
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.size:  # an empty one is pad_prompts' error
            check_ids(ids.reshape(1, -1) if ids.ndim == 1 else ids, vocab_size, what=f"prompt {i}'s ids")


def pad_prompts(prompts: Sequence[Sequence[int]], bucket: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to a bucketed length: (ids [b, P], mask [b, P])."""
    if not prompts:
        raise ValueError("no prompts given")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: give at least one token")
    width = round_up(max(lengths), bucket)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    return ids, mask


# The compiled functions are module-level, keyed by the model's structure (its graphdef, hashable): every
# Generator of an equally shaped model, `generate()` calls included, reuses them for the same bucketed shapes.


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill(graphdef, params, copies, ids_bp, mask_bs, length: int):
    """The prompt's keys and values in a cache of `length` positions (the first span's), its last logits."""
    model = nnx.merge(graphdef, params)
    b, p = ids_bp.shape
    cache = model.init_cache(b, length, per_layer=copies is not None)
    logits, cache = model(ids_bp, attention_mask=mask_bs, cache=cache, cache_index=0, last_only=True, cache_read=p,
                          **_weights(copies, b))
    return logits[:, -1], cache


def weight_copies(model: GPTNeoX, output_kernel: bool) -> dict:
    """The decode layouts XLA's CPU backend reads fastest (see Generator): each layer's fused weights and, for
    batches of 2 or more rows (`output_kernel`, or made later by `with_output_kernel`), the output kernel transposed."""
    copies = {"layer_weights": model.fused_layers(), "output_kernel_vd": None}
    return with_output_kernel(copies, nnx.state(model)) if output_kernel else copies


def with_output_kernel(copies: dict, params) -> dict:
    """`copies` with the [vocab, embed] output kernel (made once)."""
    if copies["output_kernel_vd"] is None:
        copies["output_kernel_vd"] = params["embed_out"]["kernel"][...].T.copy()
    return copies


def _weights(copies, batch: int) -> dict:
    """The model's keyword arguments for the generator's weight copies at this batch size (one row reads the
    model's own output kernel)."""
    if copies is None:
        return {}
    return dict(copies, output_kernel_vd=copies["output_kernel_vd"] if batch > 1 else None)


def _grow(cache, length: int):
    """The cache with room for `length` positions (the next span's): one copy per span, so that every decode step
    reads its whole cache as it lies, never a slice (which XLA's CPU backend would copy)."""
    grow = length - cache_length(cache)
    return jax.tree.map(lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, grow), (0, 0)]), cache) if grow else cache


_grow_jit = jax.jit(_grow, static_argnums=1)


def _step(graphdef, params, copies, carry, knobs, read: int):
    """Pick the next token from `carry["logits"]`, write it, and run it through the model, attending over the
    cache's first `read` positions."""
    model = nnx.merge(graphdef, params)
    temperature, top_k, top_p, seed, stop_ids = knobs
    i, index = carry["i"], carry["index"]
    b = carry["done"].shape[0]
    assert cache_length(carry["cache"]) == read, "the cache is sized to the span it reads (_grow)"
    # row r of a generation seeded s draws as a one-row generation seeded s + r (and as choice r of serving's request)
    keys_b = row_keys(seed + jnp.arange(b, dtype=seed.dtype), jnp.full((b,), i))
    token = sample(carry["logits"], keys_b, temperature, top_k, top_p)
    token = jnp.where(carry["done"], stop_ids[0], token)
    done = carry["done"] | jnp.isin(token, stop_ids)
    mask = jax.lax.dynamic_update_slice_in_dim(carry["mask"], jnp.ones_like(token)[:, None], index, axis=1)
    logits, cache = model(token[:, None], attention_mask=mask, cache=carry["cache"], cache_index=index,
                          cache_read=read, **_weights(copies, b))
    out = jax.lax.dynamic_update_slice_in_dim(carry["out"], token[:, None], i, axis=1)
    return dict(carry, i=i + 1, index=index + 1, logits=logits[:, -1], cache=cache, mask=mask, done=done, out=out)


# the state is donated: the cache is updated in place, step after step, never copied (inside `_generate`'s loops the
# carry is updated in place without asking)
_decode_step = jax.jit(_step, static_argnums=(0, 5), donate_argnums=3)


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _generate(graphdef, params, copies, state, max_new, knobs, replicated, spans):  # max_new traced: compiled once
    for end in spans:  # one loop per span of the cache, each reading all of a cache grown to its end
        def cond(c, end=end):
            return (c["i"] < max_new) & ~jnp.all(c["done"]) & (c["index"] < end)

        state = dict(state, cache=_grow(state["cache"], end))
        state = jax.lax.while_loop(cond, lambda c, end=end: _step(graphdef, params, copies, c, knobs, end), state)
    out = state["out"], state["i"]
    # weights sharded over a mesh (several processes, say): the new tokens come back replicated, so every process
    # can read them
    return out if replicated is None else jax.lax.with_sharding_constraint(out, replicated)


class Generator:
    """Prefill + decode for one model, compiled once per model shape and bucketed batch shape. `copies`: keep the
    weight copies and per-layer caches laid out for decoding (below); None, the default, keeps them on a CPU in one
    process, where they are measured faster; True elsewhere measures them (the weights twice in memory)."""

    def __init__(self, model: GPTNeoX, copies: bool | None = None):
        require_lm_head(model.config)
        self.graphdef, self.params = nnx.split(model)
        # the model's arrays now (its Variables, shared with `params`, may take others): `generator_for` compares them
        self.leaves = jax.tree.leaves(self.params)
        self.config = model.config
        # XLA's CPU backend copies each layer's slice out of the stacked weights before its matmuls, at every decode
        # step (1.3-1.4x slower at batch 1, measured), streams a few rows through fewer, larger [out, in] kernels
        # faster (`FusedLayer`: pythia-160m batch 1 +20%, batch 16 +14%), and multiplies 2-32 rows by the
        # [vocab, embed] output kernel 1.2-1.8x faster than by the [embed, vocab] one (one row: 0.9-1x, so batch 1
        # keeps the model's): on a CPU in one process the generator keeps such copies (the weights twice in memory
        # while it lives) and per-layer caches; elsewhere the model's own weights and a stacked cache are read.
        if copies is None:
            copies = jax.default_backend() == "cpu" and jax.process_count() == 1
        if copies and jax.process_count() > 1:
            raise ValueError("Generator(copies=True) makes its weight copies in one process: with several processes "
                             "the model's own weights are read (copies=None or False)")
        # the output kernel's: made at the first batch of 2 or more rows
        self.copies = weight_copies(model, output_kernel=False) if copies else None
        sharding = getattr(jax.tree.leaves(self.params)[0], "sharding", None)
        self.replicated = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None

    def step(self, state, knobs, spans):
        """One decode step: the next token of every row written into `state`, its logits computed."""
        index = int(state["index"])
        end = next(end for end in spans if end > index)
        if cache_length(state["cache"]) < end:  # the step entered the next span
            state = dict(state, cache=_grow_jit(state["cache"], end))
        return _decode_step(self.graphdef, self.params, self.copies, state, knobs, end)

    # ---- host ------------------------------------------------------------------------------------------
    def _start(self, prompts, max_new_tokens, bucket, stop_ids, sampling: Sampling):
        cfg = self.config
        check_prompts(prompts, cfg.vocab_size)
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}: shorten the prompt or "
                             "generate fewer tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
        stop = np.asarray(list(stop_ids) or [-1], np.int32)
        ids, prompt_mask = pad_prompts(prompts, bucket, int(stop[0]) if stop[0] >= 0 else 0)
        b, p = ids.shape
        if self.copies is not None and b > 1:
            with_output_kernel(self.copies, self.params)
        length = round_up(p + max_new_tokens, bucket)
        mask = np.zeros((b, length), np.int32)
        mask[:, :p] = prompt_mask
        spans = tuple(read_spans(p, length, bucket))
        logits, cache = _prefill(self.graphdef, self.params, self.copies, jnp.asarray(ids), jnp.asarray(mask),
                                 spans[0])
        state = {"i": jnp.int32(0), "index": jnp.int32(p), "logits": logits, "cache": cache, "mask": jnp.asarray(mask),
                 "done": jnp.zeros((b,), bool), "out": jnp.zeros((b, round_up(max_new_tokens, bucket)), jnp.int32)}
        knobs = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p),
                 jnp.uint32(sampling.seed), jnp.asarray(stop))
        return state, knobs, spans

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), bucket: int = 64) -> list[list[int]]:
        state, knobs, spans = self._start(prompts, max_new_tokens, bucket, stop_ids, sampling)
        out, n = _generate(self.graphdef, self.params, self.copies, state, jnp.int32(max_new_tokens), knobs,
                           self.replicated, spans)
        out = np.asarray(out)[:, :int(n)]
        return [_cut(row, stop_ids) for row in out]

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_ids: Sequence[int] = (), bucket: int = 64) -> Iterator[np.ndarray]:
        """The next token of every row [b] as it is produced (rows that stopped repeat a stop id), as an iterator;
        bad prompts and settings are refused, and the prompt is prefilled, when this is called, not at the first
        token."""
        state, knobs, spans = self._start(prompts, max_new_tokens, bucket, stop_ids, sampling)
        return self._tokens(state, knobs, spans, max_new_tokens)

    def _tokens(self, state, knobs, spans, max_new_tokens: int) -> Iterator[np.ndarray]:
        for _ in range(max_new_tokens):
            state = self.step(state, knobs, spans)
            yield np.asarray(state["out"][:, int(state["i"]) - 1])
            if bool(jnp.all(state["done"])):
                return


def _cut(row: np.ndarray, stop_ids: Sequence[int]) -> list[int]:
    """Tokens up to and including the first stop token."""
    out = []
    for t in row.tolist():
        out.append(t)
        if t in stop_ids:
            break
    return out


_GENERATORS: "weakref.WeakKeyDictionary[GPTNeoX, Generator]" = weakref.WeakKeyDictionary()


def generator_for(model: GPTNeoX) -> Generator:
    """The model's Generator, kept with the model and reused while its weights are the same arrays (its CPU weight
    copies take 35-400 ms to make for pythia-70m/-160m, up to 10% of a 128-token generation); a model whose weights
    were replaced (trained, loaded) gets a new one."""
    gen = _GENERATORS.get(model)
    leaves = jax.tree.leaves(nnx.state(model))
    held = [] if gen is None else gen.leaves
    if len(held) != len(leaves) or any(a is not b for a, b in zip(held, leaves)):
        gen = _GENERATORS[model] = Generator(model)
    return gen


def generate(model: GPTNeoX, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 0.0, seed: int = 0,
             stop_ids: Sequence[int] = (), bucket: int = 64) -> list[list[int]]:
    """New tokens for each prompt (token lists of any lengths), stopping after a stop id or max_new_tokens."""
    check_prompts(prompts, model.config.vocab_size)  # before the generator builds its weight copies
    return generator_for(model)(prompts, max_new_tokens, Sampling(temperature, top_k, top_p, seed), stop_ids, bucket)


def generate_text(model: GPTNeoX, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 64, *,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 0.0, seed: int = 0,
                  bucket: int = 64) -> str | list[str]:
    """Text in, text out: each prompt's continuation, stopped at the tokenizer's end-of-document token (not
    included). `tokenizer` is a path or a NeoXTokenizer; a single prompt gives a single string."""
    from neox_jax.data.tokenizer import NeoXTokenizer
    from neox_jax.pretrained import check_vocab

    tok = tokenizer if isinstance(tokenizer, NeoXTokenizer) else NeoXTokenizer(tokenizer)
    check_vocab(tok, model.config, "tokenizer")
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    new = generate(model, [tok.encode(t) for t in texts], max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, stop_ids=[tok.eod_id], bucket=bucket)
    out = [tok.decode([t for t in row if t != tok.eod_id]) for row in new]
    return out[0] if isinstance(prompts, str) else out
