"""host_malloc: under a CPU backend a compiled call's freed buffers are reused by the next call, not paged in afresh.

Each case runs in a fresh process: the setting is process-wide and must come before JAX starts its backend.
"""

import json
import os
import platform
import statistics
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc",
    reason=f"host_malloc sets glibc's malloc only; this Python runs on {platform.libc_ver()[0] or 'another C library'}")

# a call whose 256 MiB output is freed before the next: new pages touched by each call (minor page faults)
PROBE = """
import json, resource, sys
{before}
from neox_jax import host_malloc
{setup}
import neox_jax.model
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.broadcast_to(x, (1 << 26,)) + 1.0)
faults = []
for i in range(16):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(jnp.float32(i)).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps({{"applied": host_malloc.reuse_freed_memory(), "faults": faults}}))
"""


def probe(malloc: str | None = None, before: str = "", setup: str = "host_malloc.reuse_freed_memory()") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NEOX_JAX_MALLOC"}
    env["JAX_PLATFORMS"] = "cpu"
    if malloc:
        env["NEOX_JAX_MALLOC"] = malloc
    out = subprocess.run([sys.executable, "-c", PROBE.format(before=before, setup=setup)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_buffers_are_reused_under_a_cpu_backend():
    reuse, system = probe(), probe("system")
    assert reuse["applied"] and not system["applied"]
    # glibc's defaults map each 256 MiB output afresh: 65,536 pages of 4 KiB (fewer, larger ones with transparent
    # huge pages always on). Kept for reuse, the pages are touched once: the heap grows over the first calls to
    # the room of two or three outputs (when a freed output is released depends on the runtime's threads, so the
    # call that grows it varies from run to run), and after that a call touches none
    reused, fresh = statistics.median(reuse["faults"]), statistics.median(system["faults"])
    assert fresh >= 100
    assert reused * 20 <= fresh, (reuse["faults"], system["faults"])


def test_nothing_is_set_once_the_backend_has_started_nor_by_an_import():
    assert not probe(before="import jax; jax.devices()")["applied"]
    assert not probe(setup="")["applied"]  # importing the model changes no allocator: the call is explicit


def test_a_bad_setting_is_refused_naming_it():
    env = {**os.environ, "NEOX_JAX_MALLOC": "jemalloc"}
    out = subprocess.run([sys.executable, "-m", "neox_jax.cli", "info", "pythia-14m"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2
    assert "error: NEOX_JAX_MALLOC='jemalloc'" in out.stderr and "reuse" in out.stderr and "system" in out.stderr
