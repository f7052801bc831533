"""`neox-jax launch`: start the processes of one JAX program and watch them.

    --local N       N processes on this machine, joined over the loopback address (laptops, tests, one GPU
                    node with one process per GPU)
    --hostfile F    one process per host of a GPT-NeoX/DeepSpeed hostfile (`host slots=8` lines) over ssh

Each process gets NEOX_COORDINATOR, NEOX_NUM_PROCESSES and NEOX_PROCESS_ID (neox_jax/distributed.py reads
them). Commands are argument lists, never shell strings; over ssh the remote command is quoted argument by
argument (shlex.quote), so no input can run as shell syntax.

The launcher forwards SIGTERM and SIGINT to every process (they agree on a step, save it and exit 0). When a
process dies, the launcher says which one and how, gives the others `grace` seconds to notice (JAX's
heartbeat stops them), ends those that remain, names the last complete checkpoint and exits non-zero.
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

from neox_jax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from neox_jax.errors import LaunchError


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


def latest_checkpoint(command: Sequence[str]) -> str | None:
    """The newest complete checkpoint of a `neox-jax train CONFIG [key=value ...]` command, if it has one."""
    args = list(command)
    if "train" not in args or args.index("train") + 1 >= len(args):
        return None
    i = args.index("train")
    try:
        from neox_jax.config import TrainConfig, apply_overrides

        cfg = apply_overrides(TrainConfig.from_yaml(args[i + 1]), [a for a in args[i + 2:] if "=" in a])
    except Exception:  # noqa: BLE001 - a report, not a check: the command itself said what was wrong
        return None
    folder = Path(cfg.save) if cfg.save else None
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder and folder.is_dir() else []
    return f"{folder.absolute()}/{steps[-1]}" if steps else None


def supervise(procs: list[Process], command: Sequence[str], grace: float = 60.0, out=sys.stderr) -> int:
    """Wait for every process; forward SIGTERM/SIGINT; on a failure report it and stop the rest."""

    def forward(signum, _frame):
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed = None
        while failed is None and any(p.popen.poll() is None for p in procs):
            failed = next((p for p in procs if (p.popen.poll() or 0) != 0), None)
            time.sleep(0.1)
        failed = failed or next((p for p in procs if p.popen.returncode != 0), None)
        if failed is None:
            return 0
        code = failed.popen.returncode
        print(f"neox-jax launch: process {failed.rank} (host {failed.host}, pid {failed.popen.pid}) "
              f"{_describe(code)}", file=out, flush=True)
        deadline = time.time() + grace
        while any(p.popen.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.1)
        for p in procs:
            if p.popen.poll() is None:
                print(f"neox-jax launch: process {p.rank} still running after {grace:.0f}s: stopping it", file=out)
                p.popen.kill()
                p.popen.wait()
        for p in procs:
            if p is not failed:
                print(f"neox-jax launch: process {p.rank} {_describe(p.popen.returncode)}"
                      if p.popen.returncode else f"neox-jax launch: process {p.rank} exited cleanly", file=out)
        ckpt = latest_checkpoint(command)
        print("neox-jax launch: " + (f"last complete checkpoint: {ckpt}; run the same command to resume from it"
                                     if ckpt else "no complete checkpoint to resume from"), file=out, flush=True)
        return code if code > 0 else 128 - code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
