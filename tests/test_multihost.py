"""Several real processes on this machine (gloo over loopback), each with its share of the CPU devices, against
one process with all of them: training, resume across process counts, the launchers and the cluster detection."""

import json
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
from neox_jax import distributed
from neox_jax.config import TrainConfig
from neox_jax.loop import train

from .conftest import TINY_MODEL, max_diff, read_scalars

WORKER = str(Path(__file__).with_name("mp_worker.py"))
# The children choose their own device count: the suite's 8 forced CPU devices must not reach them.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
LAUNCH = [sys.executable, "-m", "neox_jax.cli", "launch"]


def config(corpus, tmp: Path, **changes) -> TrainConfig:
    base = dict(model=TINY_MODEL, mesh={"data": 2, "pipe": 2, "tensor": 2}, seq_length=32, micro_batch_size=2,
                grad_accum_steps=2, lr=3e-3, min_lr=3e-4, warmup=2, train_iters=4, data_paths=[corpus],
                split="90,10,0", eval_interval=2, eval_iters=2, save=str(tmp / "ckpt"), save_interval=2,
                log_interval=1, seed=3, heartbeat_timeout=10)
    base.update(changes)
    return TrainConfig.from_dict(base)


def write(cfg: TrainConfig, path: Path) -> Path:
    d = cfg.to_dict()
    d["betas"], d["data_paths"], d["data_weights"] = list(d["betas"]), list(d["data_paths"]), []
    path.write_text(yaml.safe_dump(d))
    return path


def launch_train(cfg: TrainConfig, tmp: Path, n: int = 2, **popen) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, "--local", str(n), "--log-dir", str(tmp / "logs"), "--grace", "30", "--",
                             sys.executable, WORKER, str(tmp / "reads"), "train", str(write(cfg, tmp / "run.yml"))],
                            env=ENV, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def ours(log: Path) -> str:
    """A process's output without the lines C++ prints in every process: gloo's connection lines (sometimes cut in two
    by another write) and, with the gpu-plan extra on a machine without a GPU, the CUDA plugin's driver search
    (absl, before any setting is read); and without the launch's context line (stderr)."""
    return "\n".join(line for line in log.read_text().splitlines()
                     if not line.startswith(("[Gloo]", "neox-jax: ", "WARNING: All log messages before absl"))
                     and "connected peer ranks" not in line and "Could not find cuda drivers" not in line).strip()


def logged_losses(cfg: TrainConfig) -> dict[int, float]:
    return {step - 1: value for step, tag, value in read_scalars(Path(cfg.save) / "tensorboard") if tag == "loss"}


def saved_weights(cfg: TrainConfig, step: int):
    c = ckpt.TrainCheckpointer(cfg.save)
    try:
        from neox_jax.pretrained import abstract_params

        return c.restore_weights(step, abstract_params(cfg.model))
    finally:
        c.close()


@pytest.mark.slow
def test_two_processes_train_like_one_and_hand_over_to_one(corpus, tmp_path):
    """(2,2,2) over 2 processes x 4 devices (data crosses them, ZeRO-1) equals 1 process x 8 devices."""
    one = config(corpus, tmp_path / "one")
    reference = train(one, show_progress=False)
    cfg = config(corpus, tmp_path)
    finish(launch_train(cfg, tmp_path))

    losses = logged_losses(cfg)
    assert sorted(losses) == [0, 1, 2, 3]
    for step, loss in losses.items():
        assert abs(loss - reference.losses[step]) <= 1e-6, step
    assert max_diff(saved_weights(cfg, 4), reference.state.params) <= 1e-6

    # roles: one TensorBoard file, console lines from process 0 only
    assert len(list((Path(cfg.save) / "tensorboard").glob("events.out.tfevents.*"))) == 1
    first, second = (tmp_path / "logs" / f"process-{i}.log" for i in (0, 1))
    assert "compiled the train step" in first.read_text() and "validation loss" in first.read_text()
    assert "compiled the train step" not in second.read_text() and "loss" not in second.read_text()
    # each process read only its own rows: disjoint halves
    reads = [set(json.loads((tmp_path / f"reads.{i}.json").read_text())) for i in (0, 1)]
    assert reads[0] and not reads[0] & reads[1] and len(reads[0]) == len(reads[1])

    # a checkpoint written by 2 processes restores in 1 and trains on as the 1-process checkpoint does
    resumed = train(cfg.replace(train_iters=6), show_progress=False)
    continued = train(one.replace(train_iters=6), show_progress=False)
    assert resumed.last_step == continued.last_step == 6
    for step in (4, 5):
        assert abs(resumed.losses[step] - continued.losses[step]) <= 1e-6, step


@pytest.mark.slow
def test_one_process_hands_over_to_two_with_data_across_processes(corpus, tmp_path):
    """(4,1,2): data split 2 per process, ZeRO-1 moments split across processes; 1 -> 2 processes."""
    layout = dict(mesh={"data": 4, "pipe": 1, "tensor": 2}, micro_batch_size=1)
    reference = train(config(corpus, tmp_path / "ref", save="", **layout), show_progress=False)
    cfg = config(corpus, tmp_path, **layout)
    train(cfg, max_steps=2, show_progress=False)
    finish(launch_train(cfg, tmp_path))
    losses = logged_losses(cfg)
    for step in (2, 3):
        assert abs(losses[step] - reference.losses[step]) <= 1e-6, step
    # The losses agree to 1e-6; the weights to 1e-4: gloo's and the in-process all-reduce sum the gradients in
    # another order, and Adam divides each update by sqrt(v), which magnifies that rounding where v is small.
    assert max_diff(saved_weights(cfg, 4), reference.state.params) <= 1e-4


def _children(launcher: subprocess.Popen) -> dict[int, int]:
    """process id -> pid of the launcher's children (read from /proc)."""
    out = {}
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(e.split(b"=")[1]) for e in env if e.startswith(distributed.ENV_PROCESS_ID.encode() + b"="))
        out[rank] = int(pid)
    return out


def _wait_for_checkpoint(folder: Path, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit()] if folder.is_dir() else []
        if steps:
            return max(steps)
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_on_the_same_step(corpus, tmp_path):
    cfg = config(corpus, tmp_path, train_iters=400, eval_interval=1000)
    proc = launch_train(cfg, tmp_path)
    _wait_for_checkpoint(Path(cfg.save), proc)
    os.kill(_children(proc)[1], signal.SIGTERM)  # process 1 only: the vote carries it to process 0
    finish(proc, timeout=120)
    log = (tmp_path / "logs" / "process-0.log").read_text()
    stopped = int(log.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert ckpt.TrainCheckpointer(cfg.save).latest_step() == stopped < 400


@pytest.mark.slow
def test_a_killed_peer_stops_the_launch_and_training_resumes(corpus, tmp_path):
    cfg = config(corpus, tmp_path, train_iters=400, eval_interval=1000)
    proc = launch_train(cfg, tmp_path)
    _wait_for_checkpoint(Path(cfg.save), proc)
    time.sleep(1.0)
    os.kill(_children(proc)[1], signal.SIGKILL)
    start = time.time()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert time.time() - start < cfg.heartbeat_timeout + 30 + 20  # heartbeat, the launcher's grace, slack
    assert "process 1 (host localhost" in out and "was killed by SIGKILL" in out
    latest = ckpt.TrainCheckpointer(cfg.save).latest_step()
    assert f"last complete checkpoint: {Path(cfg.save).absolute()}/{latest}" in out
    resumed = train(cfg, max_steps=2, show_progress=False)  # one process picks it up
    reference = train(cfg.replace(save=""), max_steps=latest + 2, show_progress=False)
    for step in (latest, latest + 1):
        assert abs(resumed.losses[step] - reference.losses[step]) <= 1e-6


@pytest.mark.slow
def test_generate_and_perplexity_across_two_processes_equal_one(tmp_path):
    from neox_jax.checkpoint import save_params_checkpoint
    from neox_jax.config import NeoXConfig
    from neox_jax.data.tokenizer import train_tokenizer
    from neox_jax.pretrained import abstract_params

    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(300)]
    tok = train_tokenizer(texts, 320, tmp_path / "tokenizer.json")
    config = NeoXConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=128)
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), abstract_params(config))
    model = save_params_checkpoint(tmp_path / "model", params, config)
    (tmp_path / "model" / "tokenizer.json").write_bytes(Path(tok).read_bytes())
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:6]))
    generate = ["generate", "--model", str(model), "--prompt", "def f(", "--max-new-tokens", "12"]
    evaluate = ["eval", "perplexity", "--model", str(model), "--data", str(tmp_path / "text.jsonl"),
                "--max-length", "32"]

    def one(args):
        return subprocess.run([sys.executable, "-m", "neox_jax.cli", *args], env=ENV, capture_output=True, text=True,
                              check=True).stdout

    def two(args, tag):
        subprocess.run([*LAUNCH, "--local", "2", "--log-dir", str(tmp_path / tag), "--", sys.executable, "-m",
                        "neox_jax.cli", *args, "--mesh", "data=2,tensor=2"], env=ENV, check=True, capture_output=True)
        assert ours(tmp_path / tag / "process-1.log") == ""  # process 0 alone prints
        return ours(tmp_path / tag / "process-0.log")

    text = one(generate).strip()
    assert len(text) > len("def f(") + 5, text  # the model really wrote something
    assert two(generate, "gen") == text
    ppl_one, ppl_two = json.loads(one(evaluate)), json.loads(two(evaluate, "ppl"))
    assert ppl_two.keys() == ppl_one.keys()
    for key, value in ppl_one.items():
        assert ppl_two[key] == pytest.approx(value, rel=1e-5), key


def test_hostfile_launch_over_ssh_quotes_every_argument(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ssh = bin_dir / "ssh"  # runs the remote command here: `ssh HOST COMMAND`
    fake_ssh.write_text('#!/bin/sh\nshift\nexec sh -c "$1"\n')
    fake_ssh.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two hosts\nlocalhost slots=8\n127.0.0.1 slots=8\n")
    probe = ("import os, sys; e = os.environ; os.write(1, ' '.join([e['NEOX_PROCESS_ID'], e['NEOX_NUM_PROCESSES'], "
             "e['NEOX_COORDINATOR'], sys.argv[1]]).encode() + b'\\n')")  # one write: the two lines cannot interleave
    tricky = "a b; touch pwned $(touch pwned2)"
    out = subprocess.run([*LAUNCH, "--hostfile", str(hostfile), "--port", "4321", "--ssh", str(fake_ssh), "--",
                          sys.executable, "-c", probe, tricky], env=ENV, cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert sorted(out.splitlines()) == [f"0 2 localhost:4321 {tricky}", f"1 2 localhost:4321 {tricky}"]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


@pytest.mark.parametrize("environ, want", [
    ({"NEOX_COORDINATOR": "10.0.0.1:1234", "NEOX_NUM_PROCESSES": "12", "NEOX_PROCESS_ID": "5"},
     ("10.0.0.1:1234", 12, 5, None, "environment")),
    ({"SLURM_JOB_ID": "4097", "SLURM_STEP_NODELIST": "node[003-014]", "SLURM_NTASKS": "12", "SLURM_PROCID": "7",
      "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"},
     ("node003:61441", 12, 7, tuple(range(8)), "slurm")),  # one task per node drives all 8 GPUs
    ({"SLURM_JOB_ID": "12", "SLURM_STEP_NODELIST": "gpu1,gpu2", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
      "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "8(x2)"},
     ("gpu1:61452", 16, 9, (1,), "slurm")),  # one task per GPU: JAX's default, GPU = local rank
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.1.2.3,172.17.0.1:40625", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     ("10.1.2.3:", 4, 3, (1,), "ompi")),
])
def test_cluster_environments_are_detected(environ, want):
    got = distributed.detect(environ=environ)
    coordinator, n, rank, ids, source = want
    assert got.coordinator.startswith(coordinator) and (got.num_processes, got.process_id) == (n, rank)
    assert (got.local_device_ids, got.source) == (ids, source)


def test_single_process_launches_initialize_nothing():
    assert distributed.detect(environ={}) is None
    assert distributed.detect(environ={"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
                                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}) is None
    with pytest.raises(distributed.LaunchError, match="NEOX_PROCESS_ID not set"):
        distributed.detect(environ={"NEOX_COORDINATOR": "h:1", "NEOX_NUM_PROCESSES": "2"})
    with pytest.raises(distributed.LaunchError, match="process id 2 is outside 0..1"):
        distributed.detect("h:1", 2, 2, environ={})


@pytest.mark.slow
def test_dpo_over_two_processes_equals_one(tmp_path):
    """DPO's pairs split over 2 processes x 4 devices (data crosses them) train as 1 process x 8 devices. Adam's
    eps is 1e-6 here: DPO's gradients are small, and with eps 1e-8 Adam turns a summation-order difference in a
    near-zero gradient into a visible update (as test_train's optimizer comparison explains)."""
    from .test_objectives import _pairs

    files = _pairs(tmp_path, "train", 64, np.random.RandomState(0))
    base = dict(model={**TINY_MODEL, "vocab_size": 384}, mesh={"data": 4, "pipe": 1, "tensor": 2}, seq_length=16,
                micro_batch_size=2,
                train_iters=3, lr=1e-3, train_impl="dpo", data_paths=[files["chosen"]],
                rejected_data_paths=[files["rejected"]], label_data_paths=[files["chosen_label"]],
                rejected_label_data_paths=[files["rejected_label"]], split="100,0,0", eval_interval=100,
                log_interval=1, save_interval=3, heartbeat_timeout=10, eps=1e-6)
    one = TrainConfig.from_dict({**base, "save": str(tmp_path / "one")})
    reference = train(one, show_progress=False)
    cfg = TrainConfig.from_dict({**base, "save": str(tmp_path / "ckpt")})
    finish(launch_train(cfg, tmp_path))
    losses = logged_losses(cfg)
    assert sorted(losses) == [0, 1, 2] and abs(losses[0] - np.log(2)) <= 1e-6
    for step, loss in losses.items():
        assert abs(loss - reference.losses[step]) <= 1e-6, step
    assert max_diff(saved_weights(cfg, 3), reference.state.params) <= 1e-6
