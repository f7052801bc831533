"""Conversion memory and speed: peak RSS and MB/s of `neox-jax convert` as the model grows.

For each model shape it writes a random checkpoint (Hugging Face fp32 safetensors, and GPT-NeoX fp16 at
tensor parallel 2, the 20B's release format), then runs, each in its own process:

    hf-to-orbax     HF fp32 -> Orbax fp32
    neox-to-orbax   GPT-NeoX fp16 TP 2 -> Orbax fp32
    orbax-to-hf     Orbax fp32 -> HF fp32
    orbax-to-neox   Orbax fp32 -> GPT-NeoX fp16 TP 2

and reports the child's peak RSS (the kernel's VmHWM), that minus the baseline (the same command converting
a pythia-14m-shaped model: the interpreter, JAX and the libraries) and in units of the model's largest fp32
tensor, and the MB/s of weights written, beside this disk's sequential write speed (fsync'd). From the worst
of those ratios it predicts the peak for neox-20b, whose largest tensor is the 50432 x 6144 embedding.

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


# The child reports its own peak: VmHWM belongs to the process's address space after exec. (ru_maxrss from wait4
# would not do: Linux carries the parent's peak across fork and exec into it.)
CHILD = """
import sys
from neox_jax.cli import main
code = main(sys.argv[1:])
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("VmHWM", int(peak.split()[1]) * 1024, file=sys.stderr)
sys.exit(code)
"""


def run(argv: list[str]) -> dict:
    """Run `neox-jax ARGV` in a child process: wall seconds and its peak RSS in bytes."""
    t0 = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", CHILD, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - t0
    if child.returncode:
        raise SystemExit(f"neox-jax {' '.join(argv)} failed:\n{child.stderr[-3000:]}")
    peak = int(child.stderr.rsplit("VmHWM", 1)[1].split()[0])
    return {"seconds": seconds, "peak_rss": peak}


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

    from neox_jax.config import NeoXConfig
    from neox_jax.convert.hf import hf_shapes

    def largest_tensor(model):  # bytes in fp32
        return max(math.prod(s) for s in hf_shapes(NeoXConfig.preset(model)).values()) * 4

    print(f"\ndisk: sequential write {disk:.0f} MB/s (fsync'd); baseline = the same command on pythia-14m "
          f"({max(baseline.values()) / 2**30:.2f} GiB at most)")
    print(f"{'model':12s} {'fp32':>6s} {'direction':14s} {'peak RSS':>9s} {'-baseline':>9s} {'/tensor':>7s} "
          f"{'written':>8s} {'seconds':>7s} {'MB/s':>5s}")
    ratios = []
    for r in rows:
        above = r["peak_rss"] - baseline[r["direction"]]
        ratios.append(above / largest_tensor(r["model"]))
        print(f"{r['model']:12s} {r['params'] * 4 / 1e9:5.1f}G {r['direction']:14s} {r['peak_rss'] / 2**30:7.2f}Gi "
              f"{above / 2**30:7.2f}Gi {ratios[-1]:7.1f} {r['written_bytes'] / 1e9:6.1f}GB {r['seconds']:7.1f} "
              f"{r['mb_per_s']:5.0f}")
    print(f"\n(peak - baseline) is at most {max(ratios):.1f}x the model's largest fp32 tensor; for neox-20b "
          f"({largest_tensor('neox-20b') / 2**30:.2f} GiB) that predicts a peak of "
          f"{(max(ratios) * largest_tensor('neox-20b') + max(baseline.values())) / 2**30:.1f} GiB")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
