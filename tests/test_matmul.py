"""`matmul.einsum`: below fp32 on the CPU, the products run on bf16 operands with an fp32 result (forward and both
backward products), and give the plain einsum's numbers up to summation order."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax import matmul

BF16 = jnp.bfloat16
SPECS = [("btd,dnkh->btnkh", (2, 8, 32), (32, 4, 3, 16)), ("btf,fd->btd", (2, 8, 64), (64, 32)),
         ("bcv,dv->bcd", (2, 8, 128), (32, 128)), ("bk,kd->bd", (1, 96), (96, 64)),  # one row, as in decode
         ("bnts,bnsh->btnh", (2, 4, 8, 8), (2, 4, 8, 16))]  # batch indices: the plain einsum


def operands(x_shape, w_shape, dtype):
    kx, kw = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, x_shape).astype(dtype), jax.random.normal(kw, w_shape).astype(dtype)


def loss_of(einsum, spec):
    return lambda x, w: jnp.sum(jnp.sin(einsum(spec, x, w).astype(jnp.float32)))  # a cotangent that varies


@pytest.mark.parametrize("spec, x_shape, w_shape", SPECS, ids=[s[0] for s in SPECS])
def test_values_and_gradients_equal_the_plain_einsum(spec, x_shape, w_shape):
    x, w = operands(x_shape, w_shape, BF16)
    ours, plain = matmul.einsum(spec, x, w), jnp.einsum(spec, x, w)
    assert ours.dtype == BF16 and ours.shape == plain.shape
    # fp32 sums rounded once to bf16 either way: at most one bf16 unit (2^-8 relative) apart
    ulp = 2.0 ** -8 * np.abs(np.asarray(plain, np.float32)) + 1e-30
    assert np.all(np.abs(np.asarray(ours, np.float32) - np.asarray(plain, np.float32)) <= ulp)
    ours_g = jax.grad(loss_of(matmul.einsum, spec), argnums=(0, 1))(x, w)
    plain_g = jax.grad(loss_of(jnp.einsum, spec), argnums=(0, 1))(x, w)
    for a, b in zip(ours_g, plain_g):
        assert a.dtype == BF16
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 2.0 ** -7 * np.max(np.abs(b))


def dot_operand_dtypes(fn, *args) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in the compiled program (fused or not)."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    return [(types[a], types[b]) for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA's CPU backend: run with JAX_PLATFORMS=cpu")
def test_on_the_cpu_every_product_of_forward_and_backward_takes_bf16_operands():
    spec, x_shape, w_shape = SPECS[1]
    x, w = operands(x_shape, w_shape, BF16)
    grad = jax.grad(loss_of(matmul.einsum, spec), argnums=(0, 1))
    ours = dot_operand_dtypes(lambda x, w: (matmul.einsum(spec, x, w), grad(x, w)), x, w)
    assert len(ours) == 3 and set(ours) == {("bf16", "bf16")}
    # the plain einsum's become fp32 products of converted operands (what the module exists for)
    plain_grad = jax.grad(loss_of(jnp.einsum, spec), argnums=(0, 1))
    plain = dot_operand_dtypes(lambda x, w: (jnp.einsum(spec, x, w), plain_grad(x, w)), x, w)
    assert set(plain) == {("f32", "f32")}
    with matmul.as_on_gpu():  # the planner's programs: the plain products whatever the backend
        assert dot_operand_dtypes(lambda x, w: (matmul.einsum(spec, x, w), grad(x, w)), x, w) == plain


def test_fp32_is_the_plain_einsum_bit_for_bit():
    x, w = operands((2, 8, 64), (64, 32), jnp.float32)
    assert np.array_equal(matmul.einsum("btf,fd->btd", x, w), jnp.einsum("btf,fd->btd", x, w))
