"""Meshes, the rules table, ZeRO-1 / FSDP layouts and layout checks (8 emulated CPU devices)."""

import math

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from neox_jax.config import TrainConfig
from neox_jax.errors import ConfigError
from neox_jax.sharding import add_axis, logical_to_spec, make_mesh, parse_mesh, resolve_mesh_shape
from neox_jax.train import Trainer, check_layout


def test_mesh_from_config():
    assert resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == {"data": 4, "pipe": 1, "tensor": 2}
    assert parse_mesh("data=12,pipe=4,tensor=2") == {"data": 12, "pipe": 4, "tensor": 2}
    mesh = make_mesh("data=2,pipe=2,tensor=2")
    assert mesh.axis_names == ("data", "pipe", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    # tensor neighbours are adjacent devices, then pipe, then data
    assert [d.id for d in mesh.devices[0, 0]] == [0, 1] and mesh.devices[0, 1, 0].id == 2
    assert mesh.devices[1, 0, 0].id == 4


@pytest.mark.parametrize("spec,match", [
    ({"data": 3, "tensor": 2}, "has 6 devices but 8 are available"),
    ({"data": -1, "tensor": 3}, "not divisible by 3"),
    ({"data": -1, "tensor": -1}, "at most one axis may be -1"),
    ({"expert": 2}, "mesh axes \\['expert'\\] unknown"),
    ("data=two", "expected AXIS=SIZE"),
])
def test_impossible_meshes_are_named(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve_mesh_shape(spec, 8)


def test_layout_checks_name_every_setting_before_compiling():
    cfg = TrainConfig.from_dict({"model": "pythia-70m"})  # 6 layers, 8 heads, mlp 2048, vocab 50304
    with pytest.raises(ConfigError) as err:
        check_layout(cfg, {"data": 1, "pipe": 4, "tensor": 5})
    msg = str(err.value)
    for needle in ("num_heads=8 is not divisible by mesh tensor=5", "intermediate_size=2048",
                   "vocab_size=50304", "num_layers=6 is not divisible by mesh pipe=4"):
        assert needle in msg
    # Trainer runs the same checks in its constructor, before anything is traced
    with pytest.raises(ConfigError, match="num_layers=6 is not divisible by mesh pipe=4"):
        Trainer(cfg.replace(mesh={"data": 2, "pipe": 4}), make_mesh({"data": 2, "pipe": 4}))


def test_rules_table_is_megatron():
    assert logical_to_spec(("embed", "heads", "qkv", "head_dim")) == P(None, "tensor", None, None)
    assert logical_to_spec(("heads", "head_dim", "embed")) == P("tensor", None, None)  # row-parallel
    assert logical_to_spec(("embed", "mlp")) == P(None, "tensor")
    assert logical_to_spec(("mlp", "embed")) == P("tensor", None)
    assert logical_to_spec(("vocab", "embed")) == P("tensor", None)
    assert logical_to_spec(("batch", "length", "vocab")) == P("data", None, "tensor")
    # a mesh axis is used once: heads and mlp never both on tensor
    assert logical_to_spec(("heads", "mlp")) == P("tensor", None)


def test_add_axis_skips_layers_and_shares_dims():
    mesh = {"data": 4, "pipe": 2, "tensor": 2}
    assert add_axis(P(None, None), (44, 6144), ("layers", "embed"), "data", mesh) == P(None, "data")
    assert add_axis(P(None, "tensor"), (8, 4096), ("layers", "mlp"), "data", mesh) == P(None, ("tensor", "data"))
    assert add_axis(P(None), (7,), ("embed",), "data", mesh) == P(None)  # nothing divides: replicated


# every parameter of pythia-70m on (data=2, pipe=2, tensor=2): (parameters, ZeRO-1 optimizer state). The stacked
# layers are split over pipe (pipeline stages), Megatron over tensor, ZeRO over data.
GOLDEN_70M = {
    "embed_in.embedding": (("tensor", None), ("tensor", "data")),
    "embed_out.kernel": ((None, "tensor"), ("data", "tensor")),
    "final_layer_norm.bias": ((None,), ("data",)),
    "final_layer_norm.scale": ((None,), ("data",)),
    "layers.attention.dense.bias": (("pipe", None), ("pipe", "data")),
    "layers.attention.dense.kernel": (("pipe", "tensor", None, None), ("pipe", "tensor", None, "data")),
    "layers.attention.query_key_value.bias": (("pipe", "tensor", None, None), ("pipe", "tensor", None, "data")),
    "layers.attention.query_key_value.kernel": (("pipe", None, "tensor", None, None),
                                                ("pipe", "data", "tensor", None, None)),
    "layers.input_layernorm.bias": (("pipe", None), ("pipe", "data")),
    "layers.input_layernorm.scale": (("pipe", None), ("pipe", "data")),
    "layers.mlp.dense_4h_to_h.bias": (("pipe", None), ("pipe", "data")),
    "layers.mlp.dense_4h_to_h.kernel": (("pipe", "tensor", None), ("pipe", "tensor", "data")),
    "layers.mlp.dense_h_to_4h.bias": (("pipe", "tensor"), ("pipe", ("tensor", "data"))),
    "layers.mlp.dense_h_to_4h.kernel": (("pipe", None, "tensor"), ("pipe", "data", "tensor")),
    "layers.post_attention_layernorm.bias": (("pipe", None), ("pipe", "data")),
    "layers.post_attention_layernorm.scale": (("pipe", None), ("pipe", "data")),
}


def _flat(tree):
    return {".".join(k): v for k, v in nnx.traversals.flatten_mapping(tree).items()}


@pytest.fixture(scope="module")
def trainer_70m():
    cfg = TrainConfig.from_dict({"model": "pythia-70m", "mesh": {"data": 2, "pipe": 2, "tensor": 2},
                                 "precision": "bf16", "seq_length": 64})
    return Trainer(cfg, make_mesh(cfg.mesh))


def test_golden_partition_specs_pythia_70m(trainer_70m):
    params, zero = _flat(trainer_70m.param_specs), _flat(trainer_70m.zero_specs)
    assert set(params) == set(GOLDEN_70M)
    for name, (p_spec, z_spec) in GOLDEN_70M.items():
        assert tuple(params[name]) == p_spec, name
        assert tuple(zero[name]) == z_spec, name


def test_zero1_really_splits_optimizer_state_over_data(trainer_70m):
    tr = trainer_70m
    state = tr.abstract_state()
    sh = tr.state_shardings

    def shard_elems(x, s):
        return math.prod(s.shard_shape(x.shape))

    params = _flat(jax.tree.map(shard_elems, state.params, sh.params))
    master = _flat(jax.tree.map(shard_elems, state.master, sh.master))
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's (ScaleByAdamState, ...)
    adam_sh = sh.opt_state[1][0]
    mu = _flat(jax.tree.map(shard_elems, adam.mu, adam_sh.mu))
    nu = _flat(jax.tree.map(shard_elems, adam.nu, adam_sh.nu))
    for name in params:  # every 70m tensor has a dimension that data=2 divides
        assert master[name] * 2 == params[name], name
        assert mu[name] * 2 == params[name] and nu[name] * 2 == params[name], name
    # bf16 working weights, fp32 master and moments
    assert jax.tree.leaves(state.params)[0].dtype == jax.numpy.bfloat16
    assert jax.tree.leaves(state.master)[0].dtype == jax.numpy.float32


def test_fsdp_splits_parameters_over_data():
    cfg = TrainConfig.from_dict({"model": "pythia-70m", "mesh": {"data": 4, "tensor": 2}, "zero_stage": 3,
                                 "seq_length": 64})
    tr = Trainer(cfg, make_mesh(cfg.mesh))
    specs = _flat(tr.param_specs)
    assert tuple(specs["layers.mlp.dense_h_to_4h.kernel"]) == (None, "data", "tensor")
    assert all("data" in str(s) for s in specs.values())
