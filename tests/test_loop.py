"""The training loop: reproducibility, exact resume, preemption, fp16 loss scaling, checkpoints, logging."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from neox_jax import checkpoint as ckpt
from neox_jax.config import NeoXConfig, TrainConfig, apply_overrides
from neox_jax.convert.neox_yaml import model_config, read_train_config
from neox_jax.errors import ConfigError
from neox_jax.loop import train

from .conftest import TINY_MODEL as MODEL
from .conftest import read_scalars


def config(corpus, tmp, **changes) -> TrainConfig:
    base = dict(model=MODEL, mesh={"data": 4, "pipe": 1, "tensor": 2}, seq_length=32, micro_batch_size=2,
                grad_accum_steps=2, lr=3e-3, min_lr=3e-4, warmup=2, train_iters=8, data_paths=[corpus],
                split="90,10,0", eval_interval=4, eval_iters=2, save=str(tmp / "ckpt"), save_interval=3,
                log_interval=1, seed=3)
    base.update(changes)
    return TrainConfig.from_dict(base)


def params_of(result):
    return jax.tree.map(np.asarray, result.state.params)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_identical_runs_and_exact_resume(corpus, tmp_path):
    full = train(config(corpus, tmp_path / "a"), show_progress=False)
    again = train(config(corpus, tmp_path / "b"), show_progress=False)
    assert full.losses == again.losses  # bit-identical
    assert_trees_equal(params_of(full), params_of(again))

    cfg = config(corpus, tmp_path / "c")
    first = train(cfg, max_steps=5, show_progress=False)  # stops after step 5 (a checkpoint at 3 and at 5)
    assert first.last_step == 5
    resumed = train(cfg, show_progress=False)
    assert resumed.last_step == 8
    assert {s: resumed.losses[s] for s in range(5, 8)} == {s: full.losses[s] for s in range(5, 8)}
    assert_trees_equal(params_of(resumed), params_of(full))
    assert ckpt.TrainCheckpointer(tmp_path / "c" / "ckpt").all_steps() == [5, 6, 8]  # the last 3 of 3, 5, 6, 8
    # the loss falls on this learnable task, and evaluation ran at steps 4 and 8
    assert np.mean([full.losses[s] for s in (6, 7)]) < full.losses[0] - 0.3
    assert set(full.eval_losses) == {4, 8}
    logged = read_scalars(full.tensorboard_dir)
    tags = {tag for _, tag, _ in logged}
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_device_6n", "eval_loss", "eval_ppl"} <= tags
    assert [v for s, t, v in logged if t == "loss" and s == 1][0] == pytest.approx(full.losses[0], rel=1e-6)


@pytest.mark.slow
def test_fine_tuning_starts_from_the_weights_and_resumes_exactly(corpus, tmp_path):
    from flax import nnx

    from neox_jax.data.dataset import GlobalBatches
    from neox_jax.data.loader import LocalBatches
    from neox_jax.loop import _datasets
    from neox_jax.model import GPTNeoX
    from neox_jax.pretrained import save_pretrained
    from neox_jax.sharding import make_mesh
    from neox_jax.train import Trainer

    source = GPTNeoX(NeoXConfig(**MODEL), rngs=nnx.Rngs(7))  # weights no run here would draw (seed 3)
    save_pretrained(source, tmp_path / "pretrained")
    cfg = config(corpus, tmp_path / "a", init_from=str(tmp_path / "pretrained"), train_iters=4, save_interval=2,
                 extra_save_iters=[0], eval_interval=100)
    full = train(cfg, show_progress=False)

    trainer = Trainer(cfg, make_mesh(cfg.mesh))
    start = ckpt.TrainCheckpointer(cfg.save).restore(0, trainer.abstract_state_with_shardings())
    assert int(start.step) == 0 and int(start.updates) == 0  # a fresh optimizer at step 0
    assert_trees_equal(jax.tree.map(np.asarray, start.params), nnx.to_pure_dict(nnx.state(source, nnx.Param)))
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(start.opt_state))  # moments and counts all 0
    # the first step's loss is the pretrained weights' evaluation loss on that batch
    batches = GlobalBatches(_datasets(cfg, trainer.global_batch_size)[0], cfg.grad_accum_steps, cfg.micro_batch_size,
                            cfg.mesh["data"])
    batch = LocalBatches(batches, trainer.batch_sharding, cfg.seq_length).device_batch(0)
    assert full.losses[0] == pytest.approx(float(trainer.eval_loss(start.params, batch)), abs=1e-6)

    resumed_cfg = cfg.replace(save=str(tmp_path / "b" / "ckpt"))
    assert train(resumed_cfg, max_steps=2, show_progress=False).last_step == 2
    resumed = train(resumed_cfg, show_progress=False)  # from its own checkpoint, not from init_from again
    assert {s: resumed.losses[s] for s in (2, 3)} == {s: full.losses[s] for s in (2, 3)}
    assert_trees_equal(params_of(resumed), params_of(full))


@pytest.mark.slow
def test_resume_onto_another_mesh(corpus, tmp_path):
    big = dict(mesh={"data": 2, "pipe": 2, "tensor": 2}, micro_batch_size=4, eps=1e-6)
    full = train(config(corpus, tmp_path / "a", **big), show_progress=False)
    cfg = config(corpus, tmp_path / "b", **big)
    train(cfg, max_steps=4, show_progress=False)
    moved = train(cfg.replace(mesh={"data": 8, "pipe": 1, "tensor": 1}, micro_batch_size=1), show_progress=False)
    assert moved.last_step == 8
    for s in range(4, 8):  # same global batch, other layout: equal up to fp32 summation order
        assert moved.losses[s] == pytest.approx(full.losses[s], abs=1e-4)


def _write_config(cfg: TrainConfig, path: Path) -> Path:
    d = cfg.to_dict()
    d["betas"], d["data_paths"], d["data_weights"] = list(d["betas"]), list(d["data_paths"]), []
    path.write_text(yaml.safe_dump(d))
    return path


def _start(cfg_path: Path, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neox_jax.cli", "train", str(cfg_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_checkpoints(folder: Path, n: int, proc: subprocess.Popen, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [p for p in folder.glob("*") if p.name.isdigit()] if folder.is_dir() else []
        if len(done) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no checkpoints appeared")


@pytest.mark.slow
def test_sigkill_during_async_saves_restarts_from_last_complete(corpus, tmp_path):
    cfg = config(corpus, tmp_path, train_iters=400, save_interval=1, keep_last=2)
    proc = _start(_write_config(cfg, tmp_path / "run.yml"), tmp_path)
    _wait_for_checkpoints(tmp_path / "ckpt", 2, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # saves run every step: this lands during one
    proc.wait()
    latest = ckpt.TrainCheckpointer(tmp_path / "ckpt").latest_step()
    assert latest is not None and latest >= 1
    resumed = train(cfg, max_steps=2, show_progress=False)
    assert resumed.last_step == latest + 2
    reference = train(cfg.replace(save=""), max_steps=latest + 2, show_progress=False)
    assert resumed.losses[latest] == reference.losses[latest]  # resumed exactly where it left off
    assert resumed.losses[latest + 1] == reference.losses[latest + 1]


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_saves_at_the_current_step_and_exits(corpus, tmp_path, sig, status):
    cfg = config(corpus, tmp_path, train_iters=400, save_interval=2)
    proc = _start(_write_config(cfg, tmp_path / "run.yml"), tmp_path)
    _wait_for_checkpoints(tmp_path / "ckpt", 1, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, out  # SIGTERM (preemption) that saved: 0
    assert f"{sig.name}: finishing this step and saving it" in out
    stopped = int(out.split(f"stopped by {sig.name} after step ")[1].split(":")[0])
    assert ckpt.TrainCheckpointer(tmp_path / "ckpt").latest_step() == stopped
    assert "run the same command to resume" in out


@pytest.mark.slow
def test_a_signal_before_the_first_step_ends_the_run_at_once(corpus, tmp_path):
    cfg = config(corpus, tmp_path, train_iters=400, save_interval=1)
    proc = _start(_write_config(cfg, tmp_path / "run.yml"), tmp_path)
    for line in proc.stdout:
        if line.startswith("compiling the train step"):
            break
    sent = time.time()
    proc.send_signal(signal.SIGINT)  # inside the compile: nothing to save yet
    out, _ = proc.communicate(timeout=60)
    assert time.time() - sent < 3 and proc.returncode == 130, out
    assert out.splitlines()[-1] == "neox-jax train: stopped by SIGINT" and "Traceback" not in out
    assert ckpt.TrainCheckpointer(tmp_path / "ckpt").all_steps() == []


@pytest.mark.slow
def test_corruption_is_caught_per_tensor_and_by_the_probe(corpus, tmp_path):
    cfg = config(corpus, tmp_path, train_iters=3, save_interval=1)
    result = train(cfg, show_progress=False)
    checkpointer = ckpt.TrainCheckpointer(tmp_path / "ckpt")
    meta = checkpointer.read_meta(3)
    state = dataclasses.replace(result.state, step=result.state.step + 1)
    fingerprints = ckpt.make_fingerprinter(jax.tree.leaves(state.params)[0].sharding.mesh)
    # bit rot in an optimizer moment after its fingerprint was taken: the weights (and so the probe) are intact
    flat, treedef = ckpt.flatten(state)
    name = next(k for k in flat if k.startswith("opt_state/") and k.endswith("mlp/dense_h_to_4h/kernel")
                and "/mu/" in k)
    moment = np.asarray(flat[name]).copy()
    moment.reshape(-1).view(np.uint32)[5] ^= 1 << 30  # one flipped bit
    rotted = jax.tree_util.tree_unflatten(treedef, [jax.device_put(moment, flat[k].sharding) if k == name else v
                                                    for k, v in flat.items()])
    checkpointer.save(4, rotted, {**meta, "step": 4, "samples_consumed": 64, "fingerprints": fingerprints(state)})
    checkpointer.wait()
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=f"/4 is corrupt: {name} differs from the fingerprint saved with it; "
                             "move .*/4 away to resume from step 3"):
        train(cfg.replace(train_iters=6), show_progress=False)

    # a checkpoint without fingerprints (or a model that computes differently) still meets the probe
    params = jax.tree.map(lambda x: x, state.params)
    params["embed_out"]["kernel"] = params["embed_out"]["kernel"] * 1.5
    checkpointer.save(5, dataclasses.replace(state, params=params), {**meta, "step": 5, "samples_consumed": 80, "fingerprints": {}})
    checkpointer.close()
    with pytest.raises(ckpt.CheckpointMismatchError, match="/5 failed its integrity probe.*resume from step 4"):
        train(cfg.replace(train_iters=6), show_progress=False)


@pytest.mark.slow
def test_resume_names_changed_settings_and_unreadable_steps(corpus, tmp_path):
    cfg = config(corpus, tmp_path, train_iters=4, save_interval=2)
    train(cfg, show_progress=False)
    changed = cfg.replace(train_iters=6, seed=4, model=cfg.model.replace(rotary_pct=0.25), micro_batch_size=1)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"/4 was written with other settings than this run's: seed was 3, now 4; "
                                          r"model.rotary_pct was 0.5, now 0.25; global batch .* was 16, now 8"):
        train(changed, show_progress=False)
    assert time.perf_counter() - t0 < 20  # before the step is compiled
    # remat and precision of compute are free to change; the step folder stays as it was
    assert ckpt.TrainCheckpointer(tmp_path / "ckpt").all_steps() == [2, 4]

    meta = tmp_path / "ckpt" / "4" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:40])  # a truncated JSON file
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"/4 cannot be read \(.*\); move .*/4 away to resume "
                                                           "from step 2"):
        train(cfg.replace(train_iters=6), show_progress=False)


@pytest.mark.slow
def test_checkpoint_of_another_model_names_the_first_mismatched_tensor(corpus, tmp_path):
    train(config(corpus, tmp_path, train_iters=2), show_progress=False)
    wider = config(corpus, tmp_path, train_iters=4, model={**MODEL, "intermediate_size": 96})
    with pytest.raises(ConfigError, match=r"/2 was written with other settings than this run's: "
                                          r"model.intermediate_size was 64, now 96"):
        train(wider, show_progress=False)
    # below the settings check, the shapes are checked before reading, naming the first mismatched tensor
    from neox_jax.sharding import make_mesh
    from neox_jax.train import Trainer

    abstract = Trainer(wider, make_mesh(wider.mesh)).abstract_state_with_shardings()
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=r"layers/mlp/dense_4h_to_h/kernel has shape \(2, 64, 32\) but .* needs \(2, 96, 32\)"):
        ckpt.TrainCheckpointer(tmp_path / "ckpt").check_shapes(2, abstract)


def test_unknown_config_key_names_the_nearest(corpus, tmp_path):
    with pytest.raises(ConfigError, match="unknown training setting 'train_iter'; did you mean 'train_iters'"):
        TrainConfig.from_dict({"train_iter": 3})
    cfg = config(corpus, tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        apply_overrides(cfg, ["model.num_layer=3"])
    assert apply_overrides(cfg, ["model.num_layers=3", "lr=1e-3"]).model.num_layers == 3
    with pytest.raises(ConfigError, match="data_paths is empty"):
        train(cfg.replace(data_paths=()), show_progress=False)


def test_train_cli_accepts_neox_yaml_settings(shared):
    cfg = read_train_config(shared / "neox-configs" / "pythia" / "pythia-70m.yml")
    assert cfg.legacy_schedule and cfg.decay_style == "cosine" and cfg.warmup_iters == 1430
    assert cfg.precision == "fp16" and cfg.initial_scale_power == 12 and cfg.hysteresis == 2
    assert (cfg.micro_batch_size, cfg.grad_accum_steps, cfg.lr, cfg.weight_decay) == (32, 1, 1e-3, 0.1)
    assert cfg.model == model_config(shared / "neox-configs" / "pythia" / "pythia-70m.yml")
    assert cfg.working_model().param_dtype == "float16" and cfg.model.param_dtype == "float32"
    # Pythia's data and checkpoints as GPT-NeoX reads them: whole datasets, every checkpoint kept, log-spaced ones
    assert cfg.data_paths == cfg.valid_data_paths == ("/fsx/pile/pile_20B_tokenizer_text_document",)
    assert cfg.keep_last == 0 and cfg.extra_save_iters == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@pytest.mark.slow
def test_extra_save_iters_and_keeping_every_checkpoint(corpus, tmp_path):
    cfg = config(corpus, tmp_path, train_iters=5, save_interval=100, extra_save_iters=[0, 1, 3], keep_last=0)
    first = train(cfg, show_progress=False)
    c = ckpt.TrainCheckpointer(cfg.save)
    assert c.all_steps() == [0, 1, 3, 5]  # the initial weights, the extra steps and the last
    initial = c.restore_weights(0, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_of(first)))
    c.close()
    from neox_jax.sharding import make_mesh
    from neox_jax.train import Trainer

    fresh = Trainer(cfg, make_mesh(cfg.mesh)).init(jax.random.key(cfg.seed))  # step 0 holds the untrained weights
    assert_trees_equal(jax.tree.map(np.asarray, initial), jax.tree.map(np.asarray, fresh.params))


def test_non_finite_steps_in_a_row_stop_the_run_at_max_nonfinite_steps():
    from neox_jax.errors import TrainingError
    from neox_jax.loop import Recorder
    from neox_jax.metrics import MetricsLogger
    from neox_jax.sharding import make_mesh

    warned = []
    cfg = TrainConfig(model=NeoXConfig(**MODEL), seq_length=32, max_nonfinite_steps=3, train_iters=100)
    rec = Recorder(cfg, make_mesh({"data": 1}, jax.devices()[:1]), MetricsLogger(enabled=False), 2, 0.0,
                   warned.append)
    metrics = lambda loss: {"loss": loss, "grad_norm": 1.0, "lr": 1e-3}  # noqa: E731
    for step, loss in enumerate([2.0, float("nan"), float("inf"), 1.9, float("nan"), float("nan")]):
        rec(step, metrics(loss))  # two in a row are skipped, the count starts again after a finite step
    assert len(warned) == 4 and "step 2: loss nan" in warned[0] and "2 in a row" in warned[1]
    assert "max_nonfinite_steps=3" in warned[0]
    with pytest.raises(TrainingError, match=r"step 7: loss nan.*\(3 non-finite steps in a row\).*max_nonfinite_steps"):
        rec(6, metrics(float("nan")))


@pytest.mark.slow
def test_a_diverging_run_stops_before_saving_and_keeps_its_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    from neox_jax.errors import TrainingError
    from neox_jax.pretrained import abstract_params
    from neox_jax.train import Trainer

    step = Trainer._step

    def diverging(self, state, batch):  # from the 4th step on, the loss and the weights turn NaN
        new, metrics = step(self, state, batch)
        poison = jax.numpy.where(state.step >= 3, jax.numpy.nan, 0.0)
        new = dataclasses.replace(new, params=jax.tree.map(lambda w: w + poison, new.params))
        return new, {**metrics, "loss": metrics["loss"] + poison}

    monkeypatch.setattr(Trainer, "_step", diverging)
    cfg = config(corpus, tmp_path, save_interval=1, keep_last=2, train_iters=8)
    with pytest.raises(TrainingError, match="step 4: loss nan"):
        train(cfg, show_progress=False)
    c = ckpt.TrainCheckpointer(cfg.save)
    assert c.all_steps() == [2, 3]  # step 4 was never saved, and the good ones were not rotated away
    weights = c.restore_weights(3, abstract_params(cfg.model))
    assert all(np.isfinite(np.asarray(w)).all() for w in jax.tree.leaves(weights))
    c.close()


@pytest.mark.slow
def test_profile_steps_write_a_trace_and_the_step_breakdown(corpus, tmp_path):
    cfg = config(corpus, tmp_path, train_iters=5, profile_steps=[2, 4], save_interval=100, eval_interval=100)
    lines = []
    result = train(cfg, show_progress=False, print_fn=lines.append)
    assert list(Path(result.tensorboard_dir).glob("plugins/profile/*/*.xplane.pb"))  # TensorBoard's profile tab
    assert [line for line in lines if line.startswith("profiled steps 2-4 into")]
    scalars = {(tag, step): value for step, tag, value in read_scalars(result.tensorboard_dir)}
    # the (4, 1, 2) mesh computes and reduces over data and tensor in every step
    assert scalars["profile_compute_s", 4] > 0 and scalars["profile_communication_s", 4] > 0
    assert all(scalars["data_wait_s", step] >= 0 for step in range(1, 6))
    with pytest.raises(ConfigError, match="profile_steps=.*1 <= first <= last"):
        config(corpus, tmp_path, profile_steps=[3, 2])
    with pytest.raises(ConfigError, match="profile_steps=.*set one of them"):
        config(corpus, tmp_path, profile_steps=[1, 2], save="")


@pytest.mark.slow
def test_a_second_training_process_on_the_same_save_folder_is_refused(corpus, tmp_path):
    """Two `neox-jax train` processes, one `save`: the second is refused at once naming the first; the first trains
    on, stops cleanly and its checkpoints resume (issue 29: a mix of two runs' steps was left before)."""
    cfg = config(corpus, tmp_path, train_iters=400, save_interval=2)
    path = _write_config(cfg, tmp_path / "run.yml")
    first = _start(path, tmp_path)
    _wait_for_checkpoints(tmp_path / "ckpt", 1, first)
    t0 = time.time()
    second = subprocess.run([sys.executable, "-m", "neox_jax.cli", "train", str(path)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert second.returncode == 2 and time.time() - t0 < 60
    assert f"save={tmp_path / 'ckpt'} belongs to a run that is still going: process {first.pid} on" in second.stderr
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    stopped = int(out.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert ckpt.TrainCheckpointer(tmp_path / "ckpt").latest_step() == stopped
    assert train(cfg, max_steps=1, show_progress=False).last_step == stopped + 1  # resumes: the lock was released


@pytest.mark.slow
def test_sft_on_the_label_files_gpt_neox_wrote(shared, tmp_path):
    """GPT-NeoX's own SFT files (chat `messages`, -100 over the prompts) train here as they are: the labels come
    in step with the tokens, equal to them where trained, and only those tokens count."""
    from neox_jax.data.dataset import GlobalBatches
    from neox_jax.loop import _datasets

    out = shared / "neox-post-training" / "out"
    files = sorted(out.iterdir())
    cfg = TrainConfig.from_dict(dict(
        model=dict(vocab_size=50304, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                   max_position_embeddings=64, rotary_pct=0.25),
        mesh={"data": 4, "pipe": 1, "tensor": 2}, seq_length=24, micro_batch_size=1, train_iters=3, lr=1e-3,
        data_paths=[str(out / "sft_messages_document")], label_data_paths=[str(out / "sft_messages_label_document")],
        valid_data_paths=[str(out / "sft_messages_document")],
        valid_label_data_paths=[str(out / "sft_messages_label_document")], eval_interval=3, eval_iters=1,
        data_cache_dir=str(tmp_path / "maps"), log_interval=1))
    train_ds, _ = _datasets(cfg, 4)
    batch = GlobalBatches(train_ds, 1, 1, 4).batch(0)
    trained = batch["labels"] >= 0
    assert 0 < trained.sum() < trained.size  # prompts masked, answers trained
    np.testing.assert_array_equal(batch["labels"][trained], batch["tokens"][trained])
    result = train(cfg, show_progress=False)
    assert result.last_step == 3 and all(np.isfinite(v) for v in result.losses.values())
    assert np.isfinite(result.eval_losses[3])
    assert sorted(out.iterdir()) == files  # the index maps went to data_cache_dir, nothing beside the data
