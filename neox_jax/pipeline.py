"""A one-forward-one-backward (1F1B) pipeline over the `pipe` mesh axis: the layer stack cut into stages.

Each device of `pipe` runs one stage: a contiguous block of L/P layers (the rules table splits the stacked
`layers` axis over `pipe` in blocks, so nothing moves to set it up). The schedule is written by hand inside a
`shard_map` manual over `pipe` (`tensor`, and `data` where it is automatic, stay XLA's): every tick each stage
runs the forward of one microbatch and the backward of an earlier one, then sends the activation to the next stage
and the activation gradient to the previous one (two collective-permutes). Stage s runs microbatch i forward at
tick i + s and backward at tick i + 2(P - 1) - s; the last stage scores a microbatch and starts its backward in the
tick it arrives. Three loops: P - 1 ticks of forwards only, M ticks of both, P - 1 of backwards only, so every
stage computes (M + P - 1) forwards and backwards, as GPipe does: bubble (P - 1) / (M + P - 1).

Memory is what makes it 1F1B: stage s holds the inputs of 2(P - 1 - s) + 1 microbatches at once (2P - 1 slots
on every stage), whatever M, where GPipe's autodiff keeps every microbatch's until the backward starts.
Recomputation is done once and chosen by `remat_policy`:

    full    each layer's input is kept; the backward recomputes one layer at a time (jax.vjp of the layer)
    none    only the stage's input is kept; the backward recomputes the whole stage once, holding its internals

so each layer's forward runs twice in either case (recompute factor 4; the planner prints it).

The gradient is computed here, not by autodiff of the loop: the function returns the loss, the sum of the
microbatches' (each a weighted sum of token losses: train.py's `targets`), and the gradients of `seed` x it,
summed over microbatches in `accum_dtype`. The embedding runs on the first stage and
the output layer and loss on the last, outside the pipelined stack as in GPT-NeoX; both are computed on every
stage in the same program, so the activations never leave their stage; their gradients, non-zero on one stage,
are summed over `pipe` once at the end. The pipeline applies causal attention without a padding mask, as
training does. With dropout keys each microbatch's rows keep theirs (dropout.py), every layer folding in its index
in the whole stack, so a stage draws the masks one device draws, and its backward's recomputation the same again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from neox_jax import sequence_parallel
from neox_jax import sharding as shd
from neox_jax.dropout import fold
from neox_jax.model import apply_layer, layer_axes, rotary_cos_sin

PIPELINE_REMAT = ("full", "none")  # the recomputations the pipeline implements (module docstring)
F32 = jnp.float32


def bubble_fraction(stages: int, microbatches: int) -> float:
    return (stages - 1) / (microbatches + stages - 1)


def slots(stages: int) -> int:
    """Microbatch inputs a stage keeps at once: the first stage's backward of microbatch i comes 2(P - 1) ticks
    after its forward."""
    return 2 * stages - 1


def pipeline_grads(graphdef, params, tokens_mbt, targets_mbt, loss_fn, *, seed, accum_dtype, keys_mbt=None):
    """(loss, gradients of `seed` x loss in `accum_dtype`) of microbatches [M, mb, t] through as many stages as the
    mesh's `pipe` axis has devices; the loss is the sum of the microbatches'.

    `graphdef` and `params` (a nested dict) make the GPTNeoX; `loss_fn(model, last layer's output, targets)` is one
    microbatch's loss, `targets_mbt` a pytree of [M, ...] arrays (labels, weights), `keys_mbt` the rows' dropout
    keys [M, mb, 2] or None. `train.check_layout` has checked the layout (layers divisible by stages, remat
    policy)."""
    stages = dict(jax.sharding.get_abstract_mesh().shape)["pipe"]
    model = nnx.merge(graphdef, params)
    cfg = model.config
    layer_def, stacked = nnx.split(model.layers)
    axes = nnx.to_pure_dict(layer_axes(stacked))
    # the stacked layers enter split over `pipe` (each stage its block), the rest whole
    in_specs = {k: jax.tree.map(lambda _: P("pipe") if k == "layers" else P(), v) for k, v in params.items()}

    def stage_program(params, tokens_mbt, targets_mbt, seed, keys_mbt):
        s = jax.lax.axis_index("pipe")
        last, m, (_, mb, t), keep = stages - 1, tokens_mbt.shape[0], tokens_mbt.shape, slots(stages)
        layers = params["layers"]  # this stage's [L / P, ...]
        per_stage = jax.tree.leaves(layers)[0].shape[0]
        indices = s * per_stage + jnp.arange(per_stage)  # the stage's layers' places in the whole stack

        def keys(i):  # microbatch i's rows' dropout keys, or None
            return None if keys_mbt is None else keys_mbt[jnp.clip(i, 0, m - 1)]
        # the weights outside the stack, marked as differing per stage so their gradients stay per stage
        outer = jax.lax.pcast({k: v for k, v in params.items() if k != "layers"}, "pipe", to="varying")
        split = sequence_parallel.applies(cfg, t)  # the stream split along the sequence: so are the sends
        cos_btr, sin_btr = rotary_cos_sin(jnp.broadcast_to(jnp.arange(t), (mb, t)), cfg.rotary_ndims,
                                          cfg.rotary_base)

        def whole(outer):
            return nnx.merge(graphdef, {**outer, "layers": layers})

        def layer(w, x, keys_b, index, cos_btr=cos_btr, sin_btr=sin_btr):
            layer_keys = None if keys_b is None else fold(keys_b, index)
            return apply_layer(layer_def, w, axes, x, cos_btr, sin_btr, keys_b=layer_keys, split=split)[0]  # causal

        def scan_stage(ws, x, cos_btr, sin_btr, keys_b, indices):
            return jax.lax.scan(lambda x, w_i: (layer(w_i[0], x, keys_b, w_i[1], cos_btr, sin_btr), x), x,
                                (ws, indices))

        def run_stage(ws, x, keys_b):  # -> (output, each layer's input); sequence-parallel: in one region
            if not split:
                return scan_stage(ws, x, cos_btr, sin_btr, keys_b, indices)
            return sequence_parallel.region(scan_stage, ws, axes, x, (cos_btr, sin_btr, keys_b, indices), stacked=True,
                                            out_specs=(sequence_parallel.split_spec(), sequence_parallel.split_spec(1)))

        def stage_backward(kept, g, keys_b):  # -> (weight gradients, input gradient)
            if cfg.remat_policy == "full":
                def one(g, w_x_i):
                    w, x, i = w_x_i
                    dw, dx = jax.vjp(lambda w, x: layer(w, x, keys_b, i), w, x)[1](g)
                    return dx, dw

                dx, dws = jax.lax.scan(one, g, (layers, kept, indices), reverse=True)
                return dws, dx
            return jax.vjp(lambda ws, x: run_stage(ws, x, keys_b)[0], layers, kept)[1](g)

        def embed(outer, tokens_bt, keys_b):
            return whole(outer).embed(tokens_bt, keys_b)

        def add(sums, grads):
            return jax.tree.map(lambda a, g: a + g.astype(accum_dtype), sums, grads)

        def tick(carry, now, forward: bool, backward: bool):
            x_in, g_in, kept, sums, loss_sum = carry
            f, b = now - s, now - (2 * last - s)  # the microbatches this stage runs forward and backward
            y = g_out = None
            if forward:
                x = jnp.where(s == 0, embed(outer, tokens_mbt[jnp.clip(f, 0, m - 1)], keys(f)), x_in)
                y, inputs = run_stage(layers, x, keys(f))
                kept = jax.lax.dynamic_update_index_in_dim(kept, inputs if cfg.remat_policy == "full" else x,
                                                           f % keep, 0)
            if forward and backward:  # the last stage scores the microbatch it just ran and starts its backward
                scored = (s == last) & (f >= 0) & (f < m)
                targets = jax.tree.map(lambda x: x[jnp.clip(f, 0, m - 1)], targets_mbt)
                head = {k: v for k, v in outer.items() if k != "embed_in"}
                loss, pull = jax.vjp(lambda h, y: loss_fn(whole({**outer, **h}), y, targets), head, y)
                d_head, g_last = pull(shd.vary_like(jnp.where(scored, seed, 0.0).astype(loss.dtype), loss))
                sums = {**sums, **add({k: sums[k] for k in head}, d_head)}
                loss_sum = loss_sum + jnp.where(scored, loss, 0.0)
                g_in = jnp.where(s == last, g_last, g_in)
            if backward:
                g = jnp.where((b >= 0) & (b < m), g_in, 0)
                d_layers, g_out = stage_backward(jax.lax.dynamic_index_in_dim(kept, b % keep, 0, keepdims=False), g,
                                                 keys(b))
                tokens = tokens_mbt[jnp.clip(b, 0, m - 1)]
                d_embed = jax.vjp(lambda e: embed({**outer, "embed_in": e}, tokens, keys(b)), outer["embed_in"])[1](
                    jnp.where(s == 0, g_out, 0))[0]
                sums = {**sums, "layers": add(sums["layers"], d_layers), "embed_in": add(sums["embed_in"], d_embed)}
            # stage s's output becomes stage s + 1's input, its input gradient stage s - 1's output gradient
            if y is not None:
                x_in = jax.lax.ppermute(y, "pipe", [(i, i + 1) for i in range(last)])
            if g_out is not None:
                g_in = jax.lax.ppermute(g_out, "pipe", [(i + 1, i) for i in range(last)])
            return (x_in, g_in, kept, sums, loss_sum), None

        act = jnp.zeros((mb, t, cfg.hidden_size), jnp.dtype(cfg.dtype))
        kept_lead = (keep, *((per_stage,) if cfg.remat_policy == "full" else ()))
        kept = jnp.zeros((*kept_lead, *act.shape), act.dtype)
        if split:  # the sends and the kept inputs split along the sequence too
            stream = sequence_parallel.stream_axes(True)
            act, kept = shd.constrain(act, stream), shd.constrain(kept, (None,) * len(kept_lead) + stream)
        act = shd.varying(act)
        sums = jax.tree.map(lambda w: shd.varying(jnp.zeros(w.shape, accum_dtype)), params)
        carry = (act, act, shd.varying(kept), sums, shd.varying(jnp.zeros((), F32)))
        for first, end, forward, backward in ((0, last, True, False), (last, m + last, True, True),
                                              (m + last, m + 2 * last, False, True)):
            carry, _ = jax.lax.scan(functools.partial(tick, forward=forward, backward=backward), carry,
                                    jnp.arange(first, end))
        _, _, _, sums, loss_sum = carry
        # each stage's sums of the weights outside the stack leave side by side: summed over `pipe` below
        sums = {k: v if k == "layers" else jax.tree.map(lambda g: g[None], v) for k, v in sums.items()}
        return jax.lax.psum(loss_sum, "pipe"), sums

    out_specs = {k: jax.tree.map(lambda _: P("pipe"), v) for k, v in params.items()}
    loss, sums = jax.shard_map(stage_program, in_specs=(in_specs, P(), P(), P(), P()), out_specs=(P(), out_specs),
                               axis_names={"pipe"})(params, tokens_mbt, targets_mbt, seed, keys_mbt)
    # (a psum inside the shard_map would be the same all-reduce, but XLA's CPU compiler fails on a bf16 one there)
    return loss, {k: v if k == "layers" else jax.tree.map(lambda g: g.sum(0), v) for k, v in sums.items()}

