"""GPipe over the `pipe` mesh axis: the layer stack cut into stages that all run at once.

Layer weights `[layers, ...]` are viewed as `[stages, layers_per_stage, ...]` with the stage axis on `pipe`
(the stack is split over `pipe` in contiguous blocks, so the view moves nothing). Each iteration
every stage runs its layers on the activation it holds (`vmap` over stages, partitioned along `pipe`), then
the activations rotate one stage forward (a collective-permute). After `M + P - 1` iterations every
microbatch has left the last stage; the backward pipeline is the autodiff of this loop. With a remat
policy each stage keeps only its input per iteration. Bubble: (P - 1) / (M + P - 1).

The microbatches are those of gradient accumulation, as in GPT-NeoX (DeepSpeed's pipeline runs GAS
microbatches): the train step feeds its `[accum, rows, seq]` batch straight in, optionally cut further
(`pipe_microbatches`). The embedding runs as a microbatch enters and the output layer and loss as it
leaves, outside the pipelined stack as in GPT-NeoX.

The pipeline applies causal attention without a padding mask, as training does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from neox_jax.model import GPTNeoX, run_layers
from neox_jax.sharding import constrain, unconstrained, varying


def bubble_fraction(stages: int, microbatches: int) -> float:
    return (stages - 1) / (microbatches + stages - 1)


def pipelined_loss(model: GPTNeoX, tokens_mbt, labels_mbt, stages: int, loss_fn):
    """Mean `loss_fn(model, last layer's output, labels)` over microbatches [M, mb, t] run through a `stages`-stage
    pipeline.

    Each iteration embeds the microbatch entering the first stage and scores the one leaving the last, so
    neither the embeddings nor the logits of all M microbatches are ever held at once (the scoring is
    rematerialised in the backward pass).
    """
    cfg = model.config
    m, mb, t = tokens_mbt.shape
    if cfg.num_layers % stages:
        raise ValueError(f"num_layers={cfg.num_layers} is not divisible by {stages} pipeline stages")
    graphdef, stacked = nnx.split(model.layers)
    per_stage = cfg.num_layers // stages
    staged = jax.tree.map(lambda w: w.reshape(stages, per_stage, *w.shape[1:]), stacked)
    positions_bt = jnp.broadcast_to(jnp.arange(t), (mb, t))
    stage_axes = ("stage", "batch", "length", "embed")

    def stage(params, x):
        with unconstrained():  # the stage axis is laid out by the constraints around the vmap
            return run_layers(graphdef, params, cfg, x, positions_bt, None)[0]  # causal

    if cfg.remat_policy != "none":  # keep only each stage's input per iteration; recompute the stage backward
        stage = jax.checkpoint(stage, prevent_cse=False)
    run_stages = jax.vmap(stage)
    score = jax.checkpoint(lambda x, labels: loss_fn(model, x, labels), prevent_cse=False)

    def iteration(state, xs):
        tokens, labels, scored = xs
        state = state.at[0].set(model.embed(tokens))  # feed the first stage
        state = run_stages(staged, constrain(state, stage_axes))
        loss = jnp.where(scored, score(state[-1], labels), 0.0)  # the microbatch leaving the last stage
        return jnp.roll(state, 1, axis=0), loss  # stage i's output becomes stage i + 1's input

    pad = jnp.zeros((stages - 1, mb, t), tokens_mbt.dtype)
    feed = (jnp.concatenate([tokens_mbt, pad]), jnp.concatenate([pad, labels_mbt]),
            jnp.arange(m + stages - 1) >= stages - 1)  # microbatch k leaves the last stage at iteration k + P - 1
    state = varying(jnp.zeros((stages, mb, t, cfg.hidden_size), jnp.dtype(cfg.dtype)))
    _, losses = jax.lax.scan(iteration, state, feed)
    return losses.sum() / m
