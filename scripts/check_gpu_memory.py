"""Is the planner's deviceless GPU memory what a real GPU's compile of the same program says?

    python scripts/check_gpu_memory.py [--preset pythia-1.4b] [--seq 2048] [--micro-batch 4] [--tolerance 0.10]

On a GPU in the table of neox_jax/gpus.py: the bf16 train step of `--preset` on this one device, and the decode
step at batch 1 and a context of `--seq`, each compiled twice, for this device (XLA's defaults, autotuning on) and
for a compile-only device of the same card (the planner's way: autotuning off, cuBLAS GEMMs). Passes when each
program's total (arguments + outputs not donated + temporaries) differs by at most `--tolerance`. One JSON line
per program; exit status 1 if one fails, 2 off a GPU of the table.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from neox_jax import gpus
from neox_jax.config import TrainConfig
from neox_jax.sharding import make_mesh
from neox_jax.train import Trainer


def total(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def train_step(cfg: TrainConfig, devices, options: dict) -> int:
    tr = Trainer(cfg, make_mesh(cfg.mesh, devices))
    return total(tr.step.lower(tr.abstract_state(), tr.abstract_batch()).compile(options))


def decode_step(cfg: TrainConfig, devices, options: dict) -> int:
    from neox_jax.plan_generate import compile_generation

    config = cfg.model.replace(dtype="bfloat16", param_dtype="bfloat16")
    return total(compile_generation(config, make_mesh({"data": 1}, devices), 1, cfg.seq_length, options)["decode"][0])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="pythia-1.4b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=0.10)
    args = p.parse_args()
    kind = jax.devices()[0].device_kind
    card = gpus.card_of(kind)
    if jax.default_backend() != "gpu" or card is None:
        print(json.dumps({"check": "GPU memory", "ok": None, "why": f"needs a GPU of neox_jax/gpus.py, not {kind}"}))
        sys.exit(2)
    cfg = TrainConfig.from_dict({"model": args.preset, "mesh": {"data": 1}, "seq_length": args.seq,
                                 "micro_batch_size": args.micro_batch, "precision": "bf16"})
    ok = True
    for name, program in (("train step", train_step), ("decode step", decode_step)):
        real = program(cfg, jax.devices()[:1], {})
        deviceless = program(cfg, gpus.topology(card.name, 1, 1), gpus.DEVICELESS_OPTIONS)
        difference = abs(real / deviceless - 1)
        row = {"check": f"{name} memory, {args.preset}, seq {args.seq}", "real_gb": real / 1e9,
               "deviceless_gb": deviceless / 1e9, "difference": difference, "ok": difference <= args.tolerance,
               "device": kind, "jax": jax.__version__}
        ok &= row["ok"]
        print(json.dumps(row), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
