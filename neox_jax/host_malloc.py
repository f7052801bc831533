"""The host allocator under a CPU backend: freed memory is kept for the next call instead of going back to the OS.

XLA's CPU backend mallocs each call's temporaries and outputs and frees them when the call ends. Under glibc's
defaults a buffer above the mmap threshold (128 KiB, raised up to 32 MiB as such buffers are freed), and any buffer
over 64 MiB that one of XLA's threads allocates in its own arena, is a new mapping: the kernel zero-fills each of its
4 KiB pages at first touch, at every call. A pythia-70m train step (4 x 512 tokens, fp32) touched 1.2 GB of new pages
in its forward and 1.5 GB in its gradient; without them its forward took 1.0 s instead of 1.3 s, and the attention
scores' product alone 4.8 ms instead of 13.5 (docs/benchmarks.md).

`reuse_freed_memory()` sets glibc's malloc (`mallopt`) before JAX starts a CPU backend. It is an explicit call,
never a side effect of an import: the CLI makes it first thing, as do the benchmarks and the test suite; a library
user who wants it calls it before computing anything with JAX. Then every thread allocates from one arena, no buffer
is mapped on its own, and freed memory at the heap's top is kept. The process then holds its peak: its resident
memory does not shrink after its largest call. It must come before the backend starts (XLA's threads take arenas of
their own then), so it does nothing once one has, nor where the backend may be an accelerator (a GPU or TPU plugin
with its driver is installed and JAX_PLATFORMS does not name the CPU first), nor under another C library. `NEOX_JAX_MALLOC=system`
leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

from neox_jax.distributed import cpu_only
from neox_jax.errors import ConfigError

SETTING = "NEOX_JAX_MALLOC"
MODES = ("reuse", "system")
# glibc's malloc.h; -1 as a threshold is SIZE_MAX: none
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
OPTIONS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, -1), (M_TRIM_THRESHOLD, -1))

_applied: bool | None = None


def mode() -> str:
    value = os.environ.get(SETTING, "reuse")
    if value not in MODES:
        raise ConfigError(f"{SETTING}={value!r}: choose reuse (the default: on a CPU backend keep freed memory for the "
                          "next call) or system (glibc's defaults)")
    return value


def reuse_freed_memory() -> bool:
    """Set glibc's malloc as above, once per process, where it applies; True when it is set."""
    global _applied
    wanted = mode() == "reuse"
    if _applied is None:
        _applied = (wanted and platform.libc_ver()[0] == "glibc" and not _backend_started() and cpu_only()
                    and all(ctypes.CDLL(None).mallopt(option, value) == 1 for option, value in OPTIONS))
    return _applied


def state() -> str:
    """"reuse" when this process's malloc was set, else "system"."""
    return "reuse" if reuse_freed_memory() else "system"


def _backend_started() -> bool:
    from jax._src import xla_bridge  # no public API tells; without this one, assume it has

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return started is None or started()
