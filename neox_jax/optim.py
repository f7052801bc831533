"""GPT-NeoX's optimizer recipe: global-norm clipping, AdamW with decay on matrices and embeddings only
(not on biases or LayerNorm), GPT-NeoX's learning-rate schedules, and DeepSpeed's dynamic fp16 loss scale."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from neox_jax.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate at optimizer step n, as GPT-NeoX's AnnealingLR computes it.

    Current GPT-NeoX: warmup `lr * n / w`, then over (n - w) / (end - w):
        cosine       min_lr + (lr - min_lr) / 2 * (cos(pi * t) + 1)
        linear       lr * (1 - t)
        exponential  lr * exp(-0.693 * t)
        constant     lr
    Legacy (GPT-NeoX v1.0, what Pythia and the 20B trained with): with m = min(n, end - w) - w,
        cosine       lr / 2 * (cos(pi * m / end) + 1)
        linear       lr * (end - m) / end
        exponential  lr * exp(-0.693 * m / end)
    Both are clamped at min_lr after warmup. `end` is lr_decay_iters (default train_iters).
    """
    lr, min_lr, w, end = cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters
    style, legacy = cfg.decay_style, cfg.legacy_schedule

    def at(step):
        n = jnp.asarray(step, jnp.float32)
        if legacy:  # decays towards 0 over `end` steps; min_lr only clamps
            t, floor = (jnp.minimum(n, end - w) - w) / end, 0.0
        else:
            t, floor = jnp.clip((n - w) / max(end - w, 1), 0.0, 1.0), min_lr
        decayed = {
            "cosine": floor + (lr - floor) / 2 * (jnp.cos(math.pi * t) + 1),
            "linear": lr * (1 - t),
            "exponential": lr * jnp.exp(-0.693 * t),
            "constant": jnp.full((), lr, jnp.float32),
        }[style]
        decayed = jnp.maximum(decayed, min_lr)
        return decayed if w == 0 else jnp.where(n <= w, lr * n / w, decayed)

    return at


def decay_mask(params):
    """True for the tensors that get weight decay: kernels and embeddings, not biases or LayerNorm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    b1, b2 = cfg.betas
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule(cfg), b1=b1, b2=b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


# ---- fp16 dynamic loss scaling --------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LossScale:
    """DeepSpeed's DynamicLossScaler state, as arrays so the jitted step updates it."""

    scale: jax.Array
    iteration: jax.Array
    last_overflow: jax.Array
    hysteresis: jax.Array
    skipped: jax.Array  # total skipped steps
    skipped_in_a_row: jax.Array

    @classmethod
    def initial(cls, cfg: TrainConfig) -> "LossScale":
        i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
        return cls(scale=jnp.asarray(2.0 ** cfg.initial_scale_power, jnp.float32), iteration=i32(0),
                   last_overflow=i32(-1), hysteresis=i32(cfg.hysteresis), skipped=i32(0), skipped_in_a_row=i32(0))

    def update(self, overflow: jax.Array, cfg: TrainConfig) -> "LossScale":
        """On overflow: spend one unit of hysteresis, or halve the scale (not below min) when none is left.
        Without: double the scale every `loss_scale_window` iterations since the last overflow, and restore
        the hysteresis then."""
        shrink = overflow & ((cfg.hysteresis == 1) | (self.hysteresis == 1))
        grow = ~overflow & ((self.iteration - self.last_overflow) % cfg.loss_scale_window == 0)
        scale = jnp.where(shrink, jnp.maximum(self.scale / 2, cfg.min_loss_scale),
                          jnp.where(grow, self.scale * 2, self.scale))
        hysteresis = jnp.where(overflow & ~shrink, self.hysteresis - 1,
                               jnp.where(grow, cfg.hysteresis, self.hysteresis))
        return LossScale(scale=scale, iteration=self.iteration + 1,
                         last_overflow=jnp.where(overflow, self.iteration, self.last_overflow),
                         hysteresis=hysteresis.astype(jnp.int32), skipped=self.skipped + overflow,
                         skipped_in_a_row=jnp.where(overflow, self.skipped_in_a_row + 1, 0))
