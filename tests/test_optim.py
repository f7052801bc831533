"""Schedules, weight-decay mask, DeepSpeed's dynamic loss scale, and fp16 steps that skip on overflow."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.config import NeoXConfig, TrainConfig
from neox_jax.optim import LossScale, decay_mask, schedule
from neox_jax.sharding import make_mesh
from neox_jax.train import Trainer


def lr_at(cfg, n):
    return float(schedule(cfg)(n))


def test_current_neox_schedules():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=0.1, train_iters=1000, decay_style="cosine")
    assert lr_at(cfg, 0) == 0.0 and lr_at(cfg, 50) == pytest.approx(5e-4)
    assert lr_at(cfg, 100) == pytest.approx(1e-3)
    assert lr_at(cfg, 550) == pytest.approx(1e-4 + 0.9e-3 / 2 * (math.cos(math.pi * 0.5) + 1))
    assert lr_at(cfg, 1000) == pytest.approx(1e-4) and lr_at(cfg, 5000) == pytest.approx(1e-4)
    lin = cfg.replace(decay_style="linear")
    assert lr_at(lin, 400) == pytest.approx(1e-3 * (1 - 300 / 900))
    assert lr_at(lin, 990) == pytest.approx(1e-4)  # clamped at min_lr
    exp = cfg.replace(decay_style="exponential")
    assert lr_at(exp, 550) == pytest.approx(1e-3 * math.exp(-0.693 * 0.5), rel=1e-5)
    assert lr_at(cfg.replace(decay_style="constant", warmup=0), 777) == pytest.approx(1e-3)
    assert lr_at(cfg.replace(warmup=30), 15) == pytest.approx(5e-4)  # warmup in steps


def test_legacy_cosine_reproduces_pythia():
    """GPT-NeoX v1.0: lr = start/2 * (cos(pi * (n - w) / end) + 1), clamped at min_lr (Pythia: min = lr / 10)."""
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=0.01, train_iters=143000, legacy_schedule=True)
    w, end = 1430, 143000
    for n in (0, 715, 1430, 2000, 50000, 100000, 120000, 143000):
        want = 1e-3 * n / w if n <= w else max(1e-3 / 2 * (math.cos(math.pi * (n - w) / end) + 1), 1e-4)
        assert lr_at(cfg, n) == pytest.approx(want, rel=1e-5), n
    # the legacy curve reaches min_lr near step 115k and stays there (the documented quirk)
    assert lr_at(cfg, 114000) > 1e-4 and lr_at(cfg, 117000) == pytest.approx(1e-4)


def test_no_weight_decay_on_biases_and_layernorms():
    params = {"embed_in": {"embedding": 0}, "layers": {"attention": {"dense": {"kernel": 0, "bias": 0}},
                                                        "input_layernorm": {"scale": 0, "bias": 0}}}
    mask = decay_mask(params)
    assert mask["embed_in"]["embedding"] and mask["layers"]["attention"]["dense"]["kernel"]
    assert not mask["layers"]["attention"]["dense"]["bias"] and not mask["layers"]["input_layernorm"]["scale"]


class DeepSpeedScaler:
    """DeepSpeed's DynamicLossScaler.update_scale, transcribed as the reference."""

    def __init__(self, power, window, hysteresis, min_scale):
        self.cur_scale, self.cur_iter, self.last_overflow_iter = 2.0 ** power, 0, -1
        self.window, self.delayed_shift, self.cur_hysteresis, self.min_scale = window, hysteresis, hysteresis, min_scale

    def update_scale(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / 2, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if (self.cur_iter - self.last_overflow_iter) % self.window == 0:
                self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= 2
        self.cur_iter += 1


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
def test_loss_scale_follows_deepspeed(hysteresis):
    cfg = TrainConfig(initial_scale_power=4, loss_scale_window=3, hysteresis=hysteresis, min_loss_scale=2.0)
    ref, ours = DeepSpeedScaler(4, 3, hysteresis, 2.0), LossScale.initial(cfg)
    rng = np.random.RandomState(0)
    overflows = [True, False, True, True, True, True, True] + list(rng.rand(60) < 0.3) + [False] * 10
    update = jax.jit(lambda s, o: s.update(o, cfg))
    for i, overflow in enumerate(overflows):
        ref.update_scale(overflow)
        ours = update(ours, jnp.asarray(overflow))
        assert float(ours.scale) == ref.cur_scale, i
        assert int(ours.hysteresis) == ref.cur_hysteresis, i
    assert int(ours.skipped) == sum(overflows)
    assert float(LossScale.initial(cfg).scale) == 16.0


class OverflowAt(Trainer):
    """A Trainer whose gradients turn infinite when a batch starts with token 63: overflow on demand."""

    POISON = jnp.inf

    def _grads_and_report(self, params, batch, loss_scale=1.0, reference=None, step=0):
        loss, grads, report = super()._grads_and_report(params, batch, loss_scale, reference, step)
        poison = jnp.where(batch["tokens"][0, 0, 0] == 63, self.POISON, 0.0)
        return loss, jax.tree.map(lambda g: g + poison, grads), report


def test_fp16_steps_with_overflow_are_skipped_and_counted():
    model = NeoXConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=32)
    cfg = TrainConfig(model=model, seq_length=16, micro_batch_size=8, precision="fp16", initial_scale_power=8,
                      loss_scale_window=2, hysteresis=2, warmup=0, lr=1e-3, mesh={"data": 2, "tensor": 2})
    tr = OverflowAt(cfg, make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4]))
    state = tr.init(jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, 63, tr.batch_shape())
    good, bad = tr.put_batch(tokens), tr.put_batch(np.where(np.arange(tokens.size).reshape(tokens.shape) == 0, 63,
                                                            tokens))
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float16
    inject = [False, False, True, True, False, True, False, False, False]
    ref = DeepSpeedScaler(8, 2, 2, 1.0)
    for step, overflow in enumerate(inject):
        before = jax.tree.map(np.asarray, (state.master, state.opt_state, state.updates))
        state, metrics = tr.step(state, bad if overflow else good)
        after = jax.tree.map(np.asarray, (state.master, state.opt_state, state.updates))
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
        assert same == overflow, step  # weights, moments and the update count move only on good steps
        ref.update_scale(overflow)
        assert float(state.loss_scale.scale) == ref.cur_scale, step
        assert np.isfinite(jax.tree.leaves(after)[0]).all()
    assert int(state.loss_scale.skipped) == 3 and int(metrics["skipped"]) == 3
    assert int(state.step) == len(inject)  # the data position advances on skipped steps too
    assert int(state.updates) == len(inject) - 3


class NaNAt(OverflowAt):
    POISON = jnp.nan


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_steps_are_skipped_in_fp32_and_bf16(precision):
    model = NeoXConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=32)
    cfg = TrainConfig(model=model, seq_length=16, micro_batch_size=4, precision=precision, warmup=0, lr=1e-3,
                      mesh={"data": 2, "tensor": 2})
    tr = NaNAt(cfg, make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4]))
    state = tr.init(jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, 63, tr.batch_shape())
    good, bad = tr.put_batch(tokens), tr.put_batch(np.where(np.arange(tokens.size).reshape(tokens.shape) == 0, 63,
                                                            tokens))
    for step, poisoned in enumerate([False, True, True, False]):
        before = jax.tree.map(np.asarray, (state.params, state.master, state.opt_state, state.updates))
        state, metrics = tr.step(state, bad if poisoned else good)
        after = jax.tree.map(np.asarray, (state.params, state.master, state.opt_state, state.updates))
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
        assert same == poisoned, step
        assert np.isfinite(float(metrics["grad_norm"])) != poisoned
        assert all(np.isfinite(x.astype(np.float32)).all() for x in jax.tree.leaves(after))
    assert (int(state.step), int(state.updates)) == (4, 2)
