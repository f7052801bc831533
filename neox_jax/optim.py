"""The optimizer of GPT-NeoX's recipe as an optax chain: global-norm clipping, then AdamW with weight
decay on matrices and embeddings only (not on biases or LayerNorm), under a learning-rate schedule."""

from __future__ import annotations

import jax
import optax

from neox_jax.config import ConfigError, TrainConfig


def warmup_steps(cfg: TrainConfig) -> int:
    return int(cfg.warmup * cfg.train_iters) if cfg.warmup < 1 else int(cfg.warmup)


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup, then `decay_style` from lr to min_lr at train_iters."""
    warm = warmup_steps(cfg)
    decay = max(cfg.train_iters - warm, 1)
    if cfg.decay_style == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.min_lr / cfg.lr if cfg.lr else 0.0)
    elif cfg.decay_style == "linear":
        after = optax.linear_schedule(cfg.lr, cfg.min_lr, decay)
    elif cfg.decay_style == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        raise ConfigError(f"decay_style={cfg.decay_style!r}: choose cosine, linear or constant")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


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
