"""Causal attention by query blocks (`attention.causal_blocks`, `auto`'s training attention on a CPU) against the einsum
reference, and which backend `auto` picks."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax import matmul
from neox_jax.attention import attend, attention_backend, causal_blocks


def qkv_and_cotangent(t: int, heads: int = 4, head_dim: int = 64):
    keys = jax.random.split(jax.random.key(t), 4)
    return [jax.random.normal(key, (2, t, heads, head_dim)) for key in keys]


def largest_relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("t,block", [(64, 16), (40, 16), (12, 16)])  # whole blocks, a shorter last one, one block
def test_causal_blocks_equal_the_einsum_in_value_and_gradient(t, block):
    """fp32: the same scores and softmax, summed in another order (measured: 3e-7 of the largest output, 8e-7 of the
    largest gradient). bf16 (inputs and cotangent rounded): as close to the fp32 reference as the einsum's own bf16,
    within two unit roundoffs of the largest entry (measured 3e-3 to 6e-3 for either)."""
    q, k, v, g = qkv_and_cotangent(t)
    want, want_vjp = jax.vjp(attend, q, k, v)
    got, got_vjp = jax.vjp(lambda *x: causal_blocks(*x, block=block), q, k, v)
    assert largest_relative_error(got, want) <= 1e-6
    for got_grad, want_grad in zip(got_vjp(g), want_vjp(g)):
        assert largest_relative_error(got_grad, want_grad) <= 2e-6
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, g)]
    got, got_vjp = jax.vjp(lambda *x: causal_blocks(*x, block=block), *bf16[:3])
    assert got.dtype == jnp.bfloat16 and largest_relative_error(got, want) <= 2**-7
    for got_grad, want_grad in zip(got_vjp(bf16[3]), want_vjp(g)):
        assert got_grad.dtype == jnp.bfloat16 and largest_relative_error(got_grad, want_grad) <= 2**-7


def test_causal_blocks_never_score_a_block_above_the_diagonal():
    """Compiled forward and backward at t = 256 in blocks of 64: each block's scores span only the keys up to its last
    query ([.., 64, 64 / 128 / 192 / 256]), and no [t, t] array (scores or probabilities) exists anywhere."""
    q, k, v, g = qkv_and_cotangent(256)
    step = jax.jit(lambda *x: jax.vjp(lambda *y: causal_blocks(*y, block=64), *x[:3])[1](x[3]))
    hlo = step.lower(q, k, v, g).compile().as_text()
    widths = {int(m.group(1)) for m in re.finditer(r"f32\[2,4,64,(\d+)\]\S* dot\(", hlo)}
    assert widths == {64, 128, 192, 256}, widths
    assert not re.search(r"\[(\d+,)*256,256\]", hlo)


def test_auto_picks_the_blocks_for_causal_calls_on_a_cpu_and_the_einsum_otherwise():
    assert attention_backend("auto", jnp.float32, 64, causal=True) == "blocks"
    assert attention_backend("auto", jnp.bfloat16, 96, causal=True) == "blocks"
    assert attention_backend("auto", jnp.float32, 64, causal=False) == "einsum"  # a padded batch, a KV cache
    assert attention_backend("xla", jnp.float32, 64, causal=True) == "xla"
    with matmul.as_on_gpu():  # the planner's programs: what a GPU runs, not the CPU's blocks
        assert attention_backend("auto", jnp.float32, 64, causal=True) == "einsum"
    with matmul.compiling_for("gpu"):  # a GPU mesh's program, traced in this CPU process
        assert attention_backend("auto", jnp.bfloat16, 96, causal=True) == "cudnn"
        assert attention_backend("auto", jnp.bfloat16, 256, causal=True) == "einsum"  # beyond the kernel's heads
        assert attention_backend("auto", jnp.float32, 64, causal=True) == "einsum"
        assert attention_backend("auto", jnp.bfloat16, 64, causal=False) == "einsum"
    assert attention_backend("auto", jnp.bfloat16, 96, causal=True) == "blocks"  # and back


@pytest.mark.parametrize("mesh_shape,outer", [({"data": 2, "tensor": 4}, "data"),
                                              ({"data": 2, "pipe": 2, "tensor": 2}, "pipe"),
                                              ({"data": 2, "tensor": 4}, None)],
                         ids=["in-data-region", "in-pipe-region", "no-region"])
def test_per_shard_kernels_give_one_device_s_values_and_gradients(mesh_shape, outer):
    """`per_shard` (how cuDNN's kernel runs on a GPU mesh: batch over data, heads over tensor, the kernel's residuals
    carried out per device by a custom VJP) inside a shard_map manual over `outer` as the train step's and the
    pipeline's are, or under automatic partitioning, with JAX's XLA kernel in cuDNN's place: equal to the kernel on
    one device."""
    from jax.sharding import PartitionSpec as P

    from neox_jax.attention import per_shard
    from neox_jax.sharding import make_mesh

    q, k, v, g = (jnp.concatenate([x, 2 * x]) for x in qkv_and_cotangent(16, heads=8, head_dim=8))  # batch 4

    def kernel(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    def value_and_grads(attention, q, k, v, g):
        out, pull = jax.vjp(attention, q, k, v)
        return (out, *pull(g))

    want = value_and_grads(lambda *x: kernel(*x, None), q, k, v, g)
    sharded = functools.partial(value_and_grads, lambda *x: per_shard(kernel, *x))
    if outer:  # the step's region splits the rows over data; the pipeline's holds them whole on every stage
        spec = P("data") if outer == "data" else P()
        sharded = jax.shard_map(sharded, in_specs=spec, out_specs=spec, axis_names={outer})
    mesh = make_mesh(mesh_shape, jax.devices()[:8])
    with jax.set_mesh(mesh):
        got = jax.jit(sharded)(q, k, v, g)
    for got_x, want_x in zip(got, want):
        assert largest_relative_error(got_x, want_x) <= 1e-6
