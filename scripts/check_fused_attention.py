"""Does the compiled training run cuDNN's fused attention where `attention: auto` should, and does it give XLA's?

    python scripts/check_fused_attention.py [--heads 96 128]

For each head size (96 as the 20B's, 128 as pythia-1.4b's and -6.9b's; bf16, 4 heads, seq 256): the train step's
gradient on this device, compiled (the fused forward and backward calls are looked for in its HLO) and run against
the same step with `attention: xla` (loss and gradients within bf16's tolerance); the pipeline's stage program (one
stage on this device) compiled; and the 20B's layout, (data 2, pipe 4, tensor 2) of 2 hosts x 8 of this card
(an H100 off a GPU), compiled by XLA's GPU compiler without devices (neox_jax/gpus.py: the gpu-plan extra). On a
GPU every program must call cuDNN's fused attention; elsewhere (`auto` runs the einsum) none may but the
deviceless GPU program, which must. One JSON line per check; exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.config import NeoXConfig, TrainConfig
from neox_jax.sharding import make_mesh
from neox_jax.train import Trainer

FUSED = re.compile(r"__cudnn\$fmha\w*")  # JAX's cuDNN attention calls: forward "...Softmax", backward "...Backward"
GPU = jax.default_backend() == "gpu"


def config(head: int, mesh: dict, attention: str = "auto", remat: str = "none", micro_batch: int = 2) -> TrainConfig:
    model = NeoXConfig(vocab_size=1024, hidden_size=4 * head, num_layers=4, num_heads=4, rotary_pct=0.25,
                       max_position_embeddings=512, attention=attention, remat_policy=remat)
    return TrainConfig(model=model, mesh=mesh, seq_length=256, micro_batch_size=micro_batch, precision="bf16",
                       warmup=0)


def verdict(name: str, text: str, **extra) -> dict:
    """Pass on a GPU when both the forward and the backward fused calls are in `text`; elsewhere when none is."""
    calls = sorted(set(FUSED.findall(text)))
    both = any(c.endswith("Backward") for c in calls) and any(not c.endswith("Backward") for c in calls)
    return {"check": name, "fused_calls": calls, "ok": both if GPU else not calls, **extra}


def train_step(head: int) -> dict:
    runs = {}
    for attention in ("auto", "xla"):
        tr = Trainer(config(head, {"data": 1}, attention), make_mesh({"data": 1}, jax.devices()[:1]))
        state = tr.init(jax.random.key(0))
        batch = tr.put_batch(np.random.RandomState(0).randint(0, 1024, tr.batch_shape()))
        hlo = tr.grads.lower(state.params, batch).compile().as_text()
        loss, grads = jax.device_get(tr.grads(state.params, batch))
        runs[attention] = hlo, float(loss), grads
    (hlo, loss, grads), (_, xla_loss, xla_grads) = runs["auto"], runs["xla"]
    # bf16: each gradient within 3% of its own largest entry, the loss within 0.5%
    worst = max(float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32)))
                      / (np.max(np.abs(b.astype(np.float32))) + 1e-12))
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(xla_grads)))
    same = abs(loss - xla_loss) <= 5e-3 * abs(xla_loss) and worst <= 3e-2
    out = verdict(f"train step, head {head}", hlo, loss=loss, xla_loss=xla_loss, worst_grad_rel_diff=worst)
    return {**out, "ok": out["ok"] and same}


def pipeline_stage(head: int) -> dict:
    """The pipeline's stage program with one stage (this device): the attention runs inside its shard_map."""
    mesh = {"data": 1, "pipe": 1, "tensor": 1}
    tr = Trainer(config(head, mesh, remat="full"), make_mesh(mesh, jax.devices()[:1]))
    state = tr.abstract_state_with_shardings()
    run = jax.jit(tr.under_mesh(lambda params, batch: tr.pipelined_grads(params, *tr.targets(batch), 1.0,
                                                                         jnp.float32)))
    return verdict(f"pipeline stage program, head {head}", run.lower(state.params, tr.abstract_batch()).compile()
                   .as_text())


def neox20b_layout(head: int) -> dict:
    """(data 2, pipe 4, tensor 2): 2 hosts x 8 compile-only devices of this card, compiled by XLA's GPU compiler: the
    20B's layout, pipeline and tensor-parallel heads included, as a cluster of them would run it."""
    from neox_jax import gpus

    shape = {"data": 2, "pipe": 4, "tensor": 2}
    card = gpus.card_of(jax.devices()[0].device_kind) or gpus.CARDS["h100-80gb"]
    tr = Trainer(config(head, shape, remat="full", micro_batch=4), make_mesh(shape, gpus.topology(card.name, 2, 8)))
    compiled = tr.step.lower(tr.abstract_state(), tr.abstract_batch()).compile(gpus.DEVICELESS_OPTIONS)
    out = verdict(f"(data 2, pipe 4, tensor 2) on 2 x 8 {card.name}, compiled without devices, head {head}",
                  compiled.as_text())
    return {**out, "ok": bool(out["fused_calls"]) and any(c.endswith("Backward") for c in out["fused_calls"])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, nargs="+", default=[96, 128])
    args = p.parse_args()
    ok = True
    for head in args.heads:
        for check in (train_step, pipeline_stage, neox20b_layout):
            row = {**check(head), "device": jax.devices()[0].device_kind, "jax": jax.__version__}
            ok &= row["ok"]
            print(json.dumps(row), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
