"""Training throughput: tokens/s, TFLOP/s per device and MFU for a preset and mesh, as JSON; optionally side by
side with transformers on the same weights, batch and sequence.

    python scripts/bench_train.py [--preset pythia-70m] [--mesh data=1] [--seq 512] [--micro-batch 4]
                                  [--precision fp32|bf16] [--remat none] [--xla-defaults on|off] [--steps 5]
                                  [--pairs 3] [--compare transformers]

Random tokens and random weights of the preset's shape (written once as a Hugging Face folder both sides load).
Each measurement is its own process (scripts/compare.py), the sides interleaved. neox_jax times the forward
(the loss), the gradient (forward + backward) and the whole step (+ AdamW); transformers the same with
`GPTNeoXForCausalLM(labels=...)`, `backward()` and `torch.optim.AdamW` (bf16: autocast). The first step, which
compiles, is not timed. One JSON line with each side's medians and spread and the ratio of tokens/s.
`--xla-defaults off` compiles without the backend's default XLA options (neox_jax/xla_options.py), to measure them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import interleaved, timed  # noqa: E402


def worker_jax(args) -> dict:
    from neox_jax import distributed, host_malloc

    host_malloc.reuse_freed_memory()  # as the CLI does, before JAX starts its backend
    import jax

    from neox_jax.sharding import parse_mesh

    mesh_shape = parse_mesh(args.mesh)
    distributed.emulate_cpu_devices(math.prod(mesh_shape.values()))
    import numpy as np
    from flax import nnx

    from neox_jax.config import TrainConfig
    from neox_jax.convert.hf_config import config_from_hf
    from neox_jax.flops import flops_6n, peak_tflops
    from neox_jax.pretrained import from_pretrained
    from neox_jax.sharding import make_mesh
    from neox_jax.train import Trainer
    from neox_jax.xla_options import defaults

    model = config_from_hf(args.model_dir).replace(remat_policy=args.remat)
    cfg = TrainConfig(model=model, mesh=mesh_shape, seq_length=args.seq, micro_batch_size=args.micro_batch,
                      precision=args.precision,
                      xla_options={} if args.xla_defaults == "on" else dict.fromkeys(defaults(jax.default_backend())))
    mesh = make_mesh(mesh_shape)
    tr = Trainer(cfg, mesh)
    state = tr.init(jax.random.key(0))
    weights = nnx.to_pure_dict(nnx.state(from_pretrained(args.model_dir), nnx.Param))  # the folder's, as torch's
    put = lambda like: jax.tree.map(lambda w, x: jax.device_put(w.astype(x.dtype), x.sharding), weights, like)  # noqa
    state = dataclasses.replace(state, params=put(state.params),
                                master=None if state.master is None else put(state.master))
    tokens = np.random.RandomState(0).randint(0, model.vocab_size, tr.batch_shape())
    batch = tr.put_batch(tokens)
    loss_at_start = float(tr.eval_loss(state.params, batch))
    for fn in (tr.eval_loss, tr.grads):
        jax.block_until_ready(fn(state.params, batch))  # compile
    state, m = tr.step(state, batch)
    jax.block_until_ready(m)

    def step():
        nonlocal state
        state, metrics = tr.step(state, batch)
        jax.block_until_ready(metrics)

    forward = timed(lambda: jax.block_until_ready(tr.eval_loss(state.params, batch)), args.steps)
    gradient = timed(lambda: jax.block_until_ready(tr.grads(state.params, batch)), args.steps)
    step_s = timed(step, args.steps)
    n = tr.global_batch_size * args.seq
    kind = jax.devices()[0].device_kind
    tflops = flops_6n(model, args.seq, n) / step_s / mesh.size / 1e12
    peak = peak_tflops(kind)
    return {"loss_at_start": loss_at_start, "forward_s": forward, "gradient_s": gradient, "step_s": step_s,
            "tokens_per_s": n / step_s,
            "backward_over_forward": (gradient - forward) / forward, "tflops_per_device_6n": tflops,
            "mfu_6n": tflops / peak if peak else None, "device": kind, "jax": jax.__version__,
            "host_malloc": host_malloc.state()}


def worker_torch(args) -> dict:
    import numpy as np
    import torch
    from transformers import GPTNeoXForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPTNeoXForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    tokens = np.random.RandomState(0).randint(0, model.config.vocab_size, (args.micro_batch, args.seq + 1))
    ids = torch.from_numpy(tokens).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def loss():  # next-token loss over the same seq targets as ours
        with autocast:
            logits = model(ids[:, :-1]).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    def forward():
        with torch.no_grad():
            loss()
        sync()

    def gradient():
        loss().backward()
        model.zero_grad(set_to_none=True)
        sync()

    def step():
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    with torch.no_grad():
        loss_at_start = float(loss())
    step()  # the optimizer's state is created here
    f, g, s = timed(forward, args.steps), timed(gradient, args.steps), timed(step, args.steps)
    return {"loss_at_start": loss_at_start, "forward_s": f, "gradient_s": g, "step_s": s,
            "tokens_per_s": args.micro_batch * args.seq / s,
            "backward_over_forward": (g - f) / f, "torch": torch.__version__, "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="pythia-70m")
    p.add_argument("--mesh", default="data=1")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--xla-defaults", default="on", choices=["on", "off"], help="the backend's default XLA options")
    p.add_argument("--steps", type=int, default=5, help="timed calls of each kind per measurement")
    p.add_argument("--pairs", type=int, default=3, help="interleaved measurements per side")
    p.add_argument("--compare", choices=["transformers"], help="also time transformers, interleaved")
    p.add_argument("--worker", choices=["neox_jax", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps((worker_jax if args.worker == "neox_jax" else worker_torch)(args)))
        return
    if args.compare and args.mesh != "data=1":
        raise SystemExit("--compare runs transformers on one device: leave --mesh at data=1")
    from flax import nnx

    from neox_jax import GPTNeoX, NeoXConfig, save_pretrained

    sides = ["neox_jax"] + (["transformers"] if args.compare else [])
    with tempfile.TemporaryDirectory() as root:
        shape = NeoXConfig.preset(args.preset, max_position_embeddings=max(2048, args.seq))
        save_pretrained(GPTNeoX(shape, rngs=nnx.Rngs(0)), Path(root) / "model")
        common = ["--model-dir", str(Path(root) / "model"), "--mesh", args.mesh, "--seq", str(args.seq),
                  "--micro-batch", str(args.micro_batch), "--precision", args.precision, "--remat", args.remat,
                  "--xla-defaults", args.xla_defaults, "--steps", str(args.steps)]
        result = interleaved(__file__, common, sides, args.pairs, "tokens_per_s")
    runs = result.pop("runs")
    for key in ("loss_at_start", "forward_s", "gradient_s", "step_s", "backward_over_forward", "mfu_6n"):
        for side in sides:
            values = [r[key] for r in runs[side] if r.get(key) is not None]
            if values:
                result[side][key] = round(statistics.median(values), 4)
    print(json.dumps({"preset": args.preset, "mesh": args.mesh, "seq": args.seq, "micro_batch": args.micro_batch,
                      "precision": args.precision, "remat": args.remat, "xla_defaults": args.xla_defaults, **result,
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
