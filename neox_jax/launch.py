"""`neox-jax launch`: start the processes of one JAX program and watch them.

    --local N       N processes on this machine, joined over the loopback address (laptops, tests, one GPU
                    node with one process per GPU)
    --hostfile F    one process per host of a GPT-NeoX/DeepSpeed hostfile (`host slots=8` lines) over ssh

Each process gets NEOX_COORDINATOR, NEOX_NUM_PROCESSES and NEOX_PROCESS_ID (neox_jax/distributed.py reads
them). Commands are argument lists, never shell strings; over ssh the remote command is quoted argument by
argument (shlex.quote), so no input can run as shell syntax.

The launcher forwards SIGTERM and SIGINT to every process (they agree on a step, save it and exit 0 after
SIGTERM, 130 after SIGINT). When a process fails, the launcher says which one and how, stops the others (at
once when none is writing a checkpoint: they are blocked on the dead peer; after `grace` seconds when one is),
names the last complete checkpoint and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from neox_jax import interrupts
from neox_jax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from neox_jax.errors import LaunchError

STOP_SECONDS = 5.0  # after a failure, how long the others get to stop on SIGTERM when none is saving


@dataclasses.dataclass
class Process:
    rank: int
    host: str
    popen: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_hostfile(path: str | os.PathLike) -> list[str]:
    """The hosts of a DeepSpeed hostfile (`HOST slots=N` lines; `#` starts a comment). One process runs per host
    and drives all its devices, so the slot counts are checked but not needed."""
    hosts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        for item in rest:
            key, _, value = item.partition("=")
            if key != "slots" or not value.isdigit() or int(value) < 1:
                raise LaunchError(f"{path}:{n}: {item!r}: expected `HOST slots=N` (N >= 1)")
        hosts.append(host)
    if not hosts:
        raise LaunchError(f"{path}: no hosts")
    if len(set(hosts)) != len(hosts):
        raise LaunchError(f"{path}: a host is listed twice")
    return hosts


def _env(coordinator: str, n: int, rank: int) -> dict[str, str]:
    return {ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(n), ENV_PROCESS_ID: str(rank)}


def _output(log_dir: str | os.PathLike | None, rank: int):
    """Where process `rank` writes: DIR/process-RANK.log with a log folder, else the launcher's own output."""
    if not log_dir:
        return None
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return open(Path(log_dir) / f"process-{rank}.log", "w")


def start_local(n: int, command: Sequence[str], port: int | None = None,
                log_dir: str | os.PathLike | None = None) -> list[Process]:
    coordinator = f"127.0.0.1:{port or free_port()}"
    procs = []
    for rank in range(n):
        out = _output(log_dir, rank)
        procs.append(Process(rank, "localhost", subprocess.Popen(
            list(command), env={**os.environ, **_env(coordinator, n, rank)}, stdout=out, stderr=out)))
    return procs


def start_hostfile(hostfile: str | os.PathLike, command: Sequence[str], port: int | None = None, ssh: str = "ssh",
                   workdir: str | None = None, log_dir: str | os.PathLike | None = None) -> list[Process]:
    """One process per host over ssh, in `workdir` (default: this folder, which must exist on every host); the
    coordinator is the first host, on `port` (default 29500)."""
    hosts = read_hostfile(hostfile)
    coordinator = f"{hosts[0]}:{port or 29500}"
    workdir = workdir or os.getcwd()
    procs = []
    for rank, host in enumerate(hosts):
        env = [f"{k}={v}" for k, v in _env(coordinator, len(hosts), rank).items()]
        remote = "cd " + shlex.quote(workdir) + " && exec env " + shlex.join(env + list(command))
        out = _output(log_dir, rank)
        procs.append(Process(rank, host, subprocess.Popen([ssh, host, remote], stdout=out, stderr=out)))
    return procs


def _describe(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


def _save_folder(command: Sequence[str]) -> Path | None:
    """The `save` folder of a `neox-jax train CONFIG [CONFIG ...] [key=value ...]` command, if it has one."""
    args = list(command)
    if "train" not in args:
        return None
    try:
        from neox_jax.convert.neox_yaml import train_config_from_args

        cfg = train_config_from_args(args[args.index("train") + 1:])
    except Exception:  # noqa: BLE001 - a report, not a check: the command itself said what was wrong
        return None
    return Path(cfg.save) if cfg.save else None


def latest_checkpoint(command: Sequence[str]) -> str | None:
    """The newest complete checkpoint of a training command, if it has one."""
    folder = _save_folder(command)
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder and folder.is_dir() else []
    return f"{folder.absolute()}/{steps[-1]}" if steps else None


def saving(command: Sequence[str]) -> bool:
    """Whether a training command's `save` folder holds a checkpoint being written (Orbax's temporary folder)."""
    folder = _save_folder(command)
    return bool(folder and folder.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in folder.iterdir()))


def supervise(procs: list[Process], command: Sequence[str], grace: float = 60.0, out=sys.stderr,
              stop_seconds: float = STOP_SECONDS) -> int:
    """Wait for every process; forward SIGTERM/SIGINT; on a failure report it and stop the rest: at once (SIGTERM,
    then SIGKILL after `stop_seconds`) unless a checkpoint is being written, which gets `grace` seconds."""
    forwarded: list[int] = []

    def forward(signum):
        forwarded.append(signum)
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signum)

    def failed(p: Process) -> bool:  # a process that stopped as a forwarded signal asked did not fail
        code = p.popen.poll()
        return code not in (None, 0) and not any(code in (-s, 128 + s) for s in forwarded)

    with interrupts.deferred(forward, repeat=True):  # every signal goes to the processes; they decide
        first = None
        while first is None and any(p.popen.poll() is None for p in procs):
            first = next((p for p in procs if failed(p)), None)
            time.sleep(0.1)
        first = first or next((p for p in procs if failed(p)), None)
        if first is None:
            codes = [p.popen.returncode for p in procs if p.popen.returncode]
            return (codes[0] if codes[0] > 0 else 128 - codes[0]) if codes else 0
        code = first.popen.returncode
        print(f"neox-jax launch: process {first.rank} (host {first.host}, pid {first.popen.pid}) "
              f"{_describe(code)}", file=out, flush=True)
        if saving(command):  # a checkpoint being written gets the grace to finish
            wait, why = grace, "the failure (a checkpoint was being written)"
        else:  # the others are blocked on the dead peer, or will be: nothing to wait for
            wait, why = stop_seconds, "SIGTERM"
            for p in procs:
                if p.popen.poll() is None:
                    p.popen.send_signal(signal.SIGTERM)
        deadline = time.time() + wait
        while any(p.popen.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.1)
        for p in procs:
            if p.popen.poll() is None:
                print(f"neox-jax launch: process {p.rank} still running {wait:.0f}s after {why}: stopping it",
                      file=out)
                p.popen.kill()
                p.popen.wait()
        for p in procs:
            if p is not first:
                print(f"neox-jax launch: process {p.rank} {_describe(p.popen.returncode)}"
                      if p.popen.returncode else f"neox-jax launch: process {p.rank} exited cleanly", file=out)
        ckpt = latest_checkpoint(command)
        print("neox-jax launch: " + (f"last complete checkpoint: {ckpt}; run the same command to resume from it"
                                     if ckpt else "no complete checkpoint to resume from"), file=out, flush=True)
        return code if code > 0 else 128 - code
