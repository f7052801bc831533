"""Attention: GPT-NeoX's rotary embedding, softmax attention with fp32 scores (the einsum every backend is checked
against), JAX's `dot_product_attention` (cuDNN's fused kernel on a GPU) or causal attention by query blocks (the
CPU's) by the `attention` setting, and the KV cache's writes and reads in a decode step. Shape suffixes as in
model.py; g is batch x heads in one axis.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from neox_jax import matmul
from neox_jax.dropout import ATTENTION_PROBS, dropout, head_keys

F32 = jnp.float32
CAUSAL_BLOCK = 128  # queries per block of `causal_blocks`: the fastest of 64 / 128 / 256 / 512 on the CPU at t = 512


def rotary_cos_sin(positions_bt, rotary_ndims: int, base: float):
    """fp32 cos/sin [b, t, r] of GPT-NeoX's rotary (inv_freq over the rotary dims only)."""
    inv_freq_r2 = 1.0 / base ** (jnp.arange(0, rotary_ndims, 2, dtype=F32) / rotary_ndims)
    freqs = positions_bt.astype(F32)[..., None] * inv_freq_r2
    emb_btr = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb_btr), jnp.sin(emb_btr)


def apply_rotary(x_btnh, cos_btr, sin_btr):
    """rotate_half convention (`cat(-x2, x1)`) on the first r dims of each head; the rest pass through."""
    r = cos_btr.shape[-1]
    x_rot, x_pass = x_btnh[..., :r].astype(F32), x_btnh[..., r:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    cos, sin = cos_btr[:, :, None, :], sin_btr[:, :, None, :]
    rotated = x_rot * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return jnp.concatenate([rotated.astype(x_btnh.dtype), x_pass], axis=-1)


def attend(q_btnh, k, v, mask_bts=None, kv_layout: str = "bsnh", drop=None):
    """Softmax attention with fp32 scores, the reference every backend is checked against; `mask_bts` is True where
    query t may see key s (None: causal, t == s). Keys and values are [b, s, n, h], or [b, n, s, h] (the KV cache's
    layout) with kv_layout="bnsh". `drop`: (attention_dropout, the layer's keys per row) drops probabilities."""
    return _attend(q_btnh, k, v, None if mask_bts is None else mask_bts[:, None], f"btnh,{kv_layout}->bnts",
                   f"bnts,{kv_layout}->btnh", drop)


def _attend(q, k, v, mask, scores_spec: str, out_spec: str, drop=None):
    """`attend` for any layout, given by the einsum specs of the scores ("...ts") and of the output; `mask` is
    broadcast against the scores (None: causal)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum(scores_spec, q, k, preferred_element_type=F32) * scale
    if mask is None:
        mask = jnp.tril(jnp.ones(scores.shape[-2:], bool))
    # finfo.min, not -inf: a query that may see nothing (a pad position) gets a uniform row, not NaN.
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(F32).min), axis=-1)
    if drop is not None:  # probabilities [b, n, t, s]: a mask per row and head
        rate, keys_b = drop
        probs = dropout(probs, rate, head_keys(keys_b, probs.shape[1]), ATTENTION_PROBS)
    return jnp.einsum(out_spec, probs.astype(v.dtype), v)


def causal_blocks(q_btnh, k_btnh, v_btnh, block: int = CAUSAL_BLOCK):
    """Causal attention by blocks of `block` queries, each scored against the keys up to its last query only (with
    4 blocks, 3/8 of the scores are never computed), with a backward that recomputes each block's probabilities
    from the forward's saved row log-sum-exps instead of keeping [b, n, t, t] ones: `auto`'s training attention on a
    CPU, where XLA has no fused kernel. The same fp32 scores and softmax as `attend`, the probabilities cast to the
    compute dtype for the product with the values."""
    heads_first = lambda x: x.swapaxes(1, 2)  # noqa: E731  [b, n, t, h]: every product below reads rows as they lie
    return heads_first(_causal_blocks(*map(heads_first, (q_btnh, k_btnh, v_btnh)), block))


def _spans(t: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _block_scores(q_bnth, k_bnsh, start: int, end: int):
    """Queries start..end against keys 0..end: fp32 scaled scores [b, n, end - start, end], -inf where masked."""
    scores = jnp.einsum("bnth,bnsh->bnts", q_bnth[:, :, start:end], k_bnsh[:, :, :end], preferred_element_type=F32)
    visible_ts = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    return jnp.where(visible_ts, scores * (1.0 / math.sqrt(q_bnth.shape[-1])), -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_blocks(q_bnth, k_bnsh, v_bnsh, block: int):
    return _causal_blocks_fwd(q_bnth, k_bnsh, v_bnsh, block)[0]


def _causal_blocks_fwd(q_bnth, k_bnsh, v_bnsh, block: int):
    outs, lses = [], []
    for start, end in _spans(q_bnth.shape[2], block):
        scores = _block_scores(q_bnth, k_bnsh, start, end)
        top = scores.max(-1, keepdims=True)  # finite: a query always sees itself
        exp = jnp.exp(scores - top)
        total = exp.sum(-1, keepdims=True)
        outs.append(jnp.einsum("bnts,bnsh->bnth", (exp / total).astype(v_bnsh.dtype), v_bnsh[:, :, :end]))
        lses.append(top + jnp.log(total))
    out_bnth = jnp.concatenate(outs, axis=2)
    return out_bnth, (q_bnth, k_bnsh, v_bnsh, out_bnth, jnp.concatenate(lses, axis=2))


def _causal_blocks_bwd(block: int, residuals, g_bnth):
    """Softmax attention's backward block by block: dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K and
    dK = dS^T Q (scale folded into dS); a block's dK and dV land on the keys it saw."""
    q, k, v, out, lse_bnt1 = residuals
    scale = 1.0 / math.sqrt(q.shape[-1])
    delta_bnt1 = jnp.einsum("bnth,bnth->bnt", g_bnth, out, preferred_element_type=F32)[..., None]
    dq, dk, dv = [], jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32)
    for start, end in _spans(q.shape[2], block):
        probs = jnp.exp(_block_scores(q, k, start, end) - lse_bnt1[:, :, start:end])
        g = g_bnth[:, :, start:end]
        dv = dv.at[:, :, :end].add(jnp.einsum("bnts,bnth->bnsh", probs.astype(g.dtype), g, preferred_element_type=F32))
        dprobs = jnp.einsum("bnth,bnsh->bnts", g, v[:, :, :end], preferred_element_type=F32)
        dscores = (probs * (dprobs - delta_bnt1[:, :, start:end]) * scale).astype(q.dtype)
        dq.append(jnp.einsum("bnts,bnsh->bnth", dscores, k[:, :, :end], preferred_element_type=F32))
        dk = dk.at[:, :, :end].add(jnp.einsum("bnts,bnth->bnsh", dscores, q[:, :, start:end],
                                              preferred_element_type=F32))
    return jnp.concatenate(dq, axis=2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_causal_blocks.defvjp(_causal_blocks_fwd, _causal_blocks_bwd)


def attention_backend(setting: str, dtype, head_dim: int, causal: bool, dropping: bool = False) -> str:
    """The backend `attention: auto | xla | cudnn` runs in the program being traced (`matmul.platform()`: the
    mesh's devices, not the process's backend): "einsum" (`attend`), "blocks" (`causal_blocks`), "xla" or "cudnn"
    (JAX's `dot_product_attention`). cuDNN's fused kernel takes bf16/fp16 on a GPU with heads of at most 128 in
    multiples of 8 (the 20B's 96 included); `auto` uses it there for causal calls without a mask (training, a
    forward without a cache), `causal_blocks` for those in a CPU's program (not the planner's GPU programs compiled
    on CPU devices: `matmul.as_on_gpu`), and the einsum elsewhere (padded batches and calls with a KV cache through
    cuDNN are not yet checked on a GPU; pythia-1b's heads of 256 are beyond the kernel). An impossible `cudnn` is
    refused while tracing. `dropping` (attention dropout in training): only the einsum drops probabilities; JAX's
    kernels cannot (`xla` and `cudnn` are refused with attention_dropout > 0 in NeoXConfig)."""
    if dropping:
        return "einsum"
    gpu = matmul.platform() == "gpu"
    fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0
    if setting == "auto":
        if gpu and fits and causal:
            return "cudnn"
        return "blocks" if causal and matmul.cpu_program() else "einsum"
    if setting == "cudnn" and not (gpu and fits):
        from neox_jax.errors import ConfigError

        why = (f"this program is compiled for {matmul.platform()} devices" if not gpu else
               f"it takes bf16/fp16 with head_dim <= 128 in multiples of 8 (here {jnp.dtype(dtype).name}, head_dim "
               f"{head_dim})")
        raise ConfigError(f"attention='cudnn': cuDNN's fused attention needs an NVIDIA GPU and {why}: use attention "
                          "auto or xla, or precision bf16")
    return setting


def dot_product_attention(q_btnh, k, v, mask_bts, setting: str, kv_layout: str = "bsnh", drop=None):
    """Attention by the `attention` setting; `mask_bts` None is causal. `drop`: (rate, keys per row) or None."""
    dropping = drop is not None and drop[1] is not None and drop[0] > 0
    backend = attention_backend(setting, q_btnh.dtype, q_btnh.shape[-1], causal=mask_bts is None, dropping=dropping)
    if backend == "einsum":
        return attend(q_btnh, k, v, mask_bts, kv_layout, drop if dropping else None)
    if backend == "blocks":  # causal, so no cache: [b, s, n, h]
        return causal_blocks(q_btnh, k, v)
    if kv_layout == "bnsh":  # JAX's kernels take [b, s, n, h]
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    mask = None if mask_bts is None else mask_bts[:, None]

    def kernel(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask_bts is None, implementation=backend)

    return per_shard(kernel, q_btnh, k, v, mask) if backend == "cudnn" else kernel(q_btnh, k, v, mask)


def per_shard(kernel, q_btnh, k_bsnh, v_bsnh, mask_b1ts=None):
    """`kernel(q, k, v, mask)` on each device's shard of batch (over `data`) and heads (over `tensor`), inside a
    `shard_map` manual over every mesh axis not manual already, so XLA partitions nothing in it. cuDNN's custom call
    brings a partitioning rule of its own, which fails inside our `shard_map`s (the step's over `data`, the
    pipeline's over `pipe`) and under tensor parallelism; attention needs no communication once batch and heads are
    split, so the kernel sees whole sequences of whole heads and the rule never runs. A dimension its mesh axes do
    not divide (a batch of 1 on `data`) stays whole on every device. Without a mesh: the kernel as it is.

    The region (`sharding.manual`: its gradient a custom VJP) must compute nothing from constants alone (cuDNN's
    kernel does not; an einsum's iota mask would): in a scan's backward JAX hoists such loop-invariant work out of
    the loop, splitting the region, and JAX 0.10.2 gives the split's residuals a spec naming the enclosing
    `shard_map`'s axes (the fault `sharding.manual` avoids), which does not lower."""
    from neox_jax import sharding as shd

    mesh = jax.sharding.get_abstract_mesh()
    auto = {} if mesh.empty else {a: n for a, n in zip(mesh.axis_names, mesh.axis_sizes)
                                  if a not in shd.manual_axes()}
    if not auto:
        return kernel(q_btnh, k_bsnh, v_bsnh, mask_b1ts)
    names = shd.logical_to_spec(("batch", "length", "heads", "head_dim"))
    spec = P(*(a if a in auto and d % auto[a] == 0 else None for a, d in zip(names, q_btnh.shape)))
    axes = tuple(a for a in mesh.axis_names if a in auto)
    # the residuals (cuDNN's softmax statistics, not recomputed) vary over the axes that split q, k and v
    region = shd.manual(lambda qkv, mask: kernel(*qkv, mask), (spec, spec, spec),
                        None if mask_b1ts is None else P(spec[0]), spec, axes, tuple(a for a in axes if a in spec))
    return region((q_btnh, k_bsnh, v_bsnh), mask_b1ts)


def attend_qkv(qkv_btnkh, cos_btr, sin_btr, mask_bts, backend: str, cache=None, cache_index=None, drop=None):
    """Attention of the fused QKV projection's output, rotary applied -> (out [b, t, n, h], cache). `mask_bts` None
    is causal attention over this call's tokens. With a KV cache, `cache` = (the stacked {k, v} [layers, b, n, S, h],
    this layer's index), or (this layer's own {k, v} [b * n, S, h], None): this call's keys and values are written at
    `cache_index` (one token's per layer in a decode step; a [b] vector: each row at its own) and the queries attend
    over the cache's first `mask_bts.shape[-1]` positions, all that is read of it. `drop`: (attention_dropout, keys
    per row), training's."""
    q, k, v = qkv_btnkh[:, :, :, 0], qkv_btnkh[:, :, :, 1], qkv_btnkh[:, :, :, 2]
    q, k = apply_rotary(q, cos_btr, sin_btr), apply_rotary(k, cos_btr, sin_btr)
    if cache is None:
        return dot_product_attention(q, k, v, mask_bts, backend, drop=drop), None
    cache, layer = cache
    if layer is None:
        return _attend_layer_cache(q, k, v, mask_bts, backend, cache, cache_index)
    b, t, n, h = q.shape
    read = mask_bts.shape[-1]
    if jnp.ndim(cache_index):  # each row at its own position (serving's slots): [b, t] scattered into [b, n, S]
        rows_bt, pos_bt = _row_positions(cache_index, b, t)
        cache = {name: cache[name].at[layer, rows_bt, :, pos_bt].set(new.astype(cache[name].dtype), mode="drop",
                                                                     unique_indices=True)
                 for name, new in (("k", k), ("v", v))}
    else:
        cache = {name: jax.lax.dynamic_update_slice(
            cache[name], new.swapaxes(1, 2)[None].astype(cache[name].dtype), (layer, 0, 0, cache_index, 0))
            for name, new in (("k", k), ("v", v))}
    k, v = (jax.lax.dynamic_slice(cache[name], (layer, 0, 0, 0, 0), (1, b, n, read, h))[0] for name in "kv")
    return dot_product_attention(q, k, v, mask_bts, backend, kv_layout="bnsh"), cache


def _attend_layer_cache(q_btnh, k_btnh, v_btnh, mask_bts, backend, cache, cache_index):
    """`attend_qkv` with a layer's own cache {k, v} [b * n, S, h]. With batch and heads in one axis XLA's CPU backend
    updates it in place and reads it as it lies at any batch size; a [1, n, S, h] cache (batch 1) was copied four
    times per layer and step in a generation's loop (its size-1 axis dropped for the products, and the update
    duplicated for that view): 3 of pythia-160m's 25 ms per token. The generator sizes the cache to the span it reads,
    so the read of all of it is no copy."""
    b, t, n, h = q_btnh.shape
    read = mask_bts.shape[-1]
    groups = lambda x: x.swapaxes(1, 2).reshape(b * n, t, h)  # noqa: E731
    if jnp.ndim(cache_index):
        rows_bt, pos_bt = _row_positions(cache_index, b, t)
        group_btn = rows_bt[..., None] * n + jnp.arange(n)
        pos_btn = jnp.broadcast_to(pos_bt[..., None], group_btn.shape)
        cache = {name: cache[name].at[group_btn, pos_btn].set(new.astype(cache[name].dtype), mode="drop",
                                                              unique_indices=True)
                 for name, new in (("k", k_btnh), ("v", v_btnh))}
    else:
        cache = {name: jax.lax.dynamic_update_slice(cache[name], groups(new).astype(cache[name].dtype),
                                                    (0, cache_index, 0))
                 for name, new in (("k", k_btnh), ("v", v_btnh))}
    k_gsh, v_gsh = (jax.lax.dynamic_slice(cache[name], (0, 0, 0), (b * n, read, h)) for name in "kv")
    if attention_backend(backend, q_btnh.dtype, h, causal=False) != "einsum":
        k, v = (x.reshape(b, n, read, h) for x in (k_gsh, v_gsh))
        return dot_product_attention(q_btnh, k, v, mask_bts, backend, kv_layout="bnsh"), cache
    mask_gts = jnp.broadcast_to(mask_bts[:, None], (b, n, t, read)).reshape(b * n, t, read)
    out_gth = _attend(groups(q_btnh), k_gsh, v_gsh, mask_gts, "gth,gsh->gts", "gts,gsh->gth")
    return out_gth.reshape(b, n, t, h).swapaxes(1, 2), cache


def _row_positions(index_b, b: int, t: int):
    """(row [b, t], cache position [b, t]) of t tokens written from each row's own `index_b`; a position past the
    cache's end is not written (`mode="drop"`: how serving leaves a slot's cache alone while it is not decoding)."""
    pos_bt = jnp.asarray(index_b, jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)
    return jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t)), pos_bt
