"""The model's matrix products in a dtype below fp32, as XLA's CPU backend runs them fast.

XLA's CPU backend runs a product whose result is bf16 as an fp32 product of operands it converts to fp32 first; the
same product with an fp32 result it hands to its bf16 kernel (AMX where the CPU has it), six times faster on 2048 x
512 x 2048 (docs/benchmarks.md). So on a CPU, below fp32, `einsum` asks for the fp32 result and rounds it to the
operands' dtype, in the forward and in both products of the backward (a custom VJP: autodiff would multiply the fp32
cotangent by a bf16 operand, a mixed product that XLA again runs in fp32). The numbers are the plain einsum's up to
summation order: either way the products are exact in fp32, summed in fp32 and rounded once. Elsewhere (GPUs
multiply bf16 natively) and in fp32 it is the plain einsum, and so under `as_on_gpu()`, which the planner traces in:
it compiles a GPU cluster's program on this CPU, and the fp32 results would double the bytes of the tensor-parallel
all-reduces it counts.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32
_CPU_PRODUCTS = contextvars.ContextVar("cpu_products", default=True)
_PLATFORM = contextvars.ContextVar("platform", default=None)  # the devices the traced program is compiled for


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def compiling_for(platform: str | None):
    """Trace for `platform`'s devices ("cpu", "gpu"; None: the process's default backend): the mesh's, so that a
    CPU process compiling a GPU cluster's program (the planner) makes the GPU's hardware choices."""
    return _setting(_PLATFORM, platform)


def platform() -> str:
    """The platform of the program being traced: `compiling_for`'s, else JAX's default backend."""
    return _PLATFORM.get() or jax.default_backend()


def as_on_gpu():
    """Trace the plain products, and the attention a GPU would run, whatever the backend (the planner's fallback:
    GPU programs compiled for CPU devices)."""
    return _setting(_CPU_PRODUCTS, False)


def cpu_program() -> bool:
    """Whether the program being traced runs on CPU devices, not under `as_on_gpu()`."""
    return platform() == "cpu" and _CPU_PRODUCTS.get()


def einsum(spec: str, x, w):
    """`jnp.einsum(spec, x, w)` for two operands of the same dtype, the result in that dtype (module docstring). A
    product with batch indices (in both operands and the result, as attention's) is the plain einsum: XLA's CPU
    backend fails at run time on some of their backward products with bf16 operands and an fp32 result
    ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32", JAX 0.10.2)."""
    xs, ws, out = _indices(spec)
    if x.dtype == F32 or not cpu_program() or set(xs) & set(ws) & set(out):
        return jnp.einsum(spec, x, w)
    return _rounded(spec, x, w)


def _indices(spec: str) -> tuple[str, str, str]:
    """"btd,df->btf" -> ("btd", "df", "btf")."""
    inputs, out = spec.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    return xs, ws, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rounded(spec: str, x, w):
    return jnp.einsum(spec, x, w, preferred_element_type=F32).astype(x.dtype)


def _rounded_fwd(spec, x, w):
    return _rounded(spec, x, w), (x, w)


def _rounded_bwd(spec, residuals, g):
    """Each operand's gradient is the product of the cotangent with the other operand, spec permuted; every index of
    an operand appears in the other or in the result (no operand is summed over alone), as in every product here."""
    x, w = residuals
    xs, ws, out = _indices(spec)
    assert set(xs) <= set(ws + out) and set(ws) <= set(xs + out), spec
    return _rounded(f"{out},{ws}->{xs}", g, w), _rounded(f"{xs},{out}->{ws}", x, g)


_rounded.defvjp(_rounded_fwd, _rounded_bwd)
