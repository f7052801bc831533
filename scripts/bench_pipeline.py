"""Step time of one model and global batch on (2,2,2) vs (2,1,4) vs (8,1,1) on the 8-device CPU mesh, and the
pipeline's measured bubble against (P-1)/(M+P-1).

    python scripts/bench_pipeline.py [--layers 8] [--hidden 256] [--seq 128] [--steps 3]

The measured bubble takes the useful work from the 8-microbatch step (through the formula) and compares the
4-microbatch step with it. CPU-mesh figures only: a single GPU cannot measure a multi-GPU
pipeline, and no GPU figures are guessed.
"""

from __future__ import annotations

import argparse
import json
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    import jax

    from neox_jax import distributed

    distributed.emulate_cpu_devices(8)
    import numpy as np

    from neox_jax.config import NeoXConfig, TrainConfig
    from neox_jax.pipeline import bubble_fraction
    from neox_jax.sharding import make_mesh
    from neox_jax.train import Trainer

    model = NeoXConfig(vocab_size=1024, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                       max_position_embeddings=max(args.seq, 64))

    def step_time(mesh_shape, microbatches=0):
        mesh = make_mesh(mesh_shape)
        cfg = TrainConfig(model=model, mesh=mesh_shape, seq_length=args.seq,
                          micro_batch_size=args.batch // mesh.shape["data"], pipe_microbatches=microbatches)
        tr = Trainer(cfg, mesh)
        state = tr.init(jax.random.key(0))
        batch = tr.put_batch(np.random.RandomState(0).randint(0, 1024, tr.batch_shape()))
        state, m = tr.step(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = tr.step(state, batch)
        jax.block_until_ready(m)
        return (time.perf_counter() - t0) / args.steps, tr.microbatches

    rows = []
    for mesh_shape in ({"data": 2, "pipe": 2, "tensor": 2}, {"data": 2, "pipe": 1, "tensor": 4},
                       {"data": 8, "pipe": 1, "tensor": 1}):
        seconds, m = step_time(mesh_shape)
        rows.append({"mesh": mesh_shape, "step_s": round(seconds, 3), "microbatches": m if mesh_shape["pipe"] > 1 else None})
        print(json.dumps(rows[-1]), flush=True)
    # The same total batch cut into M or 2M microbatches: useful work W per step is the same, so estimate it
    # from the 8-microbatch run with the formula, W = t(8) * 8 / (8 + P - 1), and measure bubble(4) = 1 - W / t(4).
    stages = 2
    t4, _ = step_time({"data": 2, "pipe": stages, "tensor": 2}, 4)
    t8, _ = step_time({"data": 2, "pipe": stages, "tensor": 2}, 8)
    work = t8 * 8 / (8 + stages - 1)
    print(json.dumps({"pipe": stages, "step_s_m4": round(t4, 3), "step_s_m8": round(t8, 3),
                      "bubble_m4_formula": round(bubble_fraction(stages, 4), 3),
                      "bubble_m4_measured": round(1 - work / t4, 3)}))

if __name__ == "__main__":
    main()
