"""Dropout as GPT-NeoX applies it, with masks that are a function of the data's place, not of the layout.

Each row of a step's batch has a key: the run's seed folded with the step, the microstep and the row's index in
that microstep's global batch (`row_keys`). A layer folds its index into its rows' keys (`fold`), and each place
that drops folds a salt of its own: so a row draws the same masks on one device or sharded over `data`, `tensor`
and `pipe`, in any microbatch split, after a resume, and in the backward's recomputation. Keys travel as raw
threefry key data (uint32 [..., 2]) so that they shard, slice and cross `shard_map` like any array. Without keys
(evaluation, generation) nothing is dropped.

Places (GPT-NeoX's): the embedding's output (`hidden_dropout`, keyed by the layer count as its index), each layer's
attention probabilities (`attention_dropout`, salt 0, each head's mask from the row's key folded with the head's
index: `head_keys`) and each branch's output before the residual add
(`hidden_dropout`: attention salt 1, MLP salt 2), under the parallel residual and the sequential one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neox_jax import sharding as shd

SALT = 0x64726F70  # "drop": the dropout keys' branch of the run's seed, apart from the initialisation's
ATTENTION_PROBS, ATTENTION_OUT, MLP_OUT = 0, 1, 2


def _key(data):
    return jax.random.wrap_key_data(data, impl="threefry2x32")


def fold(keys, n):
    """Each key of `keys` [..., 2] folded with `n`: an int or a traced scalar, or one per key ([...])."""
    flat, ns = keys.reshape(-1, 2), jnp.broadcast_to(jnp.asarray(n), keys.shape[:-1]).reshape(-1)
    out = jax.vmap(lambda k, i: jax.random.key_data(jax.random.fold_in(_key(k), i)))(flat, ns)
    return out.reshape(keys.shape)


def row_keys(seed: int, step, microsteps: int, rows: int):
    """Key data [microsteps, rows, 2] of a step's rows: (seed, step, microstep, row in the microstep's batch)."""
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), SALT), step)
    per_microstep = jax.vmap(lambda m: jax.random.fold_in(step_key, m))(jnp.arange(microsteps))
    per_row = jax.vmap(lambda k: jax.vmap(lambda r: jax.random.fold_in(k, r))(jnp.arange(rows)))(per_microstep)
    return jax.random.key_data(per_row)


def head_keys(keys_b, heads: int):
    """Each head's keys [b, n, 2] from its row's [b, 2]: folded with the head's index in the layer, the global one
    where heads are split over a manual mesh axis (sequence parallelism's region), so a device draws the masks of
    its own heads only, the same as one device would."""
    first = shd.block_start("heads", heads)
    return jax.vmap(lambda k: fold(jnp.broadcast_to(k, (heads, 2)), first + jnp.arange(heads)))(keys_b)


def dropout(x, rate: float, keys, salt: int):
    """`x` [*lead, ...] with each element zeroed with probability `rate` and the others divided by 1 - rate, the mask
    of x[i] (a row's, or a row's head's) drawn from keys[i] [*lead, 2] folded with `salt`; unchanged without keys or
    at rate 0."""
    if keys is None or not rate:
        return x

    def one(key, x):
        keep = jax.random.bernoulli(jax.random.fold_in(_key(key), salt), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

    for _ in range(keys.ndim - 1):
        one = jax.vmap(one)
    return one(keys, x)
