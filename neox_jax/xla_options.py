"""XLA compiler options of the compiled training step: this backend's defaults, the `xla_options` setting over them.

They go to `jax.jit(..., compiler_options=...)` of the step, not into XLA_FLAGS: they apply to our programs alone,
and a name or value this jaxlib does not take is an error naming the setting (checked on a trivial program before
the step compiles), where an unknown XLA_FLAGS entry aborts the process at start-up.

On a GPU the defaults are the scheduling and collective options of MaxText's H100 recipes (`configs/gpu/a3/*/1vm.sh`,
the recipe behind its ~50% MFU for Llama2-7B on 8 x H100; ../shared/reference/jax-frameworks-reference.md). Each
acts on collectives and loops: the gradients' reduce-scatter, FSDP's per-layer gathers, the pipeline's sends, the
layer scan. Their measured effect is in docs/benchmarks.md where a GPU was at hand. Other backends get none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from neox_jax.errors import ConfigError

MiB = 1 << 20
GPU_DEFAULTS: dict[str, Any] = {
    # schedule collectives to overlap compute instead of in program order
    "xla_gpu_enable_latency_hiding_scheduler": True,
    # in loops (the layer scan, the pipeline's ticks), start iteration i + 1's collectives during iteration i
    "xla_gpu_enable_while_loop_double_buffering": True,
    "xla_gpu_enable_pipelined_all_gather": True,
    "xla_gpu_enable_pipelined_reduce_scatter": True,
    "xla_gpu_enable_pipelined_all_reduce": True,
    # combine small collectives (one per weight) into few large ones, up to these sizes
    "xla_gpu_all_reduce_combine_threshold_bytes": 128 * MiB,
    "xla_gpu_all_gather_combine_threshold_bytes": 128 * MiB,
    "xla_gpu_reduce_scatter_combine_threshold_bytes": 64 * MiB,
}


# Sequence parallelism's gathers and reduce-scatters of activations in the layer scan depend on the previous layer:
# XLA's collective pipeliner cloned the layers to start them an iteration early (twice the GEMMs and cuDNN calls,
# 2.5x the temporaries of a 4-layer, 4-microstep step in XLA's GPU count), so they are not pipelined.
SEQUENCE_PARALLEL = {"xla_gpu_enable_pipelined_all_gather": False, "xla_gpu_enable_pipelined_reduce_scatter": False}


def defaults(backend: str, sequence_parallel: bool = False) -> dict[str, Any]:
    if backend not in ("gpu", "cuda", "rocm"):
        return {}
    return {**GPU_DEFAULTS, **(SEQUENCE_PARALLEL if sequence_parallel else {})}


def compiler_options(overrides: Mapping[str, Any], backend: str | None = None, sequence_parallel: bool = False
                     ) -> dict[str, Any]:
    """The options the step compiles with on `backend` (default: JAX's): the defaults (with `sequence_parallel`,
    its own) with `overrides` over them, where an override of None removes a default. They are tried on a trivial
    program first, so a name or value this jaxlib does not take is a ConfigError naming it and the setting, before
    the step compiles."""
    options = defaults(backend or jax.default_backend(), sequence_parallel)
    for name, value in overrides.items():
        if value is None:
            options.pop(name, None)
        else:
            options[name] = value
    try:
        if options:
            jax.jit(lambda: 0, compiler_options=options).lower().compile()
    except Exception as e:  # XLA's INVALID_ARGUMENT, naming the option: "No such compile option: 'x'", ...
        raise ConfigError(f"xla_options {options}: XLA (jax {jax.__version__}) refuses one: {str(e).splitlines()[0]}; "
                          "correct or remove it in `xla_options` (null drops one of the defaults)") from None
    return options
