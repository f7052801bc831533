"""Sequence parallelism (neox_jax/sequence_parallel.py): loss and gradients equal one device's on every layout it
composes with, the compiled step's `tensor` collectives per layer are the design's, GPT-NeoX's key is read, and a
run with it resumes exactly and gives the same on two processes as on one. All but the key's reading compile steps
of several layouts: the slow tier (about 3.5 minutes)."""

import jax
import numpy as np
import pytest

from neox_jax import hlo, sequence_parallel
from neox_jax.config import NeoXConfig, TrainConfig
from neox_jax.errors import ConfigError
from neox_jax.plan import compile_partitioned
from neox_jax.sharding import make_mesh
from neox_jax.traffic import per_layer_allreduces
from neox_jax.train import Trainer

from .conftest import max_diff

MODEL = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, intermediate_size=128,
             max_position_embeddings=64)


def trainer(mesh_shape, precision="fp32", **model) -> Trainer:
    n = int(np.prod(list(mesh_shape.values())))
    cfg = TrainConfig(model=NeoXConfig(**{**MODEL, **model}), mesh=mesh_shape, seq_length=32,
                      micro_batch_size=4 // mesh_shape.get("data", 1), grad_accum_steps=2, precision=precision)
    return Trainer(cfg, make_mesh(mesh_shape, jax.devices()[:n]))


def random_params(tr: Trainer):
    """Every weight random, biases and LayerNorms included: a bias added on every device of the region, or a
    LayerNorm gradient left unsummed, shows."""
    leaves, tree = jax.tree.flatten(tr.abstract_params)
    rng = np.random.RandomState(0)
    values = [(rng.normal(size=x.shape) * 0.2 + (1.0 if x.ndim == 1 and i % 2 == 0 else 0.0)).astype(x.dtype)
              for i, x in enumerate(leaves)]
    return jax.device_put(jax.tree.unflatten(tree, values), tr.state_shardings.params)


def grads(tr: Trainer, step: int = 3):
    tokens = np.random.RandomState(1).randint(0, MODEL["vocab_size"], tr.batch_shape())
    loss, g = tr.grads(random_params(tr), tr.put_batch(tokens), 1.0, None, step)
    return float(loss), jax.tree.map(lambda x: np.asarray(x, np.float32), g)


_ONE_DEVICE = {}


def one_device(precision="fp32", **model):
    key = (precision, tuple(sorted(model.items())))
    if key not in _ONE_DEVICE:
        _ONE_DEVICE[key] = grads(trainer({"data": 1}, precision, **model))
    return _ONE_DEVICE[key]


LAYOUTS = [
    ({"tensor": 8}, dict(hidden_dropout=0.1, attention_dropout=0.1, remat_policy="selective")),
    ({"data": 2, "tensor": 4}, dict(use_parallel_residual=False, remat_policy="dots_saveable")),
    ({"data": 2, "pipe": 2, "tensor": 2}, dict(remat_policy="full", hidden_dropout=0.1, attention_dropout=0.1)),
]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape, model", LAYOUTS, ids=["tensor8-selective-dropout", "data2xtensor4-sequential",
                                                           "data2xpipe2xtensor2-remat-dropout"])
def test_loss_and_gradients_equal_one_device(mesh_shape, model):
    """fp32, 1e-5 of the largest gradient: (1,1,8) with dropout (masks of the whole sequence, each device its own
    heads') and selective recomputation (its backward gathers again), (2,1,4) with the sequential residual and a
    `dots` remat policy, (2,2,2) through the 1F1B pipeline (its stage inputs split along the sequence) with full
    recomputation and dropout."""
    want_loss, want = one_device(**model)
    tr = trainer(mesh_shape, sequence_parallel=True, **model)
    loss, got = grads(tr)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss) and max_diff(got, want) <= 1e-5 * scale


@pytest.mark.slow
def test_a_bias_added_on_every_device_fails_the_comparison(monkeypatch):
    """The reference can fail: without the row-parallel biases' first-device rule, their sum holds them t times."""
    monkeypatch.setattr(sequence_parallel, "ROW_PARALLEL_BIASES", ())
    want_loss, want = one_device()
    loss, got = grads(trainer({"data": 2, "tensor": 4}, sequence_parallel=True))
    assert abs(loss - want_loss) > 1e-3


@pytest.mark.slow
def test_bf16_is_as_close_to_fp32_as_one_device_in_bf16():
    """bf16's tolerance: sequence-parallel bf16 gradients differ from fp32 ones by no more than one device's bf16
    gradients do (within 50%: the reductions run in another order)."""
    _, exact = one_device()
    _, single = one_device("bf16")
    _, split = grads(trainer({"data": 2, "tensor": 4}, "bf16", sequence_parallel=True))
    assert max_diff(split, exact) <= 1.5 * max_diff(single, exact)


def elements(result: str) -> int:
    """Elements of an HLO result type such as "f32[4,32,64]"."""
    return int(np.prod([int(n) for n in result[result.index("[") + 1:result.index("]")].split(",") if n]))


def tensor_collectives(layers: int, **model):
    """The compiled step's `tensor` collectives on (1,1,4), by (kind, result type): calls per step."""
    tr = trainer({"tensor": 4}, num_layers=layers, **{"sequence_parallel": True, "remat_policy": "full", **model})
    _, text = compile_partitioned(tr.step.lower(tr.abstract_state(), tr.abstract_batch()))
    counts, sent = {}, 0.0
    for kind, axes, result, bytes_sent, calls in hlo.collectives(text, dict(tr.mesh.shape)):
        if axes == "tensor":
            key = (kind, result.split("{")[0])
            counts[key] = counts.get(key, 0) + calls
            sent += bytes_sent * calls
    return counts, sent


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel-residual", "sequential-residual"])
def test_each_layer_gathers_and_scatters_the_split_stream_as_designed(parallel):
    """Per layer and microbatch (the difference between a 4-layer and a 2-layer step, over 2 microsteps): all-gathers
    of [b, t, d] and reduce-scatters to [b, t/4, d] only, as many as the design's (parallel residual: forward one
    of each, the recomputed forward one gather, the backward one of each; sequential: twice that, less nothing), the
    bytes exactly the traffic model's; no weight and no attention scores gathered anywhere in the step."""
    b, t, d = 4, 32, MODEL["hidden_size"]
    two, sent_two = tensor_collectives(2, use_parallel_residual=parallel)
    four, sent_four = tensor_collectives(4, use_parallel_residual=parallel)
    per_layer = {k: (four.get(k, 0) - two.get(k, 0)) / (2 * 2) for k in set(two) | set(four)}
    per_layer = {k: v for k, v in per_layer.items() if v}
    stream, split = f"f32[{b},{t},{d}]", f"f32[{b},{t // 4},{d}]"
    forward = 1 if parallel else 2
    assert per_layer.pop(("all-gather", stream)) == 3 * forward
    assert per_layer.pop(("reduce-scatter", split)) == 3 * forward - 1
    assert all(kind == "all-reduce" and elements(shape) <= d for (kind, shape) in per_layer), per_layer
    activation = b * t * d * 4
    want = per_layer_allreduces(parallel, "full", sequence_parallel=True) * activation * 2 * 3 / 4
    small = sum(c * elements(s) * 4 * 2 * 3 / 4 for (_, s), c in per_layer.items())  # LayerNorm gradients
    assert (sent_four - sent_two) / 4 - small == pytest.approx(want, rel=1e-6)
    gathered = {shape for kind, shape in four if kind == "all-gather" and not shape.startswith("s32")}
    assert gathered == {stream}, gathered


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel-residual", "sequential-residual"])
def test_selective_recomputation_sends_what_the_traffic_model_says(parallel):
    """Without sequence parallelism, selective recomputation sums one branch again (the sequential residual's
    second LayerNorm reads the attention's; the parallel residual's too, as XLA compiles it): the all-reduces of
    [b, t, d] per layer and microbatch are the traffic model's count."""
    b, t, d = 4, 32, MODEL["hidden_size"]
    model = dict(use_parallel_residual=parallel, sequence_parallel=False, remat_policy="selective")
    two, four = tensor_collectives(2, **model)[0], tensor_collectives(4, **model)[0]
    key = ("all-reduce", f"f32[{b},{t},{d}]")
    assert (four[key] - two[key]) / (2 * 2) == per_layer_allreduces(parallel, "selective")


def test_gpt_neox_key_is_read_and_an_indivisible_sequence_is_refused(tmp_path):
    import yaml

    from neox_jax.convert import neox_yaml

    f = tmp_path / "sp.yml"
    f.write_text(yaml.safe_dump({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "seq_length": 30,
                                 "model_parallel_size": 4, "sequence_parallel": True, "pos_emb": "rotary",
                                 "no_weight_tying": True, "hidden_dropout": 0,
                                 "attention_dropout": 0, "weight_decay": 0.1, "train_micro_batch_size_per_gpu": 1,
                                 "train_iters": 1}))
    cfg = neox_yaml.train_config(f)
    assert cfg.model.sequence_parallel and cfg.mesh["tensor"] == 4
    with pytest.raises(ConfigError, match="sequence_parallel with seq_length=30: the sequence is split over mesh "
                                          "tensor=4, which does not divide it"):
        Trainer(cfg.replace(mesh={"data": 1, "pipe": 1, "tensor": 4}), make_mesh({"tensor": 4}, jax.devices()[:4]))


@pytest.mark.slow
def test_a_run_resumes_exactly_and_two_processes_equal_one(corpus, tmp_path):
    """(2,2,2) with sequence parallelism over tensor, pipelined, data across processes: a run stopped after 2 steps
    resumes to the uninterrupted run's losses and weights bit for bit, and 2 processes x 4 devices equal 1 x 8."""
    from neox_jax.loop import train

    from .conftest import TINY_MODEL
    from .test_multihost import config, finish, launch_train, logged_losses, saved_weights

    model = {**TINY_MODEL, "sequence_parallel": True}
    whole = train(config(corpus, tmp_path / "whole", model=model), show_progress=False)
    stopped = config(corpus, tmp_path / "stopped", model=model)
    assert train(stopped, max_steps=2, show_progress=False).last_step == 2
    resumed = train(stopped, show_progress=False)
    assert [resumed.losses[s] for s in (2, 3)] == [whole.losses[s] for s in (2, 3)]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed.state.params),
                 jax.tree.map(np.asarray, whole.state.params))

    (tmp_path / "two").mkdir()
    two = config(corpus, tmp_path / "two", model=model)
    finish(launch_train(two, tmp_path / "two"))
    losses = logged_losses(two)
    assert sorted(losses) == [0, 1, 2, 3]
    assert all(abs(losses[s] - whole.losses[s]) <= 1e-6 for s in losses), (losses, whole.losses)
    assert max_diff(saved_weights(two, 4), whole.state.params) <= 1e-6
