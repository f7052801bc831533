"""Several processes, one JAX program: `jax.distributed` joined from explicit settings, the environment,
SLURM or Open MPI, and what each process does in it.

In JAX every host runs the same program; `initialize` makes the processes one set of devices before any
backend starts. Where the settings come from, first match wins:

    1. arguments (`--coordinator HOST:PORT --num-processes N --process-id I` on the command line)
    2. NEOX_COORDINATOR, NEOX_NUM_PROCESSES, NEOX_PROCESS_ID (what `neox-jax launch` sets; any launcher can)
    3. JAX's own detection of SLURM (`srun`) and Open MPI (`mpirun`), when they start more than one process

Nothing found means one process, and nothing is initialised: a single-process run stays as it always was.
On CPU the processes exchange data through gloo, so several CPU processes form one mesh (the tests do).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Mapping

from neox_jax.errors import LaunchError

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "NEOX_COORDINATOR", "NEOX_NUM_PROCESSES", "NEOX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "NEOX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class Launch:
    coordinator: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # None: every device this process sees
    source: str  # "arguments", "environment", "slurm" or "ompi"


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{name}={value!r}: expected a whole number") from None


def local_device_ids(environ: Mapping[str, str], tasks_per_node: int | None = None) -> tuple[int, ...] | None:
    """The accelerators this process drives, as indices among those it can see.

    NEOX_LOCAL_DEVICE_IDS wins; under SLURM with one task per node, all the node's GPUs (SLURM_GPUS_ON_NODE, or
    CUDA_VISIBLE_DEVICES) -- JAX alone would give such a task only GPU 0; otherwise None (JAX's default).
    """
    if environ.get(ENV_LOCAL_DEVICE_IDS):
        return tuple(_int(i, ENV_LOCAL_DEVICE_IDS) for i in environ[ENV_LOCAL_DEVICE_IDS].split(","))
    if tasks_per_node == 1:
        if environ.get("CUDA_VISIBLE_DEVICES"):
            return tuple(range(len(environ["CUDA_VISIBLE_DEVICES"].split(","))))
        if environ.get("SLURM_GPUS_ON_NODE"):
            return tuple(range(_int(environ["SLURM_GPUS_ON_NODE"], "SLURM_GPUS_ON_NODE")))
    return None


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> int | None:
    value = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
    value = value.split("(")[0].split(",")[0]  # "1(x12)" -> "1"
    return int(value) if value.isdigit() else None


def detect(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
           environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process belongs to, or None for a single process (see the module docstring)."""
    environ = os.environ if environ is None else environ
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise LaunchError("give all three of --coordinator, --num-processes and --process-id (or none)")
        launch = Launch(coordinator, _int(num_processes, "--num-processes"), _int(process_id, "--process-id"),
                        local_device_ids(environ), "arguments")
    elif any(k in environ for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
        missing = [k for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not environ.get(k)]
        if missing:
            raise LaunchError(f"{', '.join(missing)} not set: a launch through the environment sets "
                              f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} together")
        launch = Launch(environ[ENV_COORDINATOR], _int(environ[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES),
                        _int(environ[ENV_PROCESS_ID], ENV_PROCESS_ID), local_device_ids(environ), "environment")
    else:
        launch = _cluster_launch(environ)
        if launch is None:
            return None
    if ":" not in launch.coordinator:
        raise LaunchError(f"coordinator {launch.coordinator!r}: expected HOST:PORT, e.g. node001:12355")
    if not 0 <= launch.process_id < launch.num_processes:
        raise LaunchError(f"process id {launch.process_id} is outside 0..{launch.num_processes - 1} "
                          f"for {launch.num_processes} processes")
    return launch


def _cluster_launch(environ: Mapping[str, str]) -> Launch | None:
    """SLURM or Open MPI through JAX's own detection, when they started more than one process."""
    from jax._src import clusters  # what jax.distributed.initialize itself uses

    with _environ(environ):
        for name, env in (("slurm", clusters.SlurmCluster), ("ompi", clusters.OmpiCluster)):
            if not env.is_env_present():
                continue
            if env.get_process_count() <= 1:
                return None
            tasks = _slurm_tasks_per_node(environ) if name == "slurm" else None
            ids = local_device_ids(environ, tasks)
            if ids is None and env.get_local_process_id() is not None:
                ids = (env.get_local_process_id(),)  # one device per process, as JAX does
            return Launch(env.get_coordinator_address(None, None), env.get_process_count(), env.get_process_id(),
                          ids, name)
    return None


class _environ:
    """Let JAX's detectors (which read os.environ) read `environ` instead."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def __enter__(self):
        self.saved = None
        if self.environ is not os.environ:
            self.saved = dict(os.environ)
            os.environ.clear()
            os.environ.update(self.environ)

    def __exit__(self, *_):
        if self.saved is not None:
            os.environ.clear()
            os.environ.update(self.saved)


def cpu_only() -> bool:
    """True when JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator is usable. A plugin counts only
    with its driver: the gpu-plan extra installs the CUDA plugin on machines without a GPU (to compile GPU programs),
    where JAX falls back to the CPU and a CPU run must keep its emulated devices and allocator setting."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(_driver_present(name) for name in _accelerator_plugins())


def without_a_gpu_skip_cuda_checks():
    """Where JAX's CUDA plugin is installed but no NVIDIA driver is (the gpu-plan extra on a CPU machine), skip the
    plugin's CUDA runtime version check, its own switch: it cannot pass without a GPU and JAX logs its failure as a
    traceback in every process that starts a backend; compiling for GPUs does not need it. Call before JAX starts."""
    if any("cuda" in name for name in _accelerator_plugins()) and not _driver_present("cuda"):
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


@functools.lru_cache(maxsize=None)  # what is installed and which drivers load do not change within a process
def _accelerator_plugins() -> frozenset[str]:
    """JAX's accelerator plugins installed (the `jax_plugins` namespace package or entry points; TPUs' libtpu)."""
    from importlib.metadata import entry_points
    from importlib.util import find_spec

    names = {ep.name for ep in entry_points(group="jax_plugins")}
    if find_spec("jax_plugins"):
        import pkgutil

        import jax_plugins

        names |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
    return frozenset(names | ({"libtpu"} if find_spec("libtpu") else set()))


@functools.lru_cache(maxsize=None)
def _driver_present(plugin: str) -> bool:
    """Whether `plugin`'s device driver is here: NVIDIA's libcuda for CUDA, the kernel's /dev/kfd for ROCm; any
    other plugin is taken to have one."""
    if "cuda" in plugin:
        import ctypes

        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError:
            return False
        return True
    if "rocm" in plugin:
        return os.path.exists("/dev/kfd")
    return True


CPU_THREADS_PER_DEVICE = 8


def emulate_cpu_devices(n: int):
    """Give the CPU backend `n` devices when JAX runs on the CPU (a mesh rehearsed on a laptop); on a machine
    with accelerators nothing changes. Must precede the first use of a backend.

    It also gives XLA's CPU runtime `CPU_THREADS_PER_DEVICE` threads per device (PJRT_NPROC, unless set): each
    collective in flight holds a thread while it waits for its peers, and a device may start several at once
    (XLA orders collectives by scheduling, not completion), so a pool of one thread per device can be held entirely
    by waiting collectives and deadlock a pipelined step (docs/sharding.md, "Emulated devices")."""
    import jax

    if cpu_only():
        if n > 1:
            os.environ.setdefault("PJRT_NPROC", str(min(CPU_THREADS_PER_DEVICE * n, 256)))
        jax.config.update("jax_num_cpu_devices", n)


def initialize(launch: Launch | None, init_timeout: int = 300, heartbeat_timeout: int = 100) -> Launch | None:
    """Join the launch (nothing for a single process). Call before anything touches a JAX backend."""
    if launch is None or launch.num_processes == 1:
        return launch
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX ends the process from C++ when a peer does not join in time (DEADLINE_EXCEEDED ... RegisterTask): say
    # first (process 0, which alone prints) what the launch is waiting for, so that message has its context.
    if launch.process_id == 0:
        print(f"neox-jax: {launch.num_processes} processes joining at {launch.coordinator} ({launch.source}); "
              f"waiting up to init_timeout={init_timeout}s for all of them", file=sys.stderr, flush=True)
    jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                               local_device_ids=list(launch.local_device_ids) if launch.local_device_ids else None,
                               cluster_detection_method="deactivate", initialization_timeout=init_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout)
    from neox_jax import interrupts

    jax.devices()  # the backend starts JAX's preemption notifier, which takes SIGTERM:
    interrupts.take_back()  # the CLI's handling stays (neox_jax/interrupts.py)
    return launch


def is_primary() -> bool:
    """Process 0: the one that prints and writes logs."""
    import jax

    return jax.process_index() == 0
