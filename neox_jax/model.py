"""The GPT-NeoX model in Flax NNX: the exact math of GPT-NeoX and Hugging Face `GPTNeoXForCausalLM`.

Shape suffixes: b batch, t query length, s key length, d hidden (embed), n heads, h head_dim,
f intermediate (mlp), v vocab, r rotary dims, l layers.

Parameters are stored in `param_dtype` and cast to the compute `dtype` where they are used; LayerNorm,
rotary angles and the softmax run in fp32 whatever the compute dtype (Pythia overflows in fp16
otherwise). Every parameter carries logical axis names (`out_sharding` metadata) that
`neox_jax.sharding` maps onto the mesh; the model never names a mesh axis.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from neox_jax import matmul, sequence_parallel
from neox_jax.attention import attend_qkv, rotary_cos_sin
from neox_jax.config import NeoXConfig
from neox_jax.dropout import ATTENTION_OUT, MLP_OUT, dropout, fold
from neox_jax.errors import ConfigError
from neox_jax.sharding import constrain

F32 = jnp.float32
PROJECTED = "projected"  # the column-parallel projections' outputs: what `remat_policy: selective` keeps


def init_scale(method: str, cfg: NeoXConfig) -> float:
    """The standard deviation of a weight initialised by `method` (GPT-NeoX's init functions)."""
    h, layers = cfg.hidden_size, cfg.num_layers
    return {
        "small_init": math.sqrt(2 / (5 * h)),  # "Transformers without Tears"
        "wang_init": 2 / layers / math.sqrt(h),
        "normal": cfg.init_std,
        "scaled_normal": cfg.init_std / math.sqrt(2 * layers),
    }[method]


def _param(rngs: nnx.Rngs | None, std: float | str, shape, axes, cfg: NeoXConfig) -> nnx.Param:
    """A parameter of `shape` with logical `axes`: N(0, std), or "zeros" / "ones"."""
    dtype = jnp.dtype(cfg.param_dtype)
    if std == "zeros":
        value = jnp.zeros(shape, dtype)
    elif std == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class LayerNorm(nnx.Module):
    def __init__(self, cfg: NeoXConfig):
        self.eps = cfg.layer_norm_eps
        self.scale = _param(None, "ones", (cfg.hidden_size,), ("embed",), cfg)
        self.bias = _param(None, "zeros", (cfg.hidden_size,), ("embed",), cfg)

    def __call__(self, x_btd):
        y = normalize(x_btd, self.eps)
        return (y * self.scale[...].astype(F32) + self.bias[...].astype(F32)).astype(x_btd.dtype)


def normalize(x_btd, eps: float):
    """LayerNorm before its scale and bias, in fp32: (x - mean) / sqrt(var + eps) over the last axis."""
    x = x_btd.astype(F32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class Dense(nnx.Module):
    """A projection written as an einsum over named kernel axes, with an optional bias; below fp32 the products are
    `matmul.einsum`'s (fast on XLA's CPU backend)."""

    def __init__(self, rngs, cfg, std, kernel_shape, kernel_axes, bias_shape=None, bias_axes=None):
        self.kernel = _param(rngs, std, kernel_shape, kernel_axes, cfg)
        self.bias = _param(None, "zeros", bias_shape, bias_axes, cfg) if bias_shape else None

    def __call__(self, spec: str, x):
        y = matmul.einsum(spec, x, self.kernel[...].astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)

    def flat(self, x, k: int):
        """The einsum over `x`'s last `k` axes and the kernel's first `k`, as one matrix product of both flattened
        (the attention's output projection: written as "btnh,nhd", XLA's CPU backend copied the kernel into another
        layout at every decode step)."""
        kernel = self.kernel[...].astype(x.dtype)
        lead, rest = "abcdefg"[:x.ndim - k], "uvwxyz"[:kernel.ndim - k]
        y = matmul.einsum(f"{lead}k,k{rest}->{lead}{rest}", x.reshape(x.shape[:-k] + (-1,)),
                          kernel.reshape(-1, *kernel.shape[k:]))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, cfg: NeoXConfig, rngs: nnx.Rngs):
        self.embedding = _param(rngs, init_scale(cfg.init_method, cfg), (cfg.vocab_size, cfg.hidden_size),
                                ("vocab", "embed"), cfg)


class Attention(nnx.Module):
    def __init__(self, cfg: NeoXConfig, rngs: nnx.Rngs):
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.rotary_ndims, self.rotary_base, self.backend = cfg.rotary_ndims, cfg.rotary_base, cfg.attention
        self.dropout = cfg.attention_dropout
        # Fused QKV with NeoX's per-head [heads, 3, head_dim] output layout: a tensor-parallel shard of
        # `heads` holds whole heads with their q, k and v.
        self.query_key_value = Dense(rngs, cfg, init_scale(cfg.init_method, cfg), (d, n, 3, h),
                                     ("embed", "heads", "qkv", "head_dim"), (n, 3, h), ("heads", "qkv", "head_dim"))
        self.dense = Dense(rngs, cfg, init_scale(cfg.output_layer_init_method, cfg), (n, h, d),
                           ("heads", "head_dim", "embed"), (d,), ("embed",))

    def __call__(self, x_btd, cos_btr, sin_btr, mask_bts, cache=None, cache_index=None, keys_b=None):
        qkv_btnkh = checkpoint_name(self.query_key_value("btd,dnkh->btnkh", x_btd), PROJECTED)
        out_btnh, cache = attend_qkv(qkv_btnkh, cos_btr, sin_btr, mask_bts, self.backend, cache, cache_index,
                                     (self.dropout, keys_b))
        return self.dense.flat(out_btnh, 2), cache


class MLP(nnx.Module):
    def __init__(self, cfg: NeoXConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.approximate = cfg.activation == "gelu_fast"
        self.dense_h_to_4h = Dense(rngs, cfg, init_scale(cfg.init_method, cfg), (d, f), ("embed", "mlp"), (f,),
                                   ("mlp",))
        self.dense_4h_to_h = Dense(rngs, cfg, init_scale(cfg.output_layer_init_method, cfg), (f, d), ("mlp", "embed"),
                                   (d,), ("embed",))

    def __call__(self, x_btd):
        h_btf = jax.nn.gelu(checkpoint_name(self.dense_h_to_4h("btd,df->btf", x_btd), PROJECTED),
                            approximate=self.approximate)
        return self.dense_4h_to_h("btf,fd->btd", h_btf)


class Block(nnx.Module):
    """One NeoX layer: two independent LayerNorms, parallel or sequential residual."""

    def __init__(self, cfg: NeoXConfig, rngs: nnx.Rngs):
        self.parallel, self.dropout = cfg.use_parallel_residual, cfg.hidden_dropout
        self.input_layernorm = LayerNorm(cfg)
        self.post_attention_layernorm = LayerNorm(cfg)
        self.attention = Attention(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_btd, cos_btr, sin_btr, mask_bts, cache=None, cache_index=None, keys_b=None, normalized=None,
                 scatter=None):
        """`keys_b`: this layer's dropout keys per row (dropout.py), None for none. `normalized` and `scatter`
        (sequence parallelism's region: neox_jax/sequence_parallel.py): `normalized(norms, x)` each LayerNorm of
        `x` over the whole sequence of a sequence-split x, and `scatter` the sum of the devices' partial branch
        outputs split along the sequence; by default the sequence is whole."""
        normalized = normalized or (lambda norms, v: tuple(norm(v) for norm in norms))
        scatter = scatter or (lambda v: v)

        def attention(h_btd):
            out_btd, new_cache = self.attention(h_btd, cos_btr, sin_btr, mask_bts, cache, cache_index, keys_b)
            return dropout(out_btd, self.dropout, keys_b, ATTENTION_OUT), new_cache

        def mlp(h_btd):
            return dropout(self.mlp(h_btd), self.dropout, keys_b, MLP_OUT)

        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if self.parallel:  # x + (attn(ln1(x)) + mlp(ln2(x))): one scatter of the branches' sum
            h1_btd, h2_btd = normalized((ln1, ln2), x_btd)
            attn_btd, cache = attention(h1_btd)
            return x_btd + scatter(attn_btd + mlp(h2_btd)), cache
        attn_btd, cache = attention(*normalized((ln1,), x_btd))
        h_btd = x_btd + scatter(attn_btd)
        return h_btd + scatter(mlp(*normalized((ln2,), h_btd))), cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FusedLayer:
    """One parallel-residual layer's weights laid out for decoding, where each step reads every weight once and the
    matrix products' count and shapes set the time. Each LayerNorm's scale and bias are folded into the projections
    it feeds (ln(x) @ W + c = norm(x) @ (scale * W) + (bias @ W + c)), so the QKV projection and the MLP's first one
    are one product of the normalized input; the attention's output projection and the MLP's second, which the
    parallel residual adds, are one product of [attention output | gelu]. Kernels are [out, in]: XLA's CPU backend
    streams a few rows through them about 1.2x faster than through [in, out] ones. A 12-layer pythia-160m-shaped
    chain of products at batch 1 took 23 ms as the model's four per layer, 16 ms as these two. The same math as
    `Block` up to rounding (the folded kernels are rounded once to the compute dtype)."""

    in_kernel_od: jax.Array  # [n * 3 * h + f, d]: QKV (NeoX's [n, 3, h] order), then the MLP's first projection
    in_bias_o: jax.Array
    out_kernel_do: jax.Array  # [d, n * h + f]: the attention's output projection, then the MLP's second one
    out_bias_d: jax.Array

    @classmethod
    def of(cls, block: Block, dtype) -> "FusedLayer":
        assert block.parallel, "the sequential residual's second LayerNorm reads the attention's output"
        f32 = lambda w: w[...].astype(F32)  # noqa: E731
        attention, mlp = block.attention, block.mlp
        folded = [(ln, f32(dense.kernel).reshape(ln.scale.shape + (-1,)), f32(dense.bias).reshape(-1))
                  for ln, dense in ((block.input_layernorm, attention.query_key_value),
                                    (block.post_attention_layernorm, mlp.dense_h_to_4h))]
        in_kernel_do = jnp.concatenate([f32(ln.scale)[:, None] * w for ln, w, _ in folded], axis=1)
        in_bias_o = jnp.concatenate([f32(ln.bias) @ w + bias for ln, w, bias in folded])
        dense_od = f32(attention.dense.kernel).reshape(-1, folded[0][1].shape[0])
        out_kernel_od = jnp.concatenate([dense_od, f32(mlp.dense_4h_to_h.kernel)])
        out_bias_d = f32(attention.dense.bias) + f32(mlp.dense_4h_to_h.bias)
        return cls(*(x.astype(dtype) for x in (in_kernel_do.T, in_bias_o, out_kernel_od.T, out_bias_d)))

    def __call__(self, cfg: NeoXConfig, x_btd, cos_btr, sin_btr, mask_bts, cache=None, cache_index=None):
        b, t, _ = x_btd.shape
        n, h = cfg.num_heads, cfg.head_dim
        norm_btd = normalize(x_btd, cfg.layer_norm_eps).astype(x_btd.dtype)
        y_bto = matmul.einsum("btd,od->bto", norm_btd, self.in_kernel_od) + self.in_bias_o
        out_btnh, cache = attend_qkv(y_bto[..., :3 * n * h].reshape(b, t, n, 3, h), cos_btr, sin_btr, mask_bts,
                                     cfg.attention, cache, cache_index)
        mlp_btf = jax.nn.gelu(y_bto[..., 3 * n * h:], approximate=cfg.activation == "gelu_fast")
        z_bto = jnp.concatenate([out_btnh.reshape(b, t, n * h), mlp_btf], axis=-1)
        return x_btd + (matmul.einsum("bto,do->btd", z_bto, self.out_kernel_do) + self.out_bias_d), cache


_REMAT = {
    "full": None,  # save nothing inside a layer: recompute it all on the backward pass
    # Korthikanti et al.'s selective recomputation: keep the column-parallel projections' outputs (QKV, the MLP's
    # first), recompute the attention core, LayerNorms and activations (and, sequence-parallel, the gathers)
    "selective": jax.checkpoint_policies.save_only_these_names(PROJECTED),
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_axes(stacked) -> dict:
    """Logical axes of one layer's weights (the stacked `layers` axis dropped)."""
    return jax.tree.map(lambda spec: tuple(spec)[1:], nnx.get_partition_spec(stacked),
                        is_leaf=lambda x: isinstance(x, P))


def apply_layer(graphdef, params, axes, x_btd, cos_btr, sin_btr, mask_bts=None, cache=None, cache_index=None,
                keys_b=None, split: bool = False):
    """One layer (`params`: one layer's slice of the stack, `axes` their `layer_axes`) -> (x, cache). Constraining
    the weights to their logical axes makes a sharded run gather one layer's weights at a time where they are split
    beyond the rules table (ZeRO-3), instead of moving activations. `keys_b`: the layer's dropout keys. `split`:
    sequence parallelism (`sequence_parallel.applies`): x enters and leaves split along the sequence."""
    params = jax.tree.map(constrain, params, axes)
    if split:
        x_btd = sequence_parallel.apply_layer(graphdef, params, axes, x_btd, cos_btr, sin_btr, mask_bts, keys_b)
    else:
        x_btd, cache = nnx.merge(graphdef, params)(x_btd, cos_btr, sin_btr, mask_bts, cache, cache_index, keys_b)
    return constrain(x_btd, sequence_parallel.stream_axes(split)), cache


def run_layers(graphdef, stacked, cfg: NeoXConfig, x_btd, positions_bt, mask_bts, cache=None, cache_index=None,
               keys_b=None):
    """Apply a stack of layers (weights with a leading layer axis) with a scan. `stacked` may also be a tuple of
    per-layer weights (`unstack`, or `fused_layers`' `FusedLayer`s): the layers then run one after the other,
    unrolled, each reading its own arrays. `keys_b`: each row's dropout keys (dropout.py; layer i folds in i).
    Under sequence parallelism the whole scan runs in one region manual over the tensor axis
    (`sequence_parallel.region`: differentiating a scan of regions would split each of them)."""
    cos_btr, sin_btr = rotary_cos_sin(positions_bt, cfg.rotary_ndims, cfg.rotary_base)
    if not isinstance(stacked, tuple) and sequence_parallel.applies(cfg, x_btd.shape[1], cache):
        def scan(stacked, x_btd, cos_btr, sin_btr, mask_bts, keys_b):
            return _layers(graphdef, stacked, cfg, x_btd, cos_btr, sin_btr, mask_bts, keys_b=keys_b, split=True)[0]

        rest = (cos_btr, sin_btr, mask_bts, keys_b)
        x_btd = sequence_parallel.region(scan, stacked, layer_axes(stacked), x_btd, rest, stacked=True)
        return constrain(x_btd, sequence_parallel.stream_axes(True)), None
    return _layers(graphdef, stacked, cfg, x_btd, cos_btr, sin_btr, mask_bts, cache, cache_index, keys_b)


def _layers(graphdef, stacked, cfg, x_btd, cos_btr, sin_btr, mask_bts, cache=None, cache_index=None, keys_b=None,
            split: bool = False):
    """`run_layers` given the rotary angles; `split`: inside sequence parallelism's region."""
    per_layer = isinstance(stacked, tuple)
    first = stacked[0] if per_layer else stacked
    axes = None if isinstance(first, FusedLayer) else layer_axes(first)

    def layer(x_btd, params, cache, index):  # cache: None, or (arrays, this layer's index in them or None)
        if isinstance(params, FusedLayer):
            return params(cfg, x_btd, cos_btr, sin_btr, mask_bts, cache, cache_index)
        return apply_layer(graphdef, params, axes, x_btd, cos_btr, sin_btr, mask_bts, cache, cache_index,
                           None if keys_b is None else fold(keys_b, index), split)

    if cfg.remat_policy != "none":
        layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat_policy], prevent_cse=False)
    if per_layer:  # and the cache, when there is one, a tuple of per-layer caches (`init_cache(per_layer=True)`)
        caches = []
        for index, params in enumerate(stacked):
            x_btd, layer_cache = layer(x_btd, params, None if cache is None else (cache[index], None), index)
            caches.append(layer_cache)
        return x_btd, None if cache is None else tuple(caches)

    def body(carry, xs):  # the stacked cache rides in the carry: updated in place, layer by layer
        x_btd, cache = carry
        params, index = xs
        return layer(x_btd, params, None if cache is None else (cache, index), index), None

    layers = jax.tree.leaves(stacked)[0].shape[0]
    (x_btd, cache), _ = jax.lax.scan(body, (x_btd, cache), (stacked, jnp.arange(layers)))
    return x_btd, cache


def output_logits(h_btd, kernel, kernel_axes: str = "dv"):
    """fp32 logits of the final LayerNorm's output; the kernel [embed, vocab] ("dv") or [vocab, embed] ("vd")."""
    return constrain(jnp.einsum(f"btd,{kernel_axes}->btv", h_btd, kernel, preferred_element_type=F32),
                     ("batch", "length", "vocab"))


def check_ids(ids, vocab_size: int, mask=None, cache_read: int | None = None, what: str = "input_ids"):
    """Token ids [b, t] of an integer dtype (and an attention mask [b, t], or [b, >= S] with a cache read over S),
    every value in 0..vocab_size - 1 where the array is concrete (a traced one is checked by type and shape only):
    a ValueError naming every problem, before anything is computed. An id out of range would read another row of
    the embedding silently."""
    ids = ids if hasattr(ids, "dtype") and hasattr(ids, "shape") else np.asarray(ids)
    problems = []
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        problems.append(f"{what} are {ids.dtype}: give token ids as integers (a tokenizer's encode(...).ids)")
    if len(ids.shape) != 2:
        problems.append(f"{what} of shape {tuple(ids.shape)}: expected [batch, tokens]")
    elif mask is not None:
        mask = mask if hasattr(mask, "shape") else np.asarray(mask)
        if cache_read is None and tuple(mask.shape) != tuple(ids.shape):
            problems.append(f"attention_mask of shape {tuple(mask.shape)}: expected {tuple(ids.shape)} (1 for a real "
                            "token, 0 for padding)")
        elif cache_read is not None and (len(mask.shape) != 2 or mask.shape[0] != ids.shape[0]
                                         or mask.shape[1] < cache_read):
            problems.append(f"attention_mask of shape {tuple(mask.shape)}: expected ({ids.shape[0]}, at least "
                            f"{cache_read}), covering the cache positions read")
    if not problems and not isinstance(ids, jax.core.Tracer) and ids.size:
        values = np.asarray(ids)
        bad = (values < 0) | (values >= vocab_size)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            where = f"position {col}" if values.shape[0] == 1 else f"row {row}, position {col}"
            problems.append(f"{what} hold {int(bad.sum())} id(s) outside 0..{vocab_size - 1} (the model's vocab_size), "
                            f"the first {int(values[row, col])} at {where}")
    if problems:
        raise ValueError("; ".join(problems))


def cache_length(cache) -> int:
    """The positions a KV cache (stacked or per layer) holds."""
    return jax.tree.leaves(cache)[0].shape[-2]


def require_lm_head(config: NeoXConfig):
    """A ConfigError where the model has a score head (a reward model) instead of the language-model head."""
    if config.num_labels:
        raise ConfigError(f"this model has a score head (num_labels={config.num_labels}: a reward model), not a "
                          "language-model head: it scores sequences, it does not predict tokens")


def abstract_model(config: NeoXConfig):
    """(graphdef, parameter state of ShapeDtypeStructs): the model's structure, nothing allocated."""
    return nnx.split(nnx.eval_shape(lambda: GPTNeoX(config, rngs=nnx.Rngs(0))))


def with_params(config: NeoXConfig, params: dict) -> "GPTNeoX":
    """A GPTNeoX holding `params`, the nested dict of arrays that converters and checkpoints deal in."""
    graphdef, state = abstract_model(config)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def positions_from_mask(attention_mask_bt):
    """Position of each token counting real tokens only, so a left-padded prompt matches its unpadded self."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


class GPTNeoX(nnx.Module):
    """GPT-NeoX causal LM. `model(input_ids, attention_mask=None)` returns fp32 logits [b, t, vocab]."""

    def __init__(self, config: NeoXConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg = config
        self.embed_in = Embed(cfg, rngs)

        # Layers are stacked on a leading `layers` axis and applied with a scan: compile time stays flat in
        # depth, and the stack can be cut into pipeline stages by a reshape.
        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return Block(cfg, rngs)

        self.layers = make_layers(rngs)
        self.final_layer_norm = LayerNorm(cfg)
        if cfg.num_labels:  # a score head instead of the language-model head (reward models)
            self.score = Dense(rngs, cfg, init_scale(cfg.init_method, cfg), (cfg.hidden_size, cfg.num_labels),
                               ("embed", "labels"))
        else:
            self.embed_out = Dense(rngs, cfg, init_scale(cfg.init_method, cfg), (cfg.hidden_size, cfg.vocab_size),
                                   ("embed", "vocab"))

    def embed(self, input_ids_bt, keys_b=None):
        """The token embeddings [b, t, d]; with dropout keys (dropout.py), GPT-NeoX's embedding dropout."""
        cfg = self.config
        table_ve = constrain(self.embed_in.embedding[...], ("vocab", "embed"))
        keys_b = None if keys_b is None else fold(keys_b, cfg.num_layers)
        split = sequence_parallel.applies(cfg, input_ids_bt.shape[1])
        if split:
            x_btd = sequence_parallel.embed(table_ve, input_ids_bt, cfg.dtype, cfg.hidden_dropout, keys_b)
        else:
            x_btd = jnp.take(table_ve, input_ids_bt, axis=0).astype(cfg.dtype)
            x_btd = dropout(x_btd, cfg.hidden_dropout, keys_b, 0)
        return constrain(x_btd, sequence_parallel.stream_axes(split))

    def apply_layers(self, x_btd, positions_bt, mask_bts, cache=None, cache_index=None, layer_weights=None,
                     keys_b=None):
        graphdef, stacked = nnx.split(self.layers)
        return run_layers(graphdef, stacked if layer_weights is None else layer_weights, self.config, x_btd,
                          positions_bt, mask_bts, cache, cache_index, keys_b)

    def unstack(self) -> tuple:
        """Each layer's weights as arrays of their own (a copy), for `layer_weights=`: XLA's CPU backend copies a
        layer's slice out of the stacked arrays before every matmul, which a decode step pays for every token."""
        _, stacked = nnx.split(self.layers)
        return tuple(jax.tree.map(lambda w: w[i], stacked) for i in range(self.config.num_layers))

    def fused_layers(self) -> tuple:
        """Each layer's weights as a `FusedLayer` (a copy, in the compute dtype), for `layer_weights=` in decoding; a
        sequential-residual model's as `unstack` gives them."""
        if not self.config.use_parallel_residual:
            return self.unstack()
        graphdef, _ = nnx.split(self.layers)
        return tuple(FusedLayer.of(nnx.merge(graphdef, layer), self.config.dtype) for layer in self.unstack())

    def logits(self, x_btd, kernel_vd=None):
        """fp32 logits [b, t, vocab] of the last layer's output; a score model's scores [b, t, labels]."""
        if self.config.num_labels:
            return self.scores(x_btd)
        h_btd = self.final_hidden(x_btd)
        if kernel_vd is None:
            return output_logits(h_btd, self.output_kernel(h_btd.dtype))
        return output_logits(h_btd, kernel_vd.astype(h_btd.dtype), "vd")

    def final_hidden(self, x_btd):
        """The final LayerNorm's output, whole along the sequence: the vocab-parallel output layer reads every
        position (under sequence parallelism the last layer's output arrives split: gathered here)."""
        h_btd = self.final_layer_norm(x_btd)
        split = sequence_parallel.applies(self.config, h_btd.shape[1])
        return constrain(h_btd, sequence_parallel.stream_axes(False)) if split else h_btd

    def output_kernel(self, dtype):
        """The output layer's [embed, vocab] kernel in `dtype`, vocabulary-parallel."""
        require_lm_head(self.config)
        return constrain(self.embed_out.kernel[...], ("embed", "vocab")).astype(dtype)

    def scores(self, x_btd):
        """A score model's fp32 scores [b, t, labels] of the last layer's output: the score head on the final
        LayerNorm's output at every position (Hugging Face's GPTNeoXForSequenceClassification, before it picks the
        last token)."""
        h_btd = self.final_layer_norm(x_btd)
        return jnp.einsum("btd,dl->btl", h_btd, self.score.kernel[...].astype(h_btd.dtype), preferred_element_type=F32)

    def init_cache(self, batch: int, length: int, dtype=None, per_layer: bool = False) -> dict | tuple:
        """An empty KV cache {k, v}: [layers, batch, heads, length, head_dim] in the compute dtype, heads split over
        `tensor` (heads before length: attention reads each head's keys as they lie, no transpose). `per_layer`:
        a tuple of each layer's {k, v} [batch * heads, length, head_dim] instead, to go with `layer_weights` (the CPU
        generator's: `_attend_layer_cache`)."""
        cfg = self.config
        if per_layer:
            shape = (batch * cfg.num_heads, length, cfg.head_dim)
            return tuple({name: jnp.zeros(shape, dtype or cfg.dtype) for name in "kv"} for _ in range(cfg.num_layers))
        shape = (cfg.num_layers, batch, cfg.num_heads, length, cfg.head_dim)
        axes = ("layers", "batch", "heads", "length", "head_dim")
        return {name: constrain(jnp.zeros(shape, dtype or cfg.dtype), axes) for name in "kv"}

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=0,
                 last_only: bool = False, hidden_only: bool = False, cache_read: int | None = None,
                 layer_weights: tuple | None = None, output_kernel_vd=None, dropout_keys=None):
        """Logits for `input_ids` [b, t] (fp32 [b, t, vocab]).

        attention_mask: 1 for real tokens, 0 for padding (left padding); padded keys are never attended and
        positions count real tokens only. positions [b, t] overrides that.

        With `cache` (from `init_cache`, length S) the tokens are those at cache positions
        cache_index .. cache_index + t; `attention_mask` then covers the whole cache [b, S] and the call
        returns (logits, updated cache). Attention reads only the cache's first `cache_read` positions (static;
        default S): they must hold every position up to cache_index + t. `last_only` computes the logits of the
        last position only (a prefill needs no others, and the vocabulary projection is most of its cost).
        `hidden_only` returns the last layer's output [b, t, d] instead (no cache), for a loss that applies the
        output layer itself. `layer_weights` (from `fused_layers` or `unstack`) replaces the stacked layer weights,
        `output_kernel_vd` (the output kernel transposed, [vocab, embed]) the output layer's. `dropout_keys` [b, 2]
        (dropout.py: training's) applies the config's dropout; without them nothing is dropped.
        """
        s = None if cache is None else cache_read or cache_length(cache)
        check_ids(input_ids, self.config.vocab_size, attention_mask, s)
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        s = t if cache is None else s
        query_pos = jnp.arange(t) + (0 if cache is None else cache_index)
        causal_ts = jnp.arange(s)[None, :] <= query_pos[:, None]
        if attention_mask is None:
            mask_bts = None if cache is None else jnp.broadcast_to(causal_ts, (b, t, s))  # None: causal
            default_positions = jnp.broadcast_to(query_pos, (b, t))
        else:
            attention_mask = jnp.asarray(attention_mask)
            mask_bts = causal_ts[None] & attention_mask[:, None, :s].astype(bool)
            default_positions = positions_from_mask(attention_mask)
            if cache is not None:
                default_positions = jax.lax.dynamic_slice_in_dim(default_positions, cache_index, t, axis=1)
        positions = default_positions if positions is None else jnp.asarray(positions)
        x_btd, cache = self.apply_layers(self.embed(input_ids, dropout_keys), positions, mask_bts, cache, cache_index,
                                         layer_weights, dropout_keys)
        if hidden_only:
            return x_btd
        logits = self.logits(x_btd[:, -1:] if last_only else x_btd, output_kernel_vd)
        return logits if cache is None else (logits, cache)
