"""Preprocessing throughput vs raw `tokenizers` encode_batch on the same file and cores.

N workers (N single-threaded tokenizer processes, reading, validating and writing .bin/.idx) are compared with
the raw encode_batch of the same texts on N tokenizer threads (reading and JSON parsing included, no writing),
the two interleaved `--pairs` times (alternating which goes first); the overhead is reported pair by pair as a
median and its range.

    python scripts/bench_preprocess.py [--input FILE.jsonl] [--tokenizer TOKENIZER.json] [--workers 1 2]

Without --input it uses the embedded standard-library corpus (built on first use under data/stdlib) and,
when ../shared is present, GPT-NeoX's 20B tokenizer. Prints one JSON line per measurement, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def raw_encode(path: Path, tokenizer: str, threads: int) -> dict:
    """The floor: read, parse and encode_batch the same texts with `threads` tokenizer threads, no writing."""
    import subprocess

    code = f"""
import json, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file({tokenizer!r})
t0 = time.perf_counter()
texts = [json.loads(l)["text"] for l in open({str(path)!r}, "rb") if l.strip()]
n = sum(len(e.ids) for e in tok.encode_batch(texts))
print(json.dumps({{"seconds": time.perf_counter() - t0, "tokens": n}}))
"""
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input")
    parser.add_argument("--tokenizer")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=4, help="concatenate the input this many times")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved measurements of each side")
    args = parser.parse_args()

    # Ours with N workers runs N single-threaded tokenizers; compare with raw encode_batch on N threads.
    os.environ["RAYON_NUM_THREADS"] = "1"
    from neox_jax.data.preprocess import preprocess

    shared_tok = Path(__file__).resolve().parents[2] / "shared" / "data" / "20B_tokenizer.json"
    if args.input is None:
        corpus = Path("data/stdlib")
        if not (corpus / "corpus.jsonl").is_file():
            from neox_jax.data.corpus import build_corpus

            build_corpus(corpus)
        args.input = str(corpus / "corpus.jsonl")
        args.tokenizer = args.tokenizer or (str(shared_tok) if shared_tok.is_file() else str(corpus / "tokenizer.json"))
    tmp = Path(tempfile.mkdtemp())
    src = tmp / "input.jsonl"
    data = Path(args.input).read_bytes()
    src.write_bytes(data * args.repeat)
    size_mb = src.stat().st_size / 1e6
    rows = []
    for w in args.workers:
        raws, ours = [], []
        for i in range(args.pairs):  # interleaved, alternating which side goes first
            for side in ("raw", "ours") if i % 2 == 0 else ("ours", "raw"):
                if side == "raw":
                    raws.append(raw_encode(src, args.tokenizer, w))
                    continue
                t0 = time.perf_counter()
                summary = preprocess([src], args.tokenizer, str(tmp / f"out{w}_{i}"), append_eod=True, workers=w,
                                     show_progress=False)
                ours.append(time.perf_counter() - t0)
        overheads = sorted(100 * (o / r["seconds"] - 1) for o, r in zip(ours, raws))
        seconds = statistics.median(ours)
        row = {"workers": w, "mb": round(size_mb, 1), "tokens": summary.tokens, "pairs": args.pairs,
               "preprocess_mb_s": round(size_mb / seconds, 2), "preprocess_tokens_s": round(summary.tokens / seconds),
               "raw_encode_mb_s": round(size_mb / statistics.median(r["seconds"] for r in raws), 2),
               "overhead_pct": {"median": round(statistics.median(overheads), 1), "min": round(overheads[0], 1),
                                "max": round(overheads[-1], 1)},
               "seconds": [round(o, 2) for o in ours], "tokenizer": Path(args.tokenizer).name, "cpus": os.cpu_count()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'workers':>7} {'preprocess MB/s':>16} {'tokens/s':>12} {'raw encode MB/s':>16} "
          f"{'overhead median (min..max)':>28}")
    for r in rows:
        o = r["overhead_pct"]
        print(f"{r['workers']:>7} {r['preprocess_mb_s']:>16} {r['preprocess_tokens_s']:>12,} "
              f"{r['raw_encode_mb_s']:>16} {o['median']:>+10}% ({o['min']:+}%..{o['max']:+}%)")
    if len(rows) > 1:
        print(f"scaling {rows[0]['workers']} -> {rows[-1]['workers']} workers: "
              f"{rows[-1]['preprocess_mb_s'] / rows[0]['preprocess_mb_s']:.2f}x (medians)")


if __name__ == "__main__":
    main()
