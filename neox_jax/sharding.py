"""Meshes, and logical axis names -> mesh axes, as data.

The model names the logical axes of every parameter and of the activations at layer boundaries; the
rules table below alone decides where they live on the `(data, pipe, tensor)` mesh:

- Megatron tensor parallelism: QKV and `dense_h_to_4h` column-parallel (`heads`, `mlp` on `tensor`),
  `attention.dense` and `dense_4h_to_h` row-parallel (the same names on their input side), embedding and
  output vocab-parallel.
- batch on `data`; under `sequence_parallel` the residual stream between layers split along the sequence
  (`sequence`) over `tensor` as well (neox_jax/sequence_parallel.py).
- the stacked `layers` axis on `pipe`: contiguous blocks of layers are the pipeline's stages
  (neox_jax/pipeline.py; with pipe = 1 this splits nothing).
- ZeRO-1: optimizer state (and the fp32 master copy) additionally split over `data` the same way; with
  FSDP (ZeRO-3) the parameters are split that way too.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from neox_jax.config import MESH_AXES
from neox_jax.errors import ConfigError

# logical name -> mesh axis (None: replicated)
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", None),
    ("sequence", "tensor"),  # the residual stream's positions between layers under sequence_parallel
    ("embed", None),
    ("vocab", "tensor"),
    ("labels", None),  # a score head's outputs (reward models: 1)
    ("heads", "tensor"),
    ("qkv", None),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", "pipe"),  # contiguous blocks of layers = pipeline stages (neox_jax/pipeline.py)
    ("stage", "pipe"),
)


# ---- mesh -------------------------------------------------------------------------------------------


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """`"data=12,pipe=4,tensor=2"` or a mapping -> {data, pipe, tensor}; missing axes are 1."""
    if isinstance(spec, str):
        items = {}
        for part in filter(None, spec.split(",")):
            name, _, value = part.partition("=")
            try:
                items[name.strip()] = int(value)
            except ValueError:
                raise ConfigError(f"mesh entry {part!r}: expected AXIS=SIZE, e.g. data=12,pipe=4,tensor=2") from None
        spec = items
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh axes {unknown} unknown: the mesh axes are {', '.join(MESH_AXES)}")
    return {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}


def resolve_mesh_shape(spec: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill one -1 entry with the rest of the devices and check the product is the device count."""
    shape = parse_mesh(spec)
    free = [a for a, n in shape.items() if n == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh {shape}: at most one axis may be -1")
    if any(n == 0 or n < -1 for n in shape.values()):
        raise ConfigError(f"mesh {shape}: sizes must be positive (or -1 for the rest)")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(f"mesh {shape}: {num_devices} devices are not divisible by {fixed}")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ConfigError(f"mesh {shape} has {math.prod(shape.values())} devices but {num_devices} are "
                          "available: change `mesh` so that data x pipe x tensor equals the device count")
    return shape


def make_mesh(spec: str | Mapping[str, int], devices=None) -> Mesh:
    """A (data, pipe, tensor) mesh with Auto axes; tensor and pipe stay inside a host, data spans hosts."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(spec, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    hosts = len({d.process_index for d in devices})
    if hosts > 1:
        per_host = len(devices) // hosts
        if shape["pipe"] * shape["tensor"] > per_host:
            raise ConfigError(f"mesh {shape}: pipe x tensor = {shape['pipe'] * shape['tensor']} devices do not fit "
                              f"in one process's {per_host}: tensor and pipe stay inside a host (fast links); "
                              "lower `mesh` tensor or pipe, or run fewer processes with more devices each")
        if shape["data"] % hosts:
            raise ConfigError(f"mesh {shape}: data={shape['data']} is not a multiple of the {hosts} processes: "
                              "`data` spans the hosts, so choose a data size that the process count divides")
        from jax.experimental import mesh_utils

        # Each process (host) is one granule: data splits across them, pipe x tensor stays inside one.
        grid = mesh_utils.create_hybrid_device_mesh(
            (shape["data"] // hosts, shape["pipe"], shape["tensor"]), (hosts, 1, 1), devices,
            process_is_granule=True)
    else:
        # Device ids in order: tensor neighbours are adjacent (NVLink), then pipe, then data.
        grid = np.asarray(sorted(devices, key=lambda d: d.id)).reshape(dims)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ---- logical -> physical ------------------------------------------------------------------------------


def logical_to_spec(axes: tuple[str | None, ...], rules=LOGICAL_RULES) -> P:
    """PartitionSpec for logical `axes`; a mesh axis is used at most once (a later use replicates)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        mesh_axis = table.get(name) if name is not None else None
        if mesh_axis in used:
            mesh_axis = None
        if mesh_axis is not None:
            used.add(mesh_axis)
        out.append(mesh_axis)
    return P(*out)


def _trim(spec: P, mesh_shape: Mapping[str, int]) -> P:
    """Drop mesh axes the current mesh does not have, or that have size 1 (nothing to split)."""
    return P(*(a if mesh_shape.get(a, 1) > 1 else None for a in spec))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint from logical names; a no-op when no mesh is active. Inside a `shard_map` that is
    manual over some mesh axes (the train step's, over `data`; the pipeline's, over `pipe`) those are already
    split: they are left out."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    manual = manual_axes()
    shape = {a: (1 if a in manual else n) for a, n in zip(mesh.axis_names, mesh.axis_sizes)}
    return jax.lax.with_sharding_constraint(x, _trim(logical_to_spec(axes), shape))


def manual_axes() -> tuple[str, ...]:
    """The mesh axes the current `shard_map` is manual over (none outside one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return () if mesh.empty else tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual)


def mesh_axis(name: str) -> str | None:
    """The mesh axis the rules table maps logical axis `name` to (None: replicated)."""
    return dict(LOGICAL_RULES).get(name)


def block_start(name: str, size: int):
    """The index of this device's first element along logical axis `name` (`size` per device) where its mesh axis is
    manual in the current `shard_map`, else 0 (the whole axis is here)."""
    axis = mesh_axis(name)
    return jax.lax.axis_index(axis) * size if axis is not None and axis in manual_axes() else 0


def varying(x: jax.Array) -> jax.Array:
    """`x` marked as differing across the manual axes (a scan carry made of zeros must match the per-shard values
    it is combined with); a no-op outside a `shard_map`."""
    axes = manual_axes()
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def vary_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """`x` marked as differing across every manual axis that `ref` differs across (a cotangent must match its
    primal's type)."""
    missing = jax.typeof(ref).manual_axis_type.varying - jax.typeof(x).manual_axis_type.varying
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def add_axis(spec: P, shape: tuple[int, ...], axes: tuple[str | None, ...], mesh_axis: str,
             mesh_shape: dict[str, int]) -> P:
    """Also split over `mesh_axis`, along the largest dimension that stays divisible: a free one if
    possible, else one already split (the two mesh axes then share it).

    The stacked `layers` dimension is never chosen (the layer scan would gather the whole stack), and
    tensors with no such dimension (small odd-sized biases) stay replicated over that axis.
    """
    size = mesh_shape[mesh_axis]
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if size == 1 or any(mesh_axis in (e if isinstance(e, tuple) else (e,)) for e in entries):
        return spec

    def parts(entry):
        return () if entry is None else entry if isinstance(entry, tuple) else (entry,)

    def candidates(free: bool):
        for i, (dim, entry, name) in enumerate(zip(shape, entries, axes)):
            split = math.prod(mesh_shape[a] for a in parts(entry))
            if name != "layers" and (entry is None) == free and dim % (split * size) == 0:
                yield dim // split, i

    best = max(candidates(True), default=None) or max(candidates(False), default=None)
    if best is None:
        return spec
    i = best[1]
    entries[i] = parts(entries[i]) + (mesh_axis,) if entries[i] is not None else mesh_axis
    return P(*entries)


def param_specs(abstract_params, axes_tree, mesh: Mesh, fsdp: bool = False):
    """PartitionSpecs for a params tree from its logical axes (`axes_tree`, same structure); with FSDP each
    weight is split over `data` as well."""

    def spec(x, axes):
        s = _trim(logical_to_spec(axes), dict(mesh.shape))
        return add_axis(s, x.shape, axes, "data", dict(mesh.shape)) if fsdp else s

    return jax.tree.map(spec, abstract_params, axes_tree, is_leaf=lambda a: isinstance(a, P))


def zero_specs(abstract_params, specs, axes_tree, mesh: Mesh):
    """ZeRO-1 specs for optimizer state and master weights: the param spec plus a split over `data`."""
    return jax.tree.map(lambda x, s, axes: add_axis(s, x.shape, axes, "data", dict(mesh.shape)),
                        abstract_params, specs, axes_tree, is_leaf=lambda a: isinstance(a, P))


def named(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def batch_spec() -> P:
    return logical_to_spec(("batch", "length"))


# ---- manual regions ---------------------------------------------------------------------------------


def manual(fn, diff_specs, rest_specs, out_spec, axes: tuple[str, ...], residual_axes: tuple[str, ...] | None = None):
    """`fn(diff, rest)` in a `shard_map` manual over `axes` (nested in any other; the remaining axes automatic), as a
    function of (diff, rest) differentiable in `diff` only. Its gradient is a custom VJP: the forward's residuals
    (per device, `jax.vjp` inside the region: cuDNN's softmax statistics, a layer's inputs) leave stacked along a
    leading axis over `residual_axes` (the axes they may vary over; default `axes`) and the backward is a second
    `shard_map` over them. Autodiff of the `shard_map` itself gives the
    residuals a spec naming the enclosing `shard_map`'s manual axes too (JAX 0.10.2), which does not lower inside
    the step's or the pipeline's. Inside `fn`, collectives over `axes` and the usual transposes of replicated inputs
    (a gradient summed over the axes) apply."""
    axes = tuple(axes)
    return functools.partial(_manual, _Region(fn, diff_specs, rest_specs, out_spec, axes,
                                              axes if residual_axes is None else tuple(residual_axes)))


class _Region:
    """What `_manual` runs and how; the structure of the forward's residuals is known once it is traced
    (custom_vjp residuals hold arrays only)."""

    def __init__(self, fn, diff_specs, rest_specs, out_spec, axes, residual_axes):
        self.fn, self.diff_specs, self.rest_specs, self.out_spec, self.axes = fn, diff_specs, rest_specs, out_spec, axes
        self.residual_spec = P(residual_axes)
        self.residual_tree = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _manual(region, diff, rest):
    return _manual_fwd(region, diff, rest)[0]


def _manual_fwd(region, diff, rest):
    def forward(diff, rest):
        out, pull = jax.vjp(lambda d: region.fn(d, rest), diff)
        leaves, region.residual_tree = jax.tree.flatten(pull)
        return out, [x[None] for x in leaves]

    return jax.shard_map(forward, in_specs=(region.diff_specs, region.rest_specs),
                         out_specs=(region.out_spec, region.residual_spec), axis_names=set(region.axes))(diff, rest)


def _manual_bwd(region, residuals, g):
    def backward(residuals, g):
        return jax.tree.unflatten(region.residual_tree, [x[0] for x in residuals])(g)[0]

    grads = jax.shard_map(backward, in_specs=(region.residual_spec, region.out_spec), out_specs=region.diff_specs,
                          axis_names=set(region.axes))(residuals, g)
    return grads, None


_manual.defvjp(_manual_fwd, _manual_bwd)
