"""The training loop: data, steps, evaluation, checkpoints, metrics, preemption.

`train(cfg)` resumes from the latest complete checkpoint in `cfg.save` when there is one (onto whatever mesh
this run uses), checks the checkpoint's integrity probe, and continues bit for bit: the batch for step n is a
pure function of (seed, n) and the state holds everything else. SIGTERM or SIGINT finishes the step in
flight, saves a checkpoint at it and returns.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neox_jax import checkpoint as ckpt
from neox_jax.config import ConfigError, TrainConfig
from neox_jax.data.dataset import GlobalBatches, build_split_datasets
from neox_jax.data.loader import Loader
from neox_jax.flops import flops_6n, flops_neox, peak_tflops
from neox_jax.metrics import MetricsLogger
from neox_jax.model import abstract_model, with_params
from neox_jax.progress import progress
from neox_jax.sharding import make_mesh
from neox_jax.train import Trainer, TrainState

PROBE_TOKENS = 16


class TrainingError(RuntimeError):
    pass


@dataclasses.dataclass
class RunResult:
    state: TrainState
    losses: dict[int, float]  # step -> training loss
    eval_losses: dict[int, float]
    last_step: int  # steps completed
    stopped_by: str | None  # the signal's name when stopped early
    checkpoint_dir: str | None
    tensorboard_dir: str | None
    compile_seconds: float


def probe_tokens(vocab_size: int) -> np.ndarray:
    return (np.arange(PROBE_TOKENS, dtype=np.int64)[None] * 7919 + 11) % vocab_size


def fp32_weights(state: TrainState):
    """The weights at full precision: the master copy when there is one."""
    return state.master if state.master is not None else state.params


def make_probe(model_cfg):
    """A compiled function: fp32 weights -> logits of a fixed prompt, stored with each checkpoint and checked
    on restore."""
    fp32 = model_cfg.replace(dtype="float32", param_dtype="float32")
    graphdef = abstract_model(fp32)[0]
    tokens = jnp.asarray(probe_tokens(fp32.vocab_size))
    logits = jax.jit(lambda w: nnx.merge(graphdef, w)(tokens)[0, :, :8])
    return lambda state: np.asarray(jax.device_get(logits(fp32_weights(state))), np.float64)


def print_sample(state: TrainState, cfg: TrainConfig, print_fn, max_new_tokens: int = 48):
    """A greedy continuation of `sample_prompt` from the trained weights."""
    from neox_jax.data.tokenizer import NeoXTokenizer
    from neox_jax.generate import generate

    tok = NeoXTokenizer(cfg.tokenizer)
    weights = jax.tree.map(jnp.asarray, jax.device_get(fp32_weights(state)))
    model = with_params(cfg.model.replace(dtype="float32", param_dtype="float32"), weights)
    prompt = tok.encode(cfg.sample_prompt)
    new = generate(model, [prompt], max_new_tokens, stop_ids=[tok.eod_id])[0]
    print_fn(f"\nsample (greedy, {len(new)} tokens):\n{cfg.sample_prompt}{tok.decode([t for t in new if t != tok.eod_id])}\n")


def _abstract_with_shardings(trainer: Trainer):
    abstract = trainer.abstract_state()
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        trainer.state_shardings)


def _datasets(cfg: TrainConfig, global_batch: int):
    if not cfg.data_paths:
        raise ConfigError("data_paths is empty: give the .bin/.idx prefixes to train on "
                          "(e.g. data/stdlib/stdlib_text_document after `neox-jax corpus`)")
    valid_samples = (cfg.train_iters // cfg.eval_interval + 1) * cfg.eval_iters * global_batch
    train, valid, _ = build_split_datasets(list(cfg.data_paths), list(cfg.data_weights) or None, cfg.split,
                                           [cfg.train_iters * global_batch, valid_samples, 0], cfg.seq_length,
                                           cfg.seed)
    if train is None:
        raise ConfigError(f"split={cfg.split!r} leaves no training documents")
    return train, valid


def train(cfg: TrainConfig, *, max_steps: int | None = None, show_progress: bool = True,
          print_fn=print) -> RunResult:
    """Train to `cfg.train_iters` (or for at most `max_steps` more steps in this call), resuming from the
    latest checkpoint in `cfg.save` when there is one."""
    mesh = make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    dp = mesh.shape["data"]
    B = trainer.global_batch_size
    train_ds, valid_ds = _datasets(cfg, B)
    batches = GlobalBatches(train_ds, cfg.grad_accum_steps, cfg.micro_batch_size, dp)
    valid_batches = GlobalBatches(valid_ds, cfg.grad_accum_steps, cfg.micro_batch_size, dp) if valid_ds else None

    checkpointer = ckpt.TrainCheckpointer(cfg.save, cfg.keep_last, cfg.keep_every) if cfg.save else None
    tb_dir = cfg.tensorboard_dir or (str(Path(cfg.save) / "tensorboard") if cfg.save else "")
    logger = MetricsLogger(tb_dir, cfg.wandb_project, cfg.to_dict())

    probe = make_probe(cfg.model)  # compiled once, used at every save
    start = 0
    if checkpointer and checkpointer.latest_step() is not None:
        start = checkpointer.latest_step()
        meta = checkpointer.read_meta(start)
        state = checkpointer.restore(start, _abstract_with_shardings(trainer))
        got = probe(state)
        want = np.asarray(meta["probe"], np.float64)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-4):
            diff = np.abs(got - want).max() if got.shape == want.shape else float("inf")
            raise ckpt.CheckpointMismatchError(
                f"checkpoint {checkpointer.directory}/{start} failed its integrity probe: the logits of the fixed "
                f"prompt differ from those saved with it by {diff:.3g}; the checkpoint is corrupt. Move that "
                "step's folder away to resume from the one before it.")
        print_fn(f"resumed from {checkpointer.directory}/{start} (step {start}, probe ok) on mesh {dict(mesh.shape)}")
    else:
        state = trainer.init(jax.random.key(cfg.seed))
    if start >= cfg.train_iters:
        print_fn(f"already trained {start} of {cfg.train_iters} steps: nothing to do")

    def save(step: int, wait: bool = False):
        if checkpointer is None:
            return
        meta = {"step": step, "samples_consumed": step * B, "seed": cfg.seed, "config": cfg.to_dict(),
                "probe": probe(state).tolist(), "mesh": dict(mesh.shape)}
        checkpointer.save(step, state, meta)
        if wait:
            checkpointer.wait()

    stop = {"signal": None}
    handlers = {}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: the caller handles signals
            pass

    t0 = time.perf_counter()
    step_fn = trainer.step.lower(_abstract_with_shardings(trainer), trainer.abstract_batch()).compile()
    compile_seconds = time.perf_counter() - t0
    print_fn(f"compiled the train step in {compile_seconds:.1f}s: {cfg.model.num_params / 1e6:.1f}M parameters, "
             f"mesh {dict(mesh.shape)}, global batch {B} x {cfg.seq_length} tokens, {cfg.precision}")
    eval_fn = trainer.eval_loss

    devices = mesh.size
    peak = peak_tflops(jax.devices()[0].device_kind, cfg.peak_tflops)
    tokens_per_step = B * cfg.seq_length
    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}
    last = {"time": time.perf_counter(), "line": ""}
    pending = None  # (step, metrics) of the step before: read after the next one is dispatched

    def record(step, metrics):
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        losses[step] = values["loss"]
        if values.get("skipped_in_a_row", 0) >= cfg.max_skipped_in_a_row:
            raise TrainingError(f"skipped {int(values['skipped_in_a_row'])} steps in a row because the fp16 "
                                f"gradients overflowed (loss scale {values['loss_scale']:g}): the run is diverging; "
                                "lower lr, or train in bf16")
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.train_iters:
            now = time.perf_counter()
            seconds = (now - last["time"]) / cfg.log_interval
            last["time"] = now
            values["step_time"] = seconds
            values["tokens_per_sec"] = tokens_per_step / seconds
            values["tflops_per_device_6n"] = flops_6n(cfg.model, cfg.seq_length, tokens_per_step) / seconds / devices / 1e12
            values["tflops_per_device_neox"] = flops_neox(cfg.model, cfg.seq_length, B) / seconds / devices / 1e12
            if peak:
                values["mfu_6n"] = values["tflops_per_device_6n"] / peak
                values["mfu_neox"] = values["tflops_per_device_neox"] / peak
            mem = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in mem:
                values["peak_memory_gb"] = mem["peak_bytes_in_use"] / 1e9
            logger.log(step + 1, values)
            last["line"] = (f"loss {values['loss']:.4f} lr {values['lr']:.2e} gnorm {values['grad_norm']:.2f} "
                            f"{values['tokens_per_sec']:,.0f} tok/s {seconds * 1e3:.0f} ms/step"
                            + (f" MFU {100 * values['mfu_6n']:.1f}%" if peak else "")
                            + (f" scale {values['loss_scale']:g} skipped {int(values['skipped'])}"
                               if "loss_scale" in values else ""))

    def evaluate(step):
        if valid_batches is None:
            return
        round_ = step // cfg.eval_interval
        total = 0.0
        for i in range(cfg.eval_iters):
            batch = jax.device_put(valid_batches.batch(round_ * cfg.eval_iters + i), trainer.batch_sharding)
            total += float(eval_fn(state.params, batch))
        loss = total / cfg.eval_iters
        eval_losses[step] = loss
        logger.log(step, {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))})
        print_fn(f"\nstep {step}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f}")

    last_done = start
    try:
        with Loader(batches, trainer.batch_sharding, cfg.seq_length, start_step=start) as loader:
            end = cfg.train_iters if max_steps is None else min(cfg.train_iters, start + max_steps)
            steps = range(start, end)
            for step in progress(steps, "training", total=len(steps), enabled=show_progress,
                                 stats=lambda _e: last["line"]):
                _, batch = next(loader)
                state, metrics = step_fn(state, batch)
                if pending is not None:
                    record(*pending)
                pending = (step, metrics)
                last_done = step + 1
                if last_done % cfg.eval_interval == 0:
                    evaluate(last_done)
                if stop["signal"]:
                    break
                if last_done % cfg.save_interval == 0 and last_done < end:
                    save(last_done)
            if pending is not None:
                record(*pending)
        if last_done > start:  # the final (or preempted) step, waited for
            save(last_done, wait=True)
        if cfg.sample_prompt and cfg.tokenizer and not stop["signal"]:
            print_sample(state, cfg, print_fn)
        if stop["signal"]:
            print_fn(f"\nstopped by {stop['signal']} after step {last_done}: checkpoint saved"
                     + (f" in {checkpointer.directory}/{last_done}; run the same command to resume" if checkpointer
                        else " (no `save` folder configured: nothing was saved)"))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if checkpointer:
            checkpointer.close()
        logger.close()
    return RunResult(state=state, losses=losses, eval_losses=eval_losses, last_step=last_done,
                     stopped_by=stop["signal"], checkpoint_dir=str(checkpointer.directory) if checkpointer else None,
                     tensorboard_dir=tb_dir or None, compile_seconds=compile_seconds)
