"""Decode throughput through the public `generate()`, optionally side by side with transformers' `generate`.

    python scripts/bench_decode.py [--presets pythia-70m pythia-160m] [--batches 1 16] [--prompt-len 32]
                                   [--new-tokens 128] [--dtype float32] [--pairs 3] [--compare transformers]
                                   [--weight-copies auto|on|off]

Random weights of each preset's shape, written once as a Hugging Face folder that both sides load (the same
weights). Every measurement runs in its own process (scripts/compare.py), the sides interleaved: a child compiles
with one call, then times `--calls` calls and reports the median. Tokens/s count the new tokens of all rows over the
whole call, prefill included, as a user sees it. Prints one JSON line per (preset, batch) with both sides' medians
and spread and the ratio neox_jax / transformers; on a GPU, batch 1 also against the HBM bound (weights and cache
bytes per token / bandwidth). `--weight-copies on|off` runs a `Generator(copies=...)` instead of `generate()`'s own:
the decode layouts (fused per-layer weight copies, per-layer caches) kept or not whatever the backend.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import interleaved, spread, timed  # noqa: E402

def prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    import numpy as np

    return np.random.RandomState(0).randint(2, vocab, (batch, length)).tolist()


def worker_jax(args) -> dict:
    from neox_jax import gpus, host_malloc

    host_malloc.reuse_freed_memory()  # as the CLI does, before JAX starts its backend
    import jax

    import neox_jax

    model = neox_jax.from_pretrained(args.model_dir, dtype=args.dtype)
    ids = prompts(model.config.vocab_size, args.batch, args.prompt_len)
    generate = functools.partial(neox_jax.generate, model)
    if args.weight_copies != "auto":  # a Generator of the asked kind, kept between calls as generate() keeps its own
        generate = neox_jax.Generator(model, copies=args.weight_copies == "on")
    out = generate(ids, max_new_tokens=args.new_tokens)  # compiles prefill and decode
    assert all(len(row) == args.new_tokens for row in out)
    seconds = timed(lambda: generate(ids, max_new_tokens=args.new_tokens), args.calls)
    row = {"seconds": seconds, "tokens_per_s": args.batch * args.new_tokens / seconds,
           "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "host_malloc": host_malloc.state()}
    card = gpus.card_of(row["device"])
    if card and args.batch == 1:
        cfg = model.config
        itemsize = jax.numpy.dtype(cfg.dtype).itemsize
        cache = 2 * cfg.num_layers * (args.prompt_len + args.new_tokens / 2) * cfg.hidden_size * itemsize
        bound = card.bandwidth_gbps * 1e9 / (cfg.num_params * itemsize + cache)
        row.update(bandwidth_bound_tokens_per_s=bound, fraction_of_bound=row["tokens_per_s"] / bound)
    return row


def worker_torch(args) -> dict:
    import torch
    from transformers import GPTNeoXForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPTNeoXForCausalLM.from_pretrained(args.model_dir, torch_dtype=getattr(torch, args.dtype)).to(device)
    model.eval()
    ids = torch.tensor(prompts(model.config.vocab_size, args.batch, args.prompt_len), device=device)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    def call():
        model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        call()
        seconds = timed(call, args.calls)
    return {"seconds": seconds, "tokens_per_s": args.batch * args.new_tokens / seconds, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def random_folder(preset: str, dtype: str, root: Path) -> Path:
    from flax import nnx

    from neox_jax import GPTNeoX, NeoXConfig, save_pretrained

    folder = root / preset
    save_pretrained(GPTNeoX(NeoXConfig.preset(preset), rngs=nnx.Rngs(0)), folder, dtype=dtype)
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["pythia-70m", "pythia-160m"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--pairs", type=int, default=3, help="interleaved measurements per side")
    p.add_argument("--calls", type=int, default=3, help="timed calls per measurement (after one that compiles)")
    p.add_argument("--compare", choices=["transformers"], help="also run transformers' generate, interleaved")
    p.add_argument("--weight-copies", choices=["auto", "on", "off"], default="auto",
                   help="neox_jax's Generator(copies=...): auto, the default, keeps the decode layouts on a CPU only")
    p.add_argument("--worker", choices=["neox_jax", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps((worker_jax if args.worker == "neox_jax" else worker_torch)(args)))
        return
    sides = ["neox_jax"] + (["transformers"] if args.compare else [])
    with tempfile.TemporaryDirectory() as root:
        for preset in args.presets:
            folder = random_folder(preset, args.dtype, Path(root))
            for batch in args.batches:
                common = ["--model-dir", str(folder), "--batch", str(batch), "--prompt-len", str(args.prompt_len),
                          "--new-tokens", str(args.new_tokens), "--dtype", args.dtype, "--calls", str(args.calls),
                          "--weight-copies", args.weight_copies]
                result = interleaved(__file__, common, sides, args.pairs, "tokens_per_s")
                bound = [r["fraction_of_bound"] for r in result.pop("runs")["neox_jax"] if "fraction_of_bound" in r]
                if bound:  # neox_jax's tokens/s as a fraction of the HBM bound (batch 1 on a GPU of gpus.CARDS)
                    result["fraction_of_bound"] = spread(bound)
                print(json.dumps({"preset": preset, "batch": batch, "prompt": args.prompt_len,
                                  "new_tokens": args.new_tokens, "dtype": args.dtype,
                                  "weight_copies": args.weight_copies, **result,
                                  "cpus": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
