"""Decode throughput and time to first token: neox_jax vs transformers `generate` on the same model and machine.

    python scripts/bench_decode.py [--preset pythia-160m] [--dtype float32] [--new-tokens 64] [--prompt-len 128]

Random weights of the preset's shape. Prints one JSON line per (implementation, batch) and the device.
On a GPU, also the batch-1 memory-bandwidth bound: weight bytes / HBM bandwidth per token.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx

from neox_jax import GPTNeoX, NeoXConfig
from neox_jax.generation import Generator, Sampling, _generate

HBM_GBPS = {"h100": 3350, "h200": 4800, "a100": 2039}


def bench_ours(model, prompts, new_tokens):
    gen = Generator(model)
    gen(prompts, new_tokens)  # compile
    t0 = time.perf_counter()
    state, knobs = gen._start(prompts, new_tokens, 64, [], Sampling())
    jax.block_until_ready(state["logits"])
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out, _ = _generate(gen.graphdef, gen.params, state, jax.numpy.int32(new_tokens), knobs, gen.replicated)
    jax.block_until_ready(out)
    return ttft, len(prompts) * new_tokens / (time.perf_counter() - t0)


def bench_hf(cfg, prompts, new_tokens, dtype):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg.to_hf())).to(device, getattr(torch, dtype)).eval()
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
    return ttft, len(prompts) * new_tokens / max(total - ttft, 1e-9)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="pythia-160m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()
    cfg = NeoXConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    kind = jax.devices()[0].device_kind
    weight_bytes = cfg.num_params * np.dtype(args.dtype).itemsize
    bw = next((v for k, v in HBM_GBPS.items() if k in kind.lower()), None)
    for batch in args.batches:
        prompts = np.random.RandomState(0).randint(2, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        rows = [("neox_jax", *bench_ours(model, prompts, args.new_tokens))]
        if not args.skip_hf:
            rows.append(("transformers", *bench_hf(cfg, prompts, args.new_tokens, args.dtype)))
        for name, ttft, tps in rows:
            row = {"impl": name, "preset": args.preset, "dtype": args.dtype, "batch": batch, "prompt": args.prompt_len,
                   "new_tokens": args.new_tokens, "ttft_ms": round(ttft * 1e3, 1), "decode_tokens_per_s": round(tps, 1),
                   "device": kind}
            if bw and batch == 1:
                bound = bw * 1e9 / weight_bytes
                row["bandwidth_bound_tokens_per_s"] = round(bound, 1)
                row["fraction_of_bound"] = round(tps / bound, 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
