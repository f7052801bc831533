"""NVIDIA cards as data, and compile-only devices of them for XLA's own GPU compiler on a machine without a GPU.

`CARDS` is the project's one table of card facts: the planner's capacity, the step-time predictor's peak and
NVLink, the decode bound's bandwidth, and the `GpuTargetConfigProto` that `topology` renders from them for JAX's
deviceless compiles (`jax.experimental.topologies`). The facts are the cards' published ones; memory is what the
card reports (nvidia-smi's total). Compiling for them needs the `gpu-plan` extra: the CUDA plugin and PJRT at the
installed JAX's version, ptxas and cuDNN (whose version the rendered config declares: it gates cuDNN's fusions).

A real GPU autotunes each product between cuBLAS and Triton; a deviceless compile cannot run kernels, so it compiles
with autotuning off and every GEMM on cuBLAS (`DEVICELESS_OPTIONS`): at autotune level 0 XLA picks Triton tilings
without measuring them and fails on some (the pipeline's `abk,ku->abu`, "Couldn't find output tile sizes").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from importlib.metadata import PackageNotFoundError, version

from neox_jax.errors import ConfigError

KiB, MiB = 1 << 10, 1 << 20
GPU_PLAN = "pip install -e '.[gpu-plan]'"


@dataclasses.dataclass(frozen=True)
class Card:
    name: str  # ours: what --target and cluster files name
    product: str  # the device kind JAX reports
    compute_capability: tuple[int, int]
    sms: int
    fp32_per_sm: int
    clock_ghz: float  # boost
    memory: int  # bytes, as the card reports them
    bandwidth_gbps: float  # memory, GB/s
    l2: int  # bytes
    shared_per_sm: int  # bytes
    shared_per_block_optin: int  # bytes
    threads_per_sm: int
    peak_tflops: float  # dense bf16 with fp32 accumulation
    nvlink_gbps: float  # per device and direction (0: none)


CARDS = {c.name: c for c in (
    Card("a100-40gb", "NVIDIA A100-SXM4-40GB", (8, 0), 108, 64, 1.41, 40960 * MiB, 1555, 40 * MiB, 164 * KiB,
         163 * KiB, 2048, 312.0, 300.0),
    Card("a100-80gb", "NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 1.41, 81920 * MiB, 2039, 40 * MiB, 164 * KiB,
         163 * KiB, 2048, 312.0, 300.0),
    Card("h100-80gb", "NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 1.98, 81559 * MiB, 3352, 50 * MiB, 228 * KiB,
         227 * KiB, 2048, 989.0, 450.0),
    Card("h200-141gb", "NVIDIA H200", (9, 0), 132, 128, 1.98, 143771 * MiB, 4800, 50 * MiB, 228 * KiB, 227 * KiB,
         2048, 989.0, 450.0),
    # the inference cards GPT-NeoX-20B's authors name (an NVLink bridge: 112.5 GB/s both ways)
    Card("a6000-48gb", "NVIDIA RTX A6000", (8, 6), 84, 128, 1.80, 49140 * MiB, 768, 6 * MiB, 100 * KiB, 99 * KiB,
         1536, 154.8, 56.25),
    Card("rtx3090ti-24gb", "NVIDIA GeForce RTX 3090 Ti", (8, 6), 84, 128, 1.86, 24564 * MiB, 1008, 6 * MiB,
         100 * KiB, 99 * KiB, 1536, 80.0, 56.25),
)}

# What a compile without a device needs (module docstring); a real GPU's compile keeps XLA's defaults.
DEVICELESS_OPTIONS = {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}


def card(name: str) -> Card:
    if name not in CARDS:
        raise ConfigError(f"--target {name!r}: choose one of {', '.join(CARDS)}")
    return CARDS[name]


def card_of(device_kind: str) -> Card | None:
    """The card JAX reports as `device_kind` ('NVIDIA H100 80GB HBM3'), if it is in the table."""
    return next((c for c in CARDS.values() if c.product == device_kind), None)


def preallocation(peak: int, capacity: int) -> str:
    """What a run needs set when its program takes more than the 75% of the card JAX preallocates by default."""
    if peak <= 0.75 * capacity or peak > capacity:
        return ""
    return (f"; above the 75% JAX takes by default: run with XLA_PYTHON_CLIENT_MEM_FRACTION="
            f"{min(0.99, -(-100 * peak // capacity) / 100 + 0.01):.2f}")


def cudnn_version() -> tuple[int, int, int]:
    """The installed cuDNN's (major, minor, patch), from its wheel."""
    try:
        major, minor, patch = (int(x) for x in version("nvidia-cudnn-cu12").split(".")[:3])
    except PackageNotFoundError:
        raise ConfigError(f"compiling for a GPU here needs cuDNN: {GPU_PLAN}") from None
    return major, minor, patch


def missing() -> list[str]:
    """What of the gpu-plan extra is not installed (empty: GPU programs compile on this machine)."""
    found = {"jax-cuda12-plugin": importlib.util.find_spec("jax_plugins.xla_cuda12") is not None,
             "nvidia-cuda-nvcc-cu12 (ptxas)": _ptxas() is not None,
             "nvidia-cudnn-cu12": importlib.util.find_spec("nvidia.cudnn") is not None}
    return [name for name, ok in found.items() if not ok]


def _ptxas() -> str | None:
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "bin", "ptxas")
        if os.path.exists(path):
            return path
    return None


def target_config(c: Card) -> str:
    """The card as a `stream_executor.GpuTargetConfigProto` in text form, declaring the installed cuDNN."""
    major, minor, patch = cudnn_version()
    info = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * KiB,
                shared_memory_per_block_optin=c.shared_per_block_optin, shared_memory_per_core=c.shared_per_sm,
                threads_per_core_limit=c.threads_per_sm, core_count=c.sms, fpus_per_core=c.fp32_per_sm,
                block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
                memory_bandwidth=int(c.bandwidth_gbps * 1e9), l2_cache_size=c.l2, clock_rate_ghz=c.clock_ghz,
                device_memory_size=c.memory, registers_per_core_limit=65536, registers_per_block_limit=65536)
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    cc_major, cc_minor = c.compute_capability
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {cc_major} minor: {cc_minor} }}\n}}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ major: {major} minor: {minor} patch: {patch} }}\n'
            f'device_description_str: "{c.product}"\n')


def topology(name: str, hosts: int = 1, per_host: int = 8) -> list:
    """Compile-only devices: `hosts` x `per_host` cards of `name` (each device's `process_index` its host), for
    `sharding.make_mesh(..., devices=...)` and `jit(...).lower(...).compile()` on this CPU machine."""
    c = card(name)
    lacking = missing()
    if lacking:
        raise ConfigError(f"compiling for {name} needs the gpu-plan extra ({', '.join(lacking)} missing): {GPU_PLAN}")
    from neox_jax.distributed import without_a_gpu_skip_cuda_checks

    without_a_gpu_skip_cuda_checks()  # else, where JAX_PLATFORMS was set late, the plugin would not start
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="cuda", target_config=target_config(c),
                                                 topology=f"{hosts}x1x{per_host}").devices)
    except NotImplementedError:  # JAX started before the switch above, and its CUDA plugin failed to start
        raise ConfigError("JAX's CUDA plugin did not start in this process (JAX ran before it could be told there "
                          "is no GPU here): set JAX_PLATFORMS=cpu before anything uses JAX, then plan") from None
