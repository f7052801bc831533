"""The training run: a flat loop over a few parts, each usable and testable alone.

    Console    what the run prints: process 0 only, a progress bar with the latest logged figures
    Recorder   step metrics -> losses, TensorBoard/wandb (process 0), the console line, stop conditions
    Evaluator  validation loss from each process's own rows
    Saver      checkpoints (written by every process, as Orbax requires) and the checks on resume (saving.py)
    StopVote   every reason to stop (a signal on any process) agreed by all processes once per step

`train(cfg)` resumes from the latest complete checkpoint in `cfg.save` when there is one (onto whatever mesh
this run uses) and continues bit for bit: the batch for step n is a pure function of (seed, n) and the state
holds everything else. SIGTERM or SIGINT on any process finishes the step in flight; every process then saves
that same step and returns (a second signal ends the process without saving; before the loop, with nothing
to save, a signal ends it at once: neox_jax/interrupts.py).

Metrics are read one step late, so the host never waits for the step it has just dispatched; before a
checkpoint they are read up to the step being saved, so a non-finite step is never saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from neox_jax import interrupts
from neox_jax.config import TrainConfig
from neox_jax.data.dataset import (GlobalBatches, build_pair_datasets, build_path_datasets, build_split_datasets,
                                   skipped_documents)
from neox_jax.data.loader import Loader, LocalBatches
from neox_jax.distributed import is_primary
from neox_jax.errors import ConfigError, TrainingError
from neox_jax.flops import flops_6n, flops_neox, peak_tflops
from neox_jax.metrics import MetricsLogger
from neox_jax.model import with_params
from neox_jax.profile import StepProfiler
from neox_jax.progress import bar
from neox_jax.runlock import lock_save_folder
from neox_jax.saving import Saver, fp32_weights
from neox_jax.sharding import make_mesh
from neox_jax.train import Trainer, TrainState

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


# ---- parts ------------------------------------------------------------------------------------------------


class Console:
    """Process 0 prints; the others stay quiet. `bar` is a tqdm bar (silent on the other processes)."""

    def __init__(self, print_fn=print, show_progress: bool = True):
        self.on = is_primary()
        self.print_fn = print_fn
        self.show_progress = show_progress and self.on

    def print(self, text: str):
        if self.on:
            (tqdm.write if self.print_fn is print else self.print_fn)(text)  # tqdm.write keeps a bar intact

    def bar(self, total: int):
        return bar("training", total, enabled=self.show_progress, unit="step")


class StopVote:
    """SIGTERM / SIGINT handlers, and one collective vote per step so that all processes stop on the same one.

    `vote()` is dispatched after each step (an all-reduce of every process's flag, no wait); its result is
    read with that step's metrics. One process needs no collective."""

    def __init__(self, mesh):
        self.local: int = 0  # the signal this process received
        self.multi = jax.process_count() > 1
        if self.multi:
            self.shape, self.n_local = (mesh.size,), len(mesh.local_devices)
            self.sharding = NamedSharding(mesh, P(mesh.axis_names))  # one flag per device
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
        self._deferred = interrupts.deferred(self._on_signal)  # a second signal ends the process (interrupts.py)

    def __enter__(self):
        self._deferred.__enter__()
        return self

    def __exit__(self, *exc):
        return self._deferred.__exit__(*exc)

    def _on_signal(self, signum):
        if not self.local and is_primary():
            print(f"\n{signal.Signals(signum).name}: finishing this step and saving it (send it again to stop at "
                  "once without saving)", file=sys.stderr, flush=True)
        self.local = signum

    def vote(self):
        if not self.multi:
            return self.local
        local = np.full((self.n_local,), self.local, np.int32)
        return self._max(jax.make_array_from_process_local_data(self.sharding, local, self.shape))

    @staticmethod
    def decided(vote) -> str | None:
        """The agreed signal's name, or None (blocks on the vote's step)."""
        signum = int(np.asarray(vote))
        return signal.Signals(signum).name if signum else None


class Recorder:
    """Reads a step's metrics (blocking on that step), keeps the loss, logs every `log_interval` steps, and
    raises TrainingError when the run cannot go on."""

    def __init__(self, cfg: TrainConfig, mesh, logger: MetricsLogger, global_batch: int, start_time: float,
                 warn=print):
        self.cfg, self.logger, self.warn = cfg, logger, warn
        self.devices = mesh.size
        self.device = mesh.local_devices[0]
        self.peak = peak_tflops(self.device.device_kind, cfg.peak_tflops)
        self.global_batch = global_batch
        self.tokens_per_step = global_batch * cfg.seq_length
        self.losses: dict[int, float] = {}
        self.nonfinite_in_a_row = 0  # fp32/bf16 (fp16 counts its skipped steps in the loss scale)
        self.last_time = start_time
        self.data_wait = 0.0  # seconds the loop waited for batches since the last log line
        self.line = ""

    def __call__(self, step: int, metrics) -> dict[str, float]:
        cfg = self.cfg
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.losses[step] = values["loss"]
        if values.get("skipped_in_a_row", 0) >= cfg.max_skipped_in_a_row:
            raise TrainingError(f"skipped {int(values['skipped_in_a_row'])} steps in a row because the fp16 "
                                f"gradients overflowed (loss scale {values['loss_scale']:g}): the run is diverging; "
                                "lower lr, or train in bf16 (max_skipped_in_a_row)")
        if cfg.precision != "fp16":
            finite = math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])
            self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
            what = f"step {step + 1}: loss {values['loss']}, gradient norm {values['grad_norm']}"
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise TrainingError(
                    f"{what}" + (f" ({self.nonfinite_in_a_row} non-finite steps in a row)"
                                 if self.nonfinite_in_a_row > 1 else "")
                    + ": training diverged; nothing from this step on is saved. Lower lr or raise warmup, then "
                    "resume from the last checkpoint (or raise max_nonfinite_steps to skip such steps)")
            if not finite:
                self.warn(f"{what}: not finite, skipped (weights unchanged; {self.nonfinite_in_a_row} in a row, the "
                          f"run stops at max_nonfinite_steps={cfg.max_nonfinite_steps})")
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.train_iters:
            self.log(step + 1, values)
        return values

    def log(self, done: int, values: dict[str, float]):
        now = time.perf_counter()
        seconds = (now - self.last_time) / self.cfg.log_interval
        self.last_time = now
        values["step_time"] = seconds
        values["data_wait_s"], self.data_wait = self.data_wait / self.cfg.log_interval, 0.0  # per step
        values["tokens_per_sec"] = self.tokens_per_step / seconds
        per_device = seconds * self.devices * 1e12
        model, seq = self.cfg.model, self.cfg.seq_length
        values["tflops_per_device_6n"] = flops_6n(model, seq, self.tokens_per_step) / per_device
        values["tflops_per_device_neox"] = flops_neox(model, seq, self.global_batch) / per_device
        if self.peak:
            values["mfu_6n"] = values["tflops_per_device_6n"] / self.peak
            values["mfu_neox"] = values["tflops_per_device_neox"] / self.peak
        mem = self.device.memory_stats() or {}
        if "peak_bytes_in_use" in mem:
            values["peak_memory_gb"] = mem["peak_bytes_in_use"] / 1e9
        self.logger.log(done, values)
        self.line = (f"loss {values['loss']:.4f} lr {values['lr']:.2e} gnorm {values['grad_norm']:.2f} "
                     f"{values['tokens_per_sec']:,.0f} tok/s {seconds * 1e3:.0f} ms/step"
                     + (f" MFU {100 * values['mfu_6n']:.1f}%" if self.peak else "")
                     + (f" scale {values['loss_scale']:g} skipped {int(values['skipped'])}"
                        if "loss_scale" in values else ""))


class Evaluator:
    """Mean validation loss over `eval_iters` batches; evaluation round r always reads the same batches."""

    def __init__(self, cfg: TrainConfig, trainer: Trainer, batches: GlobalBatches | None):
        self.cfg, self.trainer = cfg, trainer
        self.local = (LocalBatches(batches, trainer.batch_sharding, cfg.seq_length, cfg.model.vocab_size)
                      if batches else None)
        self.losses: dict[int, float] = {}

    def __call__(self, step: int, state: TrainState) -> float | None:
        if self.local is None:
            return None
        first = step // self.cfg.eval_interval * self.cfg.eval_iters
        losses = [self.trainer.eval_loss(state.params, self.local.device_batch(first + i), state.reference)
                  for i in range(self.cfg.eval_iters)]
        self.losses[step] = loss = float(np.mean([float(x) for x in losses]))
        return loss


def print_sample(state: TrainState, cfg: TrainConfig, console: Console, max_new_tokens: int = 48):
    """A sampled continuation of `sample_prompt` (temperature 0.8, top-p 0.95, seed 0) from the trained
    weights, generated on the run's mesh from the sharded weights."""
    from neox_jax.data.tokenizer import NeoXTokenizer
    from neox_jax.generation import generate

    tok = NeoXTokenizer(cfg.tokenizer)
    model = with_params(cfg.model.replace(dtype="float32", param_dtype="float32"), fp32_weights(state))
    prompt = tok.encode(cfg.sample_prompt)
    new = generate(model, [prompt], max_new_tokens, temperature=0.8, top_p=0.95, seed=0, stop_ids=[tok.eod_id])[0]
    text = tok.decode([t for t in new if t != tok.eod_id])
    console.print(f"\nsample (temperature 0.8, top-p 0.95, {len(new)} tokens):\n{cfg.sample_prompt}{text}\n")


def start_from(trainer: Trainer, path: str) -> tuple[TrainState, bool]:
    """Step 0 of a fine-tuning run: the weights at `path`, read onto the run's mesh (each process its own shards
    where the source allows; one tensor at a time otherwise), and a fresh optimizer; and whether a new score head
    took the language-model head's place (a reward model started from a language model)."""
    from flax import nnx

    from neox_jax.pretrained import from_pretrained

    model = from_pretrained(path, dtype="float32", param_dtype="float32", mesh=trainer.mesh)
    weights = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    new_head = bool(trainer.model_cfg.num_labels and not model.config.num_labels)
    if new_head:
        del weights["embed_out"]
        weights["score"] = trainer.new_score_head()
    return trainer.start_from(weights), new_head


def _datasets(cfg: TrainConfig, global_batch: int):
    if not cfg.data_paths:
        raise ConfigError("data_paths is empty: give the .bin/.idx prefixes to train on "
                          "(e.g. data/stdlib/stdlib_text_document after `neox-jax corpus`)")
    valid_samples = (cfg.train_iters // cfg.eval_interval + 1) * cfg.eval_iters * global_batch
    samples, cache = [cfg.train_iters * global_batch, valid_samples, 0], cfg.data_cache_dir or None
    if cfg.pairs:  # pairs, one document each (GPT-NeoX's pairwise data)
        pairs = (cfg.data_paths, cfg.rejected_data_paths, cfg.label_data_paths, cfg.rejected_label_data_paths,
                 cfg.data_weights)
        valid_pairs = (cfg.valid_data_paths, cfg.valid_rejected_data_paths, cfg.valid_label_data_paths,
                       cfg.valid_rejected_label_data_paths, cfg.valid_data_weights)
        split = None if cfg.valid_data_paths else cfg.split  # whole files for each, or a split of the pairs
        train = build_pair_datasets(*pairs, split, samples[0], cfg.seq_length, cfg.seed, "train")
        valid = build_pair_datasets(*(valid_pairs if cfg.valid_data_paths else pairs), split, samples[1],
                                    cfg.seq_length, cfg.seed, "valid")
        if train is None:
            raise ConfigError(f"split={cfg.split!r} leaves no training pairs")
        return train, valid
    if cfg.valid_data_paths:  # GPT-NeoX's train/valid_data_paths: whole datasets
        train, valid = build_path_datasets(cfg.data_paths, cfg.data_weights, cfg.valid_data_paths,
                                           cfg.valid_data_weights, samples, cfg.seq_length, cfg.seed, cache,
                                           cfg.label_data_paths, cfg.valid_label_data_paths, cfg.reward_data_paths,
                                           cfg.valid_reward_data_paths, cfg.packing)
        return train, valid
    train, valid, _ = build_split_datasets(list(cfg.data_paths), list(cfg.data_weights) or None, cfg.split,
                                           samples, cfg.seq_length, cfg.seed, cache, cfg.label_data_paths,
                                           cfg.reward_data_paths, cfg.packing)
    if train is None:
        raise ConfigError(f"split={cfg.split!r} leaves no training documents")
    return train, valid


# ---- the run ----------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, max_steps: int | None = None, show_progress: bool = True,
          print_fn=print) -> RunResult:
    """Train to `cfg.train_iters` (or for at most `max_steps` more steps in this call), resuming from the
    latest checkpoint in `cfg.save` when there is one."""
    console = Console(print_fn, show_progress)
    folders = [(name, Path(value)) for name, value in (("save", cfg.save), ("tensorboard_dir", cfg.tensorboard_dir))
               if value and Path(value).exists() and not Path(value).is_dir()]
    if folders:  # before anything is built or compiled
        raise ConfigError("; ".join(f"{name}={path} is a file: give a folder for it" for name, path in folders))
    if cfg.init_from:  # the weights to fine-tune hold this run's model (read before anything is built)
        from neox_jax.pretrained import check_same_model, model_config

        weights = model_config(cfg.init_from)
        if cfg.model.num_labels and not weights.num_labels:  # a language model becomes a reward model: a new head
            weights = weights.replace(num_labels=cfg.model.num_labels)
        check_same_model(cfg.model, weights, f"init_from={cfg.init_from}")
    if cfg.tokenizer:  # before anything is built: a wrong tokenizer would only show in the sample at the end
        from neox_jax.data.tokenizer import NeoXTokenizer
        from neox_jax.pretrained import check_vocab

        check_vocab(NeoXTokenizer(cfg.tokenizer), cfg.model, "tokenizer")
    mesh = make_mesh(cfg.mesh)
    lock = lock_save_folder(cfg.save) if cfg.save else None  # one run per save folder (neox_jax/runlock.py)
    try:
        return _train(cfg, mesh, max_steps, console)
    finally:
        if lock:
            lock.release()


def _train(cfg: TrainConfig, mesh, max_steps: int | None, console: Console) -> RunResult:
    trainer = Trainer(cfg, mesh)
    B, dp = trainer.global_batch_size, mesh.shape["data"]
    train_ds, valid_ds = _datasets(cfg, B)
    skipped = {name: skipped_documents(ds) for name, ds in (("training", train_ds), ("validation", valid_ds)) if ds}
    if any(skipped.values()):  # as GPT-NeoX skips them
        console.print("skipped " + ", ".join(f"{n} {name}" for name, n in skipped.items() if n) + " documents whose "
                      f"labels train no token within seq_length={cfg.seq_length}")
    batches = GlobalBatches(train_ds, cfg.grad_accum_steps, cfg.micro_batch_size, dp)
    evaluator = Evaluator(cfg, trainer, GlobalBatches(valid_ds, cfg.grad_accum_steps, cfg.micro_batch_size, dp)
                          if valid_ds else None)
    tb_dir = cfg.tensorboard_dir or (str(Path(cfg.save) / "tensorboard") if cfg.save else "")
    saver, logger = Saver(cfg, trainer), None
    result = RunResult(state=None, losses={}, eval_losses=evaluator.losses, last_step=0, stopped_by=None,
                       checkpoint_dir=saver.directory, tensorboard_dir=tb_dir or None, compile_seconds=0.0)
    try:
        start = saver.latest_step() or 0
        if start:
            result.state = saver.restore(start)
            console.print(f"resumed from {saver.directory}/{start} (step {start}, probe ok) on mesh "
                          f"{dict(mesh.shape)} with {jax.process_count()} process(es)")
        end = cfg.train_iters if max_steps is None else min(cfg.train_iters, start + max_steps)
        result.last_step = start
        if start >= end:
            console.print(f"already trained {start} of {cfg.train_iters} steps in {saver.directory}: nothing to do. "
                          "To train further raise train_iters; to start afresh remove that folder or set another "
                          "`save` folder.")
            return result
        # the first batch's token ids are checked before compiling (the loader checks every batch after it)
        LocalBatches(batches, trainer.batch_sharding, cfg.seq_length, cfg.model.vocab_size).host_batch(start)
        logger = MetricsLogger(tb_dir, cfg.wandb_project, cfg.to_dict(), enabled=console.on)
        if result.state is None and cfg.init_from:
            result.state, new_head = start_from(trainer, cfg.init_from)
            head = ", a new score head in place of the language-model head" if new_head else ""
            console.print(f"starting from the weights of {cfg.init_from} (step 0, a fresh optimizer{head})")
        elif result.state is None:
            result.state = trainer.init(jax.random.key(cfg.seed))
        _run(cfg, trainer, result, batches, evaluator, saver, logger, console, start, end)
    finally:
        saver.close()
        if logger:
            logger.close()
    return result


def _run(cfg, trainer, result, batches, evaluator, saver, logger, console, start, end):
    console.print(f"compiling the train step (mesh {dict(trainer.mesh_shape)}) ...")
    t0 = time.perf_counter()
    step_fn = trainer.step.lower(trainer.abstract_state_with_shardings(), trainer.abstract_batch()).compile()
    result.compile_seconds = time.perf_counter() - t0
    console.print(f"compiled the train step in {result.compile_seconds:.1f}s: {cfg.model.num_params / 1e6:.1f}M "
                  f"parameters, mesh {dict(trainer.mesh_shape)}, global batch {trainer.global_batch_size} x "
                  f"{cfg.seq_length} tokens, {cfg.precision}")
    recorder = Recorder(cfg, trainer.mesh, logger, trainer.global_batch_size, time.perf_counter(), console.print)
    result.losses = recorder.losses
    profiler = StepProfiler(cfg.profile_steps, result.tensorboard_dir, console.on, logger, console.print)
    state, pending, stop = result.state, None, None
    if start == 0 and 0 in cfg.extra_save_iters and saver.latest_step() is None:
        saver.save(0, state)  # the initial weights, as GPT-NeoX saves iteration 0 when asked

    def read_pending():  # the metrics and the stop vote of the step before
        nonlocal pending, stop
        if pending is not None:
            step, metrics, vote = pending
            pending = None
            recorder(step, metrics)
            stop = stop or StopVote.decided(vote)

    with StopVote(trainer.mesh) as votes:  # held through the final save: one signal then does not cut it short
        with Loader(batches, trainer.batch_sharding, cfg.seq_length, start_step=start,
                    vocab_size=cfg.model.vocab_size) as loader, console.bar(end - start) as progress, \
                contextlib.closing(profiler):
            for step in range(start, end):
                profiler.before(step + 1)
                waited = time.perf_counter()
                _, batch = next(loader)
                recorder.data_wait += time.perf_counter() - waited
                state, metrics = step_fn(state, batch)
                profiler.after(step + 1, metrics)
                vote = votes.vote()
                read_pending()
                pending = (step, metrics, vote)
                done = result.last_step = step + 1
                saving = (done % cfg.save_interval == 0 or done in cfg.extra_save_iters) and done < end
                if saving or done % cfg.eval_interval == 0:
                    read_pending()  # nothing unchecked is saved or evaluated
                if done % cfg.eval_interval == 0 and evaluator.local is not None:
                    loss = evaluator(done, state)
                    perplexity = {} if cfg.train_impl != "normal" else {"eval_ppl": math.exp(min(loss, 50))}
                    logger.log(done, {"eval_loss": loss, **perplexity})
                    console.print(f"step {done}: validation loss {loss:.4f}" + "".join(
                        f", perplexity {v:.2f}" for v in perplexity.values()))
                if stop:
                    break
                if saving:
                    saver.save(done, state)
                progress.set_postfix_str(recorder.line, refresh=False)
                progress.update(1)
            read_pending()
            progress.set_postfix_str(recorder.line, refresh=False)
            progress.update(result.last_step - start - progress.n)
        result.state, result.stopped_by = state, stop
        saver.save(result.last_step, state, wait=True)  # the final (or preempted) step
    if cfg.sample_prompt and cfg.tokenizer and not stop and not cfg.model.num_labels:  # a reward model samples nothing
        print_sample(state, cfg, console)
    if stop:
        console.print(f"\nstopped by {stop} after step {result.last_step}: "
                      + (f"checkpoint saved in {saver.directory}/{result.last_step}; run the same command to resume"
                         if saver.directory else "no `save` folder configured: nothing was saved"))
