"""Conversion memory and speed: peak RSS and MB/s of `neox-jax convert` as the model grows.

For each model shape it writes a random checkpoint (Hugging Face fp32 safetensors, and GPT-NeoX fp16 at
tensor parallel 2, the 20B's release format), then runs, each in its own process:

    hf-to-orbax     HF fp32 -> Orbax fp32
    neox-to-orbax   GPT-NeoX fp16 TP 2 -> Orbax fp32
    orbax-to-hf     Orbax fp32 -> HF fp32
    orbax-to-neox   Orbax fp32 -> GPT-NeoX fp16 TP 2

and reports the child's peak RSS (the kernel's ru_maxrss, from wait4), that minus the baseline (the same
command converting a pythia-14m-shaped model: the interpreter, JAX and the libraries), and the MB/s of
weights written, beside this disk's sequential write speed (fsync'd).

    python scripts/bench_convert.py [--models pythia-410m pythia-1.4b pythia-2.8b] [--dir DIR]

Needs about 4x the largest model's fp32 size of free disk (2.8b: 45 GB); folders are removed as it goes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


class RandomSource:
    """Random tensors under Hugging Face names, made one at a time (so writing the fixture is streamed too)."""

    def __init__(self, config, dtype):
        from neox_jax.convert.hf import hf_shapes

        self.shapes, self.dtype_ = hf_shapes(config), np.dtype(dtype)
        self.rng = np.random.default_rng(0)

    def names(self):
        return list(self.shapes)

    def shape(self, name):
        return self.shapes[name]

    def dtype(self):
        return self.dtype_

    def get(self, name):
        return (0.02 * self.rng.standard_normal(self.shapes[name], dtype=np.float32)).astype(self.dtype_)


def run(argv: list[str]) -> dict:
    """Run `neox-jax ARGV` in a child process: wall seconds and its peak RSS in bytes."""
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "neox_jax.cli", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    if status:
        raise SystemExit(f"neox-jax {' '.join(argv)} failed:\n{child.stderr.read().decode()[-3000:]}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def disk_write_speed(folder: Path, nbytes: int = 2 * 2**30) -> float:
    """Sequential write speed of this disk in MB/s, fsync'd."""
    block = np.random.default_rng(0).bytes(64 * 2**20)
    file = folder / "disk-speed.tmp"
    t0 = time.perf_counter()
    with open(file, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    file.unlink()
    return nbytes / seconds / 1e6


def make_checkpoints(model: str, folder: Path) -> dict:
    from neox_jax.config import NeoXConfig
    from neox_jax.convert.hf import write_hf
    from neox_jax.convert.neox import write_neox

    config = NeoXConfig.preset(model)
    write_hf(RandomSource(config, "float32"), config, folder / "hf", max_shard_bytes=2 * 2**30)
    write_neox(RandomSource(config, "float16"), config, folder / "neox", tensor_parallel=2, pipe_parallel=1)
    return {"params": config.num_params}


def bench_model(model: str, work: Path) -> list[dict]:
    folder = work / model
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    info = make_checkpoints(model, folder)
    rows = []
    for direction, src, dst, extra in (
            ("hf-to-orbax", "hf", "orbax", []),
            ("neox-to-orbax", "neox", "orbax-from-neox", []),
            ("orbax-to-hf", "orbax", "hf-back", []),
            ("orbax-to-neox", "orbax", "neox-back", ["--dtype", "float16", "--tensor-parallel", "2"])):
        result = run(["convert", direction, str(folder / src), str(folder / dst), *extra])
        written = folder_bytes(folder / dst)
        rows.append({"model": model, "params": info["params"], "direction": direction, **result,
                     "written_bytes": written, "mb_per_s": written / result["seconds"] / 1e6})
        print(json.dumps(rows[-1]), flush=True)
        if dst not in ("orbax",):
            shutil.rmtree(folder / dst)
    shutil.rmtree(folder)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pythia-410m", "pythia-1.4b", "pythia-2.8b"])
    parser.add_argument("--dir", help="work folder (default: a temporary folder on the same disk as /tmp)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    disk = disk_write_speed(work)
    print(json.dumps({"disk_write_mb_per_s": disk}), flush=True)
    baseline = {r["direction"]: r["peak_rss"] for r in bench_model("pythia-14m", work)}
    rows = [r for m in args.models for r in bench_model(m, work)]

    print(f"\ndisk: sequential write {disk:.0f} MB/s (fsync'd); baseline = the same command on pythia-14m")
    print(f"{'model':12s} {'weights fp32':>12s} {'direction':14s} {'peak RSS':>9s} {'- baseline':>10s} "
          f"{'written':>9s} {'seconds':>8s} {'MB/s':>6s}")
    for r in rows:
        print(f"{r['model']:12s} {r['params'] * 4 / 1e9:10.1f}GB {r['direction']:14s} "
              f"{r['peak_rss'] / 2**30:7.2f}GB {(r['peak_rss'] - baseline[r['direction']]) / 2**30:8.2f}GB "
              f"{r['written_bytes'] / 1e9:7.1f}GB {r['seconds']:8.1f} {r['mb_per_s']:6.0f}")
    from neox_jax.config import NeoXConfig
    from neox_jax.convert.hf import hf_shapes

    largest = max(rows, key=lambda r: r["params"])["model"]
    tensor = max(math.prod(s) for s in hf_shapes(NeoXConfig.preset(largest)).values())
    print(f"\nlargest single tensor of {largest}: {tensor * 4 / 2**30:.2f} GiB in fp32")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
