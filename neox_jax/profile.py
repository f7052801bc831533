"""`profile_steps`: a `jax.profiler` trace of chosen training steps (TensorBoard's profile plugin or Perfetto reads
it), and the time per step it shows split into compute and communication.

The trace is read back from the Perfetto file JAX writes beside it: every event named like an XLA instruction
(`fusion.12`, `all-reduce.3`, `dot`, and NCCL's kernels on a GPU) on the devices' timelines is an op; collectives
(all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all, NCCL) are communication, their waits for
the slowest peer included; every other op is compute. Summed over the devices' timelines and divided by devices x
steps: seconds per device per step.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import jax

COLLECTIVE = re.compile(r"all-reduce|all-gather|reduce[-_]scatter|collective-permute|all-to-all|nccl", re.I)
OP = re.compile(r"^[a-z][\w\-]*(\.\d+)?$")  # an XLA instruction or fusion, as the CPU and GPU traces name ops


class StepProfiler:
    """Starts the trace before step `first` and stops it after step `last` (1-based, inclusive) on process 0, then
    logs and prints the step breakdown."""

    def __init__(self, steps: tuple[int, ...], folder: str | Path | None, enabled: bool, logger=None, print_fn=print):
        self.first, self.last = steps if steps else (0, -1)
        self.folder = Path(folder) if folder else None  # the config requires one with `profile_steps`
        self.on = bool(steps) and enabled
        self.logger, self.print = logger, print_fn
        self.tracing = False

    def before(self, step: int):
        """`step` is the 1-based step about to be dispatched."""
        if self.on and step == self.first:
            jax.profiler.start_trace(str(self.folder), create_perfetto_trace=True)
            self.tracing = True

    def after(self, step: int, result) -> dict | None:
        """After dispatching 1-based `step`: at the last traced step, wait for `result`, stop and summarise."""
        if not (self.tracing and step == self.last):
            return None
        jax.block_until_ready(result)
        self.close()
        split = breakdown(newest_trace(self.folder), jax.local_device_count(), self.last - self.first + 1)
        if self.logger:
            self.logger.log(step, {f"profile_{k}": v for k, v in split.items()})
        self.print(f"profiled steps {self.first}-{self.last} into {self.folder} (TensorBoard's profile tab, or "
                   f"Perfetto): per device per step {split['compute_s'] * 1e3:.1f} ms compute, "
                   f"{split['communication_s'] * 1e3:.1f} ms communication (collectives, waits included)")
        return split

    def close(self):
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def newest_trace(folder: Path) -> Path:
    return max(folder.glob("plugins/profile/*/*perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)


def breakdown(trace: Path, devices: int, steps: int) -> dict[str, float]:
    """Compute and communication seconds per device per step in a Perfetto trace of `steps` steps."""
    with gzip.open(trace) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpus = {pid for pid, name in names.items() if "/device:GPU" in name}
    timelines = gpus or set(names)  # a GPU's own timelines when there are; on a CPU the host's
    compute = communication = 0.0
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or e.get("pid") not in timelines or not (OP.match(name) or "nccl" in name.lower()):
            continue
        if COLLECTIVE.search(name):
            communication += e.get("dur", 0.0)
        else:
            compute += e.get("dur", 0.0)
    scale = 1e-6 / (devices * steps)  # microseconds, summed over the devices
    return {"compute_s": compute * scale, "communication_s": communication * scale}
