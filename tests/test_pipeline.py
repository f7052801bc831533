"""The 1F1B pipeline over `pipe`: equal to the unpipelined single-device model, and really a pipeline (8 CPU
devices)."""

import jax
import numpy as np
import pytest

from neox_jax.config import NeoXConfig, TrainConfig
from neox_jax.pipeline import bubble_fraction
from neox_jax.hlo import _COLLECTIVE, _first_group
from neox_jax.sharding import make_mesh
from neox_jax.train import Trainer
from tests.conftest import max_diff

MODEL = NeoXConfig(vocab_size=256, hidden_size=64, num_layers=8, num_heads=8, intermediate_size=128,
                   max_position_embeddings=64)
BASE = TrainConfig(model=MODEL, seq_length=32, micro_batch_size=16, grad_accum_steps=1, lr=1e-3, warmup=0, eps=1e-6)


def trainer(mesh_shape, **changes):
    mesh = make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
    changes.setdefault("micro_batch_size", 16 // mesh.shape["data"])
    return Trainer(BASE.replace(mesh=mesh_shape, **changes), mesh)


@pytest.fixture(scope="module")
def reference():
    tr = trainer({"data": 1})
    state = tr.init(jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, 256, tr.batch_shape())
    loss, grads = tr.grads(state.params, tr.put_batch(tokens))
    return tokens, float(loss), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("mesh_shape,microbatches", [
    (dict(pipe=8), 1), (dict(pipe=8), 8), (dict(data=2, pipe=2, tensor=2), 1), (dict(data=2, pipe=2, tensor=2), 2),
    (dict(data=2, pipe=2, tensor=2), 8), (dict(pipe=4, tensor=2), 2), (dict(pipe=2, tensor=4), 8),
], ids=lambda v: "x".join(f"{k}{n}" for k, n in v.items()) if isinstance(v, dict) else f"m{v}")
def test_pipelined_loss_and_grads_equal_single_device(reference, mesh_shape, microbatches):
    tokens, ref_loss, ref_grads = reference
    tr = trainer(mesh_shape, pipe_microbatches=microbatches)
    assert tr.stages == mesh_shape["pipe"] and tr.microbatches == microbatches
    state = tr.init(jax.random.key(0))
    loss, grads = tr.grads(state.params, tr.put_batch(tokens))
    assert abs(float(loss) - ref_loss) <= 1e-5
    assert max_diff(grads, ref_grads) <= 1e-5


def test_accumulation_microsteps_feed_the_pipeline(reference):
    tokens, ref_loss, ref_grads = reference  # [1, 16, 33] -> [4, 4, 33]: 4 accumulation microsteps
    tr = trainer({"data": 2, "pipe": 2, "tensor": 2}, grad_accum_steps=4, micro_batch_size=2)
    assert tr.microbatches == 4
    state = tr.init(jax.random.key(0))
    loss, grads = tr.grads(state.params, tr.put_batch(tokens.reshape(4, 4, 33)))
    assert abs(float(loss) - ref_loss) <= 1e-5 and max_diff(grads, ref_grads) <= 1e-5


@pytest.mark.slow
def test_one_step_on_222_equals_one_device(reference):
    tokens, *_ = reference
    params = []
    for mesh_shape in ({"data": 1}, {"data": 2, "pipe": 2, "tensor": 2}):
        tr = trainer(mesh_shape)
        state, _ = tr.step(tr.init(jax.random.key(0)), tr.put_batch(tokens))
        params.append(jax.tree.map(np.asarray, state.params))
    assert max_diff(*params) <= 1e-5


def test_compiled_222_step_is_a_pipeline_not_layer_sharding():
    tr = trainer({"data": 2, "pipe": 2, "tensor": 2}, pipe_microbatches=4)
    hlo = tr.step.lower(tr.abstract_state(), tr.abstract_batch()).compile().as_text()
    permutes_over_pipe = gathers_over_pipe = 0
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        group = _first_group(line, 8) if m else None
        if not group:
            continue
        pipe_coords = {np.unravel_index(i, (2, 2, 2))[1] for i in group}
        if len(pipe_coords) > 1:
            permutes_over_pipe += m.group(2) == "collective-permute"
            gathers_over_pipe += m.group(2) == "all-gather"
    assert permutes_over_pipe > 0  # activations move stage to stage
    assert gathers_over_pipe == 0  # and no stage ever gathers another stage's weights


@pytest.mark.parametrize("remat", ["full", pytest.param("none", marks=pytest.mark.slow)])
def test_activation_memory_does_not_grow_with_the_microbatches(remat):
    """1F1B: a stage holds at most 2P - 1 microbatches' inputs whatever M (GPipe's autodiff held all M + P - 1).
    From 16 to 64 microbatches of 2 sequences on 4 stages the compiled step's temporaries may grow by less than
    4 stage inputs (of 16 KB each); keeping every microbatch's would add 48 of them, or 48 x 2 layer inputs."""
    temp = {}
    for accum in (16, 64):
        tr = trainer({"pipe": 4}, micro_batch_size=2, grad_accum_steps=accum,
                     model=MODEL.replace(remat_policy=remat))
        assert tr.microbatches == accum
        compiled = tr.step.lower(tr.abstract_state(), tr.abstract_batch()).compile()
        temp[accum] = compiled.memory_analysis().temp_size_in_bytes
    stage_input = 2 * 32 * 64 * 4
    assert temp[64] - temp[16] < 4 * stage_input


def test_pipeline_layout_checks():
    with pytest.raises(Exception, match="pipe_microbatches=3 must be a multiple of grad_accum_steps=2"):
        trainer({"pipe": 2}, grad_accum_steps=2, pipe_microbatches=3)
    assert bubble_fraction(4, 32) == pytest.approx(3 / 35)
    with pytest.raises(Exception, match="remat_policy=dots_saveable with pipe=2: the pipeline recomputes once"):
        trainer({"pipe": 2}, model=MODEL.replace(remat_policy="dots_saveable"))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_and_fp32_gradient_sums_through_the_pipeline(reference, precision):
    """Training on (2,2,2) with 8 pipeline microbatches, summed in fp32 or bf16, against the fp32 single-device
    reference. In bf16 both carry bf16 compute error (about 2^-8 relative per tensor) and the bf16 sums add their
    rounding of 8 partial sums (unit roundoff 2^-9 each) on top, so they land further from the reference than the
    fp32 sums. In fp32 the fp32 sums are exact and the bf16 sums carry that rounding alone."""
    tokens, _, ref_grads = reference
    errors = {}
    for dtype in ("float32", "bfloat16"):
        tr = trainer(dict(data=2, pipe=2, tensor=2), pipe_microbatches=8, precision=precision, grad_accum_dtype=dtype)
        state = tr.init(jax.random.key(0))
        _, grads = tr.grads(state.params, tr.put_batch(tokens))
        errors[dtype] = float(np.sqrt(sum(np.sum((np.asarray(g) - r) ** 2) for g, r in
                                          zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
                                      / sum(np.sum(r ** 2) for r in jax.tree.leaves(ref_grads))))
    print(precision, errors)
    if precision == "bf16":
        assert errors["float32"] <= 2**-6 and errors["bfloat16"] <= 2**-5
    else:
        assert errors["float32"] <= 1e-5 and 2**-12 <= errors["bfloat16"] <= 2**-7
    assert errors["bfloat16"] > errors["float32"]
