"""The least collective traffic a training step can send, per device and mesh axis: the yardstick the planner
sets beside what the compiled step sends (bytes each device sends per step, ring algorithms).

    data    the gradients reduced once per step (ZeRO-1: a reduce-scatter in `grad_accum_dtype`, then an
            all-gather of the new weights in the working dtype; without ZeRO an all-reduce), of the P parameters
            each device holds: (accum + working bytes) x P x (d - 1) / d. FSDP gathers the weights for the forward
            and the backward and reduce-scatters the gradients in every microstep: 3 x that per microstep.
    tensor  GPT-NeoX's (Megatron's) count: per layer and microbatch, an all-reduce of the [rows, seq, hidden]
            activations for each row-parallel output in the forward (one with the parallel residual, whose two
            branches add before it; two without), the same again in a recomputed forward, and one for each
            column-parallel input in the backward (two); plus the vocab-parallel embedding's forward and the
            output layer's input gradient (`selective` recomputation: `per_layer_allreduces`). An all-reduce over t
            devices sends 2 (t - 1) / t of its size.
            Under sequence parallelism (neox_jax/sequence_parallel.py) each all-reduce is an all-gather and a
            reduce-scatter (half its bytes each): forward and backward one pair per branch sum (one with the
            parallel residual, two without), a recomputed forward the same less its last reduce-scatter, whose
            output the backward does not read.
    pipe    each microbatch's activation crossing each stage boundary forward, and its gradient backward (split
            along the sequence over `tensor` under sequence parallelism).
"""

from __future__ import annotations


import jax.numpy as jnp


def per_layer_allreduces(parallel_residual: bool, remat_policy: str, sequence_parallel: bool = False) -> float:
    """A layer's `tensor` traffic per microbatch in all-reduces of its activations (module docstring). `selective`
    recomputation keeps the projections' outputs: without sequence parallelism it sums one branch again (the
    attention's, which the sequential residual's second LayerNorm reads; XLA keeps it under the parallel residual
    too), with it the gathers are made again as in `full`."""
    forward = 1 if parallel_residual else 2
    if remat_policy == "none":
        return 2 * forward if sequence_parallel else forward + 2
    if sequence_parallel:
        return 2 * forward + forward - 0.5
    return forward + (1 if remat_policy == "selective" else forward) + 2


def minimum_traffic(cfg, mesh: dict[str, int], params_per_device: int) -> dict[str, float]:
    """Bytes each device must send per step over `data`, `tensor` and `pipe` (axes of size 1 send nothing).

    `cfg` is the TrainConfig, `params_per_device` the parameters one device holds (its `pipe` x `tensor` shard of
    the model, embeddings included)."""
    m = cfg.model
    d, p, t = mesh["data"], mesh["pipe"], mesh["tensor"]
    work = jnp.dtype(cfg.working_dtype).itemsize
    accum = jnp.dtype(cfg.grad_accum_dtype).itemsize
    out = {}
    if d > 1:
        if cfg.zero_stage == 3:
            out["data"] = cfg.grad_accum_steps * (2 * work + 4) * params_per_device * (d - 1) / d
        elif cfg.zero_stage == 1:
            out["data"] = (accum + work) * params_per_device * (d - 1) / d
        else:
            out["data"] = 2 * accum * params_per_device * (d - 1) / d
    # the activations of all this replica's sequences in the step, one layer, in the working dtype
    step_activations = cfg.grad_accum_steps * cfg.micro_batch_size * cfg.seq_length * m.hidden_size * work
    split = m.sequence_parallel and t > 1
    if t > 1:
        count = m.num_layers // p * per_layer_allreduces(m.use_parallel_residual, m.remat_policy, split) + 2
        out["tensor"] = count * step_activations * 2 * (t - 1) / t
    if p > 1:
        out["pipe"] = 2 * step_activations / (t if split else 1)
    return out


def ratio_line(axis: str, compiled: float, minimum: float | None) -> str:
    amount = lambda v: f"{v / 1e9:9.3f} GB" if v >= 1e8 else f"{v / 1e6:9.1f} MB"  # noqa: E731
    if not minimum:
        return f"  over {axis:10s} {amount(compiled)}"
    return f"  over {axis:10s} {amount(compiled)}   minimum {amount(minimum)}   {compiled / minimum:5.2f}x"

