"""Megatron sequence parallelism (Korthikanti et al. 2022, GPT-NeoX's `sequence_parallel`) with its collectives
written out: between layers the residual stream is split along the sequence over the tensor axis, so LayerNorms,
dropout and the stored layer inputs take 1/t of the memory, and a layer is a `shard_map` manual over that axis.

Each layer gathers the sequence before its column-parallel products and reduce-scatters after its row-parallel ones
(`Block`'s `normalized` and `scatter`):

    parallel residual    one all-gather of x (both LayerNorms read the whole sequence), one reduce-scatter of
                         attention's and the MLP's partial sums added: the bytes of the single all-reduce that
                         tensor parallelism sends without it (GPT-NeoX gathers each LayerNorm's output: 1.5x)
    sequential residual  Megatron's: LayerNorm on the split stream, all-gather, branch, reduce-scatter, twice

and the backward the transposes (a gather's is a reduce-scatter and the other way round). XLA's automatic
partitioning of the same constraints sent 2.5-2.9x the bytes (docs/sharding.md). Inside the region each device
holds its heads and MLP columns as tensor parallelism lays them out; the LayerNorm weights and the row-parallel
biases are whole on every device and their gradients are summed over the axis by the region's transpose. A
row-parallel bias is added on the axis's first device only, so the reduce-scatter's sum holds it once; dropout,
being a mask times the value, is applied to each device's partial sums with the masks of the whole sequence (the
masks one device draws), and attention dropout to each device's heads with their own keys (dropout.head_keys).

The vocab-parallel embedding reduce-scatters its lookup into the split stream (`embed`); the output layer reads the
final LayerNorm's output gathered (`GPTNeoX.final_hidden`): the vocab-parallel logits need every position of their
vocabulary slice, and gathering [b, t, d] sends far fewer bytes than gathering the [d, V] kernel would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from neox_jax import matmul
from neox_jax import sharding as shd
from neox_jax.dropout import dropout

# the row-parallel products' biases: added once to the sum of the devices' partial outputs
ROW_PARALLEL_BIASES = (("attention", "dense", "bias"), ("mlp", "dense_4h_to_h", "bias"))


def axis() -> str | None:
    """The mesh axis that splits the residual stream's positions (the rules table's `sequence`)."""
    return shd.mesh_axis("sequence")


def applies(cfg, length: int, cache=None) -> bool:
    """Whether layers of `length` positions run sequence-parallel: the setting on, a mesh whose tensor axis has
    more than one device (and is not manual already), no KV cache (a decode step's token cannot be split), and a
    length the axis divides (training's is checked by `train.check_layout`; an evaluation of another length runs
    the layers whole, the same function)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not cfg.sequence_parallel or cache is not None or mesh.empty:
        return False
    size = dict(mesh.shape).get(axis(), 1)
    return size > 1 and axis() not in shd.manual_axes() and length % size == 0


def stream_axes(split: bool) -> tuple[str, str, str]:
    """Logical axes of the residual stream between layers: split along the sequence under sequence parallelism."""
    return ("batch", "sequence" if split else "length", "embed")


def _on_first(tree, first):
    """`tree` (a layer's weights) with each row-parallel bias zero except on the axis's first device."""
    def edit(path, w):
        names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))  # an nnx.State's `.value` left out
        if names in ROW_PARALLEL_BIASES:
            return jnp.where(first, w, jnp.zeros_like(w))
        return w

    return jax.tree_util.tree_map_with_path(edit, tree)


def embed(table_ve, ids_bt, dtype, rate: float = 0.0, keys_b=None):
    """The vocab-parallel embedding of `ids_bt` in `dtype`, split along the sequence: each device takes the rows of
    the ids in its block of the vocabulary (zeros for the others) and one reduce-scatter adds and splits them (XLA's
    partitioning of the lookup all-reduces, then slices: twice the bytes). GPT-NeoX's embedding dropout (`rate`, the
    embedding's keys), a mask times the value, applies to each device's part with the whole sequence's masks."""
    name = axis()

    def region(diff, rest):
        (table_ve,), (ids_bt, keys_b) = diff, rest
        rows = table_ve.shape[0]
        local_bt = ids_bt - jax.lax.axis_index(name) * rows
        here_bt = (local_bt >= 0) & (local_bt < rows)
        x_btd = jnp.take(table_ve, jnp.clip(local_bt, 0, rows - 1), axis=0).astype(dtype)
        x_btd = jnp.where(here_bt[..., None], x_btd, 0)
        return _scatter(dropout(x_btd, rate, keys_b, 0))

    return shd.manual(region, (P(name, None),), (P(), P()), split_spec(), (name,))((table_ve,), (ids_bt, keys_b))


def weight_specs(axes, stacked: bool = False):
    """Each weight's split over the sequence's mesh axis (the rules table's, tensor parallelism's) from its logical
    `axes` (a layer's, `model.layer_axes`); `stacked`: the weights carry the leading `layers` axis."""
    name = axis()
    return jax.tree.map(lambda a: P(*((None,) if stacked else ()), *(name if _splits(n) else None for n in a)),
                        axes, is_leaf=lambda a: isinstance(a, tuple))


def _splits(logical: str) -> bool:
    """Whether the sequence's mesh axis splits logical axis `logical` (tensor parallelism's heads, mlp, vocab)."""
    return shd.mesh_axis(logical) == axis()


def split_spec(lead: int = 0) -> P:
    """The spec of a sequence-split [b, t, d] activation (after `lead` leading axes) in a region."""
    return P(*(None,) * lead, None, axis(), None)


def region(fn, params, axes, x_btd, rest, stacked: bool = False, out_specs=None):
    """`fn(params, x_btd, *rest)` in a region manual over the sequence's mesh axis (`sharding.manual`): the weights
    enter as the rules table splits them over it, x split along the sequence, `rest` (rotary angles, mask, dropout
    keys, layer indices) whole; the output split along the sequence (or as `out_specs` say). Everything `fn` closes
    over must be static: a custom VJP cannot carry traced values in."""
    return shd.manual(lambda diff, rest: fn(*diff, *rest), (weight_specs(axes, stacked), split_spec()),
                      tuple(P() for _ in rest), out_specs or split_spec(), (axis(),))((params, x_btd), rest)


def apply_layer(graphdef, params, axes, x_btd, cos_btr, sin_btr, mask_bts=None, keys_b=None):
    """One layer (a `Block`'s graphdef and weights, their logical `axes`) on a sequence-split `x_btd` [b, t, d] ->
    its sequence-split output: inside a region already (`run_layers`'), or in one of its own."""
    name = axis()
    if name not in shd.manual_axes():
        return region(lambda params, x_btd, *rest: apply_layer(graphdef, params, axes, x_btd, *rest), params, axes,
                      x_btd, (cos_btr, sin_btr, mask_bts, keys_b))
    if matmul.cpu_program():  # so the gradients of the weights whole on every device are summed in fp32 (`_collective`)
        params = jax.tree.map(lambda w, a: w if any(map(_splits, a)) else w.astype(jnp.float32), params, axes,
                              is_leaf=lambda a: isinstance(a, tuple))
    block = nnx.merge(graphdef, _on_first(params, jax.lax.axis_index(name) == 0))
    return block(x_btd, cos_btr, sin_btr, mask_bts, keys_b=keys_b,
                 normalized=normalized, scatter=_scatter)[0]


def normalized(norms, x_btd):
    """Each LayerNorm of `norms` over the whole sequence of the split `x_btd`: one gather and both LayerNorms on it
    (the parallel residual's two), or Megatron's LayerNorm on the split stream and a gather of its output (one)."""
    if len(norms) == 1:
        return (_gather(norms[0](x_btd)),)
    x_btd = _gather(x_btd)
    return tuple(norm(x_btd) for norm in norms)


def _gather(v_btd):
    """The whole sequence of a sequence-split activation (its gradient a reduce-scatter)."""
    return _collective(lambda v: jax.lax.all_gather(v, axis(), axis=1, tiled=True), v_btd)


def _scatter(v_btd):
    """The devices' partial sums added and split along the sequence."""
    return _collective(lambda v: jax.lax.psum_scatter(v, axis(), scatter_dimension=1, tiled=True), v_btd)


def _collective(op, v_btd):
    """`op(v_btd)`, in fp32 in a CPU program: XLA's CPU compiler aborts on a bf16 reduce-scatter or all-reduce in a
    manual region ("Invalid binary instruction opcode copy", JAX 0.10.2), a gather's gradient included."""
    wide = matmul.cpu_program() and v_btd.dtype != jnp.float32
    return op(v_btd.astype(jnp.float32) if wide else v_btd).astype(v_btd.dtype)
