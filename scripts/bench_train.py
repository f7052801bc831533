"""Training throughput: tokens/s, TFLOP/s per device and MFU for a preset and mesh, as JSON.

    python scripts/bench_train.py [--preset pythia-70m] [--mesh data=1] [--seq 512] [--micro-batch 4]
                                  [--precision bf16] [--remat none] [--steps 5]

On a CPU without --mesh it uses one device. Random tokens; the first step (compile) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import math
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="pythia-70m")
    p.add_argument("--mesh", default="data=1")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    import jax

    from neox_jax.sharding import parse_mesh

    mesh_shape = parse_mesh(args.mesh)
    jax.config.update("jax_num_cpu_devices", math.prod(mesh_shape.values()))
    import numpy as np

    from neox_jax.config import NeoXConfig, TrainConfig
    from neox_jax.flops import flops_6n, flops_neox, peak_tflops
    from neox_jax.sharding import make_mesh
    from neox_jax.train import Trainer

    model = NeoXConfig.preset(args.preset, remat_policy=args.remat, max_position_embeddings=max(2048, args.seq))
    cfg = TrainConfig(model=model, mesh=mesh_shape, seq_length=args.seq, micro_batch_size=args.micro_batch,
                      grad_accum_steps=args.accum, precision=args.precision)
    mesh = make_mesh(mesh_shape)
    tr = Trainer(cfg, mesh)
    state = tr.init(jax.random.key(0))
    batch = tr.put_batch(np.random.RandomState(0).randint(0, model.vocab_size, tr.batch_shape()))
    t0 = time.perf_counter()
    state, m = tr.step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = tr.step(state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / args.steps
    tokens = tr.global_batch_size * args.seq
    kind = jax.devices()[0].device_kind
    peak = peak_tflops(kind)
    t6n = flops_6n(model, args.seq, tokens) / step_s / mesh.size / 1e12
    tneox = flops_neox(model, args.seq, tr.global_batch_size) / step_s / mesh.size / 1e12
    print(json.dumps({"preset": args.preset, "mesh": dict(mesh.shape), "seq": args.seq,
                      "global_batch": tr.global_batch_size, "precision": args.precision, "remat": args.remat,
                      "compile_s": round(compile_s, 1), "step_s": round(step_s, 4),
                      "tokens_per_s": round(tokens / step_s), "tflops_per_device_6n": round(t6n, 2),
                      "tflops_per_device_neox": round(tneox, 2),
                      "mfu_6n": round(t6n / peak, 4) if peak else None, "device": kind}))


if __name__ == "__main__":
    main()
