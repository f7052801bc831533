"""Checkpoints of a training run, and the checks a resume makes before it trusts one.

`Saver` writes the whole train state with JSON metadata (the config, the data position, a fingerprint of every
tensor, and a probe: the fp32 logits of a fixed prompt), never a state whose probe is not finite. `restore`
checks, in order: the settings a resumed run must keep, readability, every tensor's fingerprint (corruption,
named by tensor), then the probe (the model code computes what it computed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from neox_jax import checkpoint as ckpt
from neox_jax.atomic import atomic_path
from neox_jax.config import TrainConfig, model_differences
from neox_jax.distributed import is_primary
from neox_jax.errors import ConfigError, TrainingError
from neox_jax.model import abstract_model
from neox_jax.train import Trainer, TrainState

PROBE_TOKENS = 16


def probe_tokens(vocab_size: int) -> np.ndarray:
    return (np.arange(PROBE_TOKENS, dtype=np.int64)[None] * 7919 + 11) % vocab_size


def fp32_weights(state: TrainState):
    """The weights at full precision: the master copy when there is one."""
    return state.master if state.master is not None else state.params


def make_probe(model_cfg, mesh):
    """A compiled function: train state -> fp32 logits of a fixed prompt, replicated on every process; stored
    with each checkpoint and checked on restore."""
    fp32 = model_cfg.replace(dtype="float32", param_dtype="float32")
    graphdef = abstract_model(fp32)[0]
    tokens = probe_tokens(fp32.vocab_size)
    logits = jax.jit(lambda w: nnx.merge(graphdef, w)(tokens)[0, :, :8], out_shardings=NamedSharding(mesh, P()))
    return lambda state: np.asarray(logits(fp32_weights(state)), np.float64)


class Saver:
    """Checkpoints in `cfg.save`: the state, and JSON metadata with the config, the data position and the probe."""

    def __init__(self, cfg: TrainConfig, trainer: Trainer):
        self.cfg, self.trainer = cfg, trainer
        self.checkpointer = ckpt.TrainCheckpointer(cfg.save, cfg.keep_last, cfg.keep_every) if cfg.save else None
        self.probe = make_probe(cfg.model, trainer.mesh)  # compiled once, used at every save
        self.fingerprints = ckpt.make_fingerprinter(trainer.mesh)
        self.directory = str(self.checkpointer.directory) if self.checkpointer else None
        if self.checkpointer and cfg.tokenizer and is_primary():  # the run carries its tokenizer
            kept = self.checkpointer.directory / "tokenizer.json"
            if Path(cfg.tokenizer).is_file() and not kept.exists():
                with atomic_path(kept) as tmp:
                    shutil.copyfile(cfg.tokenizer, tmp)

    def latest_step(self) -> int | None:
        return self.checkpointer.latest_step() if self.checkpointer else None

    def restore(self, step: int) -> TrainState:
        """The state at `step` on this run's mesh, after three checks: the settings a resumed run must keep, then
        every tensor's fingerprint (corruption), then the probe (the model computes what it computed)."""
        c = self.checkpointer
        where = f"{c.directory}/{step}"
        older = [s for s in c.all_steps() if s < step]
        way_out = (f"move {where} away to resume from step {max(older)}" if older else
                   f"move {where} away to start afresh")
        with ckpt.readable(where, way_out):
            meta = c.read_meta(step)
            self.check_settings(meta, where)
            state = c.restore(step, self.trainer.abstract_state_with_shardings())
        if "fingerprints" in meta:
            got = self.fingerprints(state)
            bad = [k for k, v in meta["fingerprints"].items() if got.get(k) != v]
            if bad:
                raise ckpt.CheckpointMismatchError(
                    f"checkpoint {where} is corrupt: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
                    f"differ{'s' if len(bad) == 1 else ''} from the fingerprint saved with it; {way_out}")
        got, want = self.probe(state), np.asarray(meta["probe"], np.float64)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-4):
            diff = np.abs(got - want).max() if got.shape == want.shape else float("inf")
            raise ckpt.CheckpointMismatchError(
                f"checkpoint {where} failed its integrity probe: the logits of the fixed prompt differ "
                f"from those saved with it by {diff:.3g}, though every tensor matches its fingerprint: the model "
                f"code computes differently from the version that saved it (or the checkpoint is corrupt); {way_out}")
        return state

    # settings a resumed run must keep: they define the model's function or the order of the data
    KEPT = ("seed", "seq_length", "data_paths", "data_weights", "split")

    def check_settings(self, meta: dict, where: str):
        stored, now = meta["config"], self.cfg.to_dict()
        changed = [(k, stored[k], now[k]) for k in self.KEPT if k in stored and _plain(stored[k]) != _plain(now[k])]
        changed += [(f"model.{k}", v, w) for k, v, w in model_differences(stored["model"], now["model"])]
        batch = meta["samples_consumed"] // max(meta["step"], 1)
        if meta["step"] and batch != self.trainer.global_batch_size:
            changed.append(("global batch (micro_batch_size x grad_accum_steps x mesh data)", batch,
                            self.trainer.global_batch_size))
        if changed:
            raise ConfigError(
                f"checkpoint {where} was written with other settings than this run's: "
                + "; ".join(f"{k} was {v!r}, now {w!r}" for k, v, w in changed)
                + ". A resumed run must keep them: set them back, or give another `save` folder to start afresh")

    def save(self, step: int, state: TrainState, wait: bool = False):
        if self.checkpointer is None:
            return
        probe = self.probe(state)
        if not np.isfinite(probe).all():
            raise TrainingError(f"step {step}: the weights are not finite; not saved (the last checkpoint stays)")
        meta = {"step": step, "samples_consumed": step * self.trainer.global_batch_size, "seed": self.cfg.seed,
                "config": self.cfg.to_dict(), "probe": probe.tolist(), "fingerprints": self.fingerprints(state),
                "mesh": dict(self.trainer.mesh_shape), "processes": jax.process_count()}
        self.checkpointer.save(step, state, meta)
        if wait:
            self.checkpointer.wait()

    def close(self):
        if self.checkpointer:
            self.checkpointer.close()


def _plain(value):
    """Lists and tuples alike (JSON keeps no tuples)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
