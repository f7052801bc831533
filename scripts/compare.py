"""Benchmarks side by side: each side in its own process, the sides interleaved pair by pair, medians and spread.

In one process JAX's and torch's thread pools slow each other (measured on 2 cores: transformers' batch-16 decode
fell from 226 to 15 tokens/s with JAX loaded beside it), so every measurement is a fresh child process of the
calling script (`--worker SIDE`), which prints one JSON line; the sides alternate which goes first.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time


def timed(fn, calls: int) -> float:
    """Median seconds of `fn()` over `calls` calls (`fn` returns when its work is done)."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def child(script: str, args: list[str]) -> dict:
    """Run `script args` in a new interpreter; its last stdout line is its JSON result."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def interleaved(script: str, args: list[str], sides: list[str], pairs: int, metric: str,
                progress=lambda text: print(text, file=sys.stderr, flush=True)) -> dict:
    """`pairs` rounds of one child per side (`--worker SIDE`), alternating the order; each side's `metric` (higher
    is better) as median / min / max, and the first side's ratio to the second, pair by pair."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(pairs):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            runs[side].append(child(script, [*args, "--worker", side]))
            progress(f"pair {i + 1}/{pairs} {side}: {metric} {runs[side][-1][metric]}")
    out = {"pairs": pairs, "metric": metric, **{side: spread([r[metric] for r in runs[side]]) for side in sides},
           "setup": {k: v for r in runs.values() for k, v in r[0].items()
                     if k in ("jax", "torch", "device", "threads", "host_malloc")}}
    if len(sides) == 2:
        first, second = (runs[s] for s in sides)
        out[f"{sides[0]}/{sides[1]}"] = spread([a[metric] / b[metric] for a, b in zip(first, second)])
    out["runs"] = runs
    return out
