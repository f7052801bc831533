"""`neox-jax plan --generate`: a model's inference compiled for cards it may never have met, by XLA's GPU compiler.

Prefill (a prompt of `context - new_tokens` tokens into a cache of `context` positions) and the decode step that
reads all `context` positions are the generator's own jitted programs (`generation._prefill`, `_decode_step`: the
model's stacked weights and cache, as a GPU runs them), compiled for `tensor` compile-only devices of the target
(neox_jax/gpus.py) with the weights split by the rules table. Each reports XLA's GPU memory; the decode step also its
HBM-bandwidth bound: a step reads every weight and cache byte a device holds once, so a device can do no more than
bandwidth / those bytes steps per second, `batch` tokens each (the communication between the `tensor` devices
and everything else only lower it).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from neox_jax import gpus, matmul
from neox_jax import sharding as shd
from neox_jax.config import NeoXConfig
from neox_jax.errors import ConfigError

GB = 1e9


@dataclasses.dataclass
class Program:
    argument: int  # bytes per device, XLA's count
    output: int
    alias: int
    temp: int
    seconds: float  # compile time

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp


@dataclasses.dataclass
class GeneratePlan:
    model: str
    params: int  # parameters
    target: str
    tensor: int
    batch: int
    context: int
    dtype: str
    weights: int  # bytes per device, from the specs
    cache: int  # bytes per device at `context` positions
    prefill: Program
    decode: Program
    capacity: int
    bandwidth_gbps: float

    @property
    def fits(self) -> bool:
        return max(self.prefill.total, self.decode.total) <= self.capacity

    @property
    def tokens_per_s_bound(self) -> float:
        """Tokens per second the decode step cannot exceed: `batch` tokens per read of the weights and cache."""
        return self.batch * self.bandwidth_gbps * GB / (self.weights + self.cache)

    def report(self) -> str:
        def rows(name, p: Program):
            return [f"{name} (compiled in {p.seconds:.1f}s)",
                    f"  {'arguments':40s} {p.argument / GB:8.2f} GB", f"  {'outputs, less donated buffers':40s} "
                    f"{(p.output - p.alias) / GB:8.2f} GB", f"  {'temporaries':40s} {p.temp / GB:8.2f} GB",
                    f"  {'total':40s} {p.total / GB:8.2f} GB"]

        peak = max(self.prefill.total, self.decode.total)
        verdict = "fits" if self.fits else f"does NOT fit: {(peak - self.capacity) / GB:.2f} GB over"
        return "\n".join([
            f"{self.model} ({self.params / 1e9:.2f}B parameters, {self.dtype}) on {self.tensor} x {self.target} "
            f"(tensor={self.tensor}), batch {self.batch}, context {self.context}: XLA's GPU compiler, per device",
            f"  {'weights (from the specs)':40s} {self.weights / GB:8.2f} GB",
            f"  {'KV cache at the full context':40s} {self.cache / GB:8.2f} GB", "",
            *rows(f"prefill of {self.context - NEW_TOKENS} tokens", self.prefill), "",
            *rows("decode step (reads the whole cache)", self.decode), "",
            f"{self.target}: {self.capacity / 2**30:.1f} GiB per device -> {verdict} "
            f"({100 * peak / self.capacity:.0f}% by XLA's GPU count)" + gpus.preallocation(peak, self.capacity),
            f"decode bound by HBM bandwidth: {self.bandwidth_gbps:.0f} GB/s / {(self.weights + self.cache) / GB:.2f} "
            f"GB read per step x {self.batch} tokens = {self.tokens_per_s_bound:.1f} tokens/s (an upper bound)"])


NEW_TOKENS = 64  # room left after the prompt: the generator's bucket


def plan_generate(config: NeoXConfig, name: str, target: str, tensor: int = 1, batch: int = 1, context: int = 2048,
                  dtype: str = "bfloat16") -> GeneratePlan:
    from neox_jax.sharding import make_mesh

    card = gpus.card(target)
    problems = [f"{what}={value}: must be at least {least}" for what, value, least in
                (("--batch", batch, 1), ("--context", context, NEW_TOKENS + 1), ("--mesh tensor", tensor, 1))
                if value < least]
    if context > config.max_position_embeddings:
        problems.append(f"--context {context} exceeds the model's max_position_embeddings="
                        f"{config.max_position_embeddings}")
    if tensor >= 1 and config.num_heads % tensor:
        problems.append(f"--mesh tensor={tensor} does not divide num_heads={config.num_heads}")
    if problems:
        raise ConfigError("cannot plan this generation:\n  " + "\n  ".join(problems))
    mesh = make_mesh({"tensor": tensor}, gpus.topology(target, 1, tensor))
    programs = compile_generation(config.replace(dtype=dtype, param_dtype=dtype), mesh, batch, context,
                                  gpus.DEVICELESS_OPTIONS)

    def held(tree) -> int:
        return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree))

    return GeneratePlan(model=name, params=config.num_params, target=target, tensor=tensor, batch=batch,
                        context=context, dtype=dtype, weights=held(programs["params"]), cache=held(programs["cache"]),
                        prefill=_program(*programs["prefill"]), decode=_program(*programs["decode"]),
                        capacity=card.memory, bandwidth_gbps=card.bandwidth_gbps)


def compile_generation(config: NeoXConfig, mesh, batch: int, context: int, options: dict) -> dict:
    """The generator's prefill and decode step for `mesh`'s devices (weights laid out by the rules table), each
    compiled with `options`: {"prefill": (compiled, seconds), "decode": ..., "params": and "cache": their abstract
    arrays with shardings}."""
    from flax import nnx

    from neox_jax.generation import _decode_step, _prefill
    from neox_jax.model import abstract_model

    graphdef, state = abstract_model(config)
    abstract = nnx.to_pure_dict(state)
    specs = shd.param_specs(abstract, nnx.to_pure_dict(nnx.get_partition_spec(state)), mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                          abstract, specs, is_leaf=lambda x: isinstance(x, P))
    replicated = NamedSharding(mesh, P())

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    def compiled(fn, *args):
        t0 = time.perf_counter()
        out = fn.lower(*args).compile(compiler_options=options)
        return out, time.perf_counter() - t0

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), matmul.compiling_for(mesh.devices.flat[0].platform):
        prefill = compiled(_prefill, graphdef, params, None, arg((batch, context - NEW_TOKENS), jnp.int32),
                           arg((batch, context), jnp.int32), context)
        logits, cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                     prefill[0].out_info, prefill[0].output_shardings)
        carry = {"i": arg((), jnp.int32), "index": arg((), jnp.int32), "logits": logits, "cache": cache,
                 "mask": arg((batch, context), jnp.int32), "done": arg((batch,), bool),
                 "out": arg((batch, NEW_TOKENS), jnp.int32)}
        knobs = (arg((), jnp.float32), arg((), jnp.int32), arg((), jnp.float32), arg((), jnp.uint32),
                 arg((1,), jnp.int32))
        decode = compiled(_decode_step, graphdef, params, None, carry, knobs, context)
    return {"prefill": prefill, "decode": decode, "params": params, "cache": cache}


def _program(compiled, seconds: float) -> Program:
    mem = compiled.memory_analysis()
    return Program(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                   mem.temp_size_in_bytes, seconds)
