"""Logical axis names -> mesh axes, as data.

The model names the logical axes of every parameter and of the activations at layer boundaries; this
table alone decides where they live on a `(data, pipe, tensor)` mesh (Megatron tensor parallelism:
heads and mlp column-parallel, their output projections row-parallel, vocab-parallel embeddings).
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "pipe", "tensor")

# logical name -> mesh axis (or None: replicated along every mesh axis)
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", None),
    ("embed", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("qkv", None),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", "pipe"),
)


def logical_to_spec(axes: tuple[str | None, ...], rules=LOGICAL_RULES) -> P:
    """PartitionSpec for logical `axes`; a mesh axis is used at most once (later uses replicate)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        mesh_axis = table.get(name) if name is not None else None
        if mesh_axis is not None and mesh_axis in used:
            mesh_axis = None
        if mesh_axis is not None:
            used.add(mesh_axis)
        out.append(mesh_axis)
    return P(*out)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint from logical names; a no-op when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes)
    spec = P(*(a if a in mesh.axis_names else None for a in spec))
    return jax.lax.with_sharding_constraint(x, spec)
