"""Dropout: masks drawn from each row's place (seed, step, microstep, row, layer), the same on every layout and after a
resume; the rate's fraction dropped; nothing dropped in evaluation, generation, or at rate 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax import dropout
from neox_jax.config import NeoXConfig, TrainConfig
from neox_jax.errors import ConfigError
from neox_jax.sharding import make_mesh
from neox_jax.train import Trainer

from .conftest import max_diff

MODEL = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
             max_position_embeddings=64)


def trainer(mesh_shape, rates=(0.1, 0.1), **changes):
    model = NeoXConfig(**MODEL, hidden_dropout=rates[0], attention_dropout=rates[1],
                       **changes.pop("model", {}))
    n = int(np.prod(list(mesh_shape.values())))
    cfg = TrainConfig(model=model, mesh=mesh_shape, seq_length=32, micro_batch_size=4 // mesh_shape.get("data", 1),
                      grad_accum_steps=2, **changes)
    return Trainer(cfg, make_mesh(mesh_shape, jax.devices()[:n]))


def grads(tr, step=3, seed=0):
    state = tr.init(jax.random.key(0))
    tokens = np.random.RandomState(seed).randint(0, 256, tr.batch_shape())
    loss, g = tr.grads(state.params, tr.put_batch(tokens), 1.0, None, step)
    return float(loss), jax.tree.map(np.asarray, g)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape, changes", [
    ({"data": 2, "pipe": 2, "tensor": 2}, {"model": {"remat_policy": "full"}}),
    ({"data": 4, "tensor": 2}, {"zero_stage": 3, "model": {"use_parallel_residual": False}}),
], ids=["data2xpipe2xtensor2-remat", "data4xtensor2-fsdp-sequential"])
def test_every_layout_draws_the_masks_one_device_draws(mesh_shape, changes):
    """Loss and gradients under dropout equal one device's, on the 1F1B pipeline (whose backward recomputes each
    layer, masks included) and under FSDP with the sequential residual; and they are not the undropped ones."""
    model = changes.get("model", {})
    want_loss, want = grads(trainer({"data": 1}, model=model))
    loss, got = grads(trainer(mesh_shape, **changes))
    assert abs(loss - want_loss) <= 1e-5 and max_diff(got, want) <= 1e-5
    plain_loss, plain = grads(trainer({"data": 1}, rates=(0, 0), model=model))
    assert abs(plain_loss - want_loss) > 1e-3 and max_diff(plain, want) > 1e-3


@pytest.mark.slow
def test_masks_change_with_the_step_and_repeat_with_it():
    tr = trainer({"data": 2, "tensor": 2})
    (a, ga), (b, gb), (c, _) = grads(tr, step=3), grads(tr, step=3), grads(tr, step=4)
    assert a == b and max_diff(ga, gb) == 0.0 and a != c


def test_the_fraction_dropped_is_the_rate():
    keys = dropout.row_keys(7, 0, 1, 64)[0]
    for rate in (0.1, 0.5):
        out = np.asarray(jax.jit(lambda x: dropout.dropout(x, rate, keys, 0))(jnp.ones((64, 32, 64))))
        dropped = float((out == 0).mean())
        assert abs(dropped - rate) < 4 * np.sqrt(rate * (1 - rate) / out.size)  # 4 sigma
        assert np.all(out[out != 0] == np.float32(1 / (1 - rate)))
    rows = np.asarray(dropout.dropout(jnp.ones((2, 1000)), 0.5, dropout.row_keys(7, 0, 1, 2)[0], 0))
    assert not np.array_equal(rows[0], rows[1])  # each row its own mask


@pytest.mark.slow
def test_evaluation_and_generation_drop_nothing():
    tr, plain = trainer({"data": 2, "tensor": 2}), trainer({"data": 2, "tensor": 2}, rates=(0, 0))
    state = tr.init(jax.random.key(0))
    batch = tr.put_batch(np.random.RandomState(1).randint(0, 256, tr.batch_shape()))
    assert float(tr.eval_loss(state.params, batch)) == float(plain.eval_loss(state.params, batch))
    from neox_jax.generation import generate
    from neox_jax.model import with_params

    params = jax.tree.map(np.asarray, state.params)
    prompt = [[5, 6, 7, 8]]
    assert generate(with_params(tr.cfg.model, params), prompt, max_new_tokens=6) == generate(
        with_params(plain.cfg.model, params), prompt, max_new_tokens=6)


def test_rate_zero_compiles_the_step_without_random_numbers():
    def lowered(rates):
        tr = trainer({"data": 2, "tensor": 2}, rates=rates)
        return tr.step.lower(tr.abstract_state_with_shardings(), tr.abstract_batch()).as_text()

    assert "threefry" not in lowered((0, 0)) and "threefry" in lowered((0.1, 0))


def test_fused_attention_kernels_are_refused_with_attention_dropout():
    for backend in ("xla", "cudnn"):
        with pytest.raises(ConfigError, match=f"attention='{backend}' with attention_dropout=0.1: JAX's fused"):
            NeoXConfig(**MODEL, attention=backend, attention_dropout=0.1)
    NeoXConfig(**MODEL, attention="cudnn", hidden_dropout=0.1)  # hidden dropout is no kernel's business
    with pytest.raises(ConfigError, match=r"hidden_dropout=1.0: a dropout probability must be in \[0, 1\)"):
        NeoXConfig(**MODEL, hidden_dropout=1.0)


@pytest.mark.slow
def test_a_run_with_dropout_resumes_bit_for_bit(tmp_path):
    from neox_jax.data.indexed import IndexedDatasetWriter
    from neox_jax.loop import train

    with IndexedDatasetWriter(tmp_path / "text", np.int32) as w:
        rng = np.random.RandomState(0)
        for _ in range(64):
            w.add_document(rng.randint(1, 256, rng.randint(10, 60)))
    cfg = TrainConfig.from_dict(dict(
        model={**MODEL, "hidden_dropout": 0.1, "attention_dropout": 0.1}, mesh={"data": 2, "pipe": 2, "tensor": 2},
        seq_length=32, micro_batch_size=2, train_iters=6, lr=1e-3, data_paths=[str(tmp_path / "text")],
        split="100,0,0", save=str(tmp_path / "run"), save_interval=6, log_interval=1, eval_interval=100))
    whole = train(cfg, show_progress=False)
    stopped = cfg.replace(save=str(tmp_path / "stopped"))
    train(stopped, max_steps=3, show_progress=False)
    resumed = train(stopped, show_progress=False)
    assert {s: resumed.losses[s] for s in range(3, 6)} == {s: whole.losses[s] for s in range(3, 6)}
    assert max_diff(resumed.state.params, whole.state.params) == 0.0
