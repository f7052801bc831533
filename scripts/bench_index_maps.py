"""Index maps at Pile scale: time and peak RSS of building GPT-NeoX's maps, each in a fresh process.

    one     GPTDataset's doc / sample / shuffle maps for a synthetic `.idx` of a tenth of the Pile (21M documents,
            30B tokens), seq 2048, one epoch (14.6M samples), written to the cache as a training run does
    blend   the blending maps of 22 sources with Pile-shaped weights for Pythia's whole run (143,000 steps x
            1024 samples = 146.4M samples), as BlendedDataset builds them

The `.bin` is a sparse file of the right size (building the maps reads only the `.idx`), so the benchmark needs
about 0.5 GB of disk. Prints one JSON line per case: seconds, peak RSS of the child (VmHWM) in GB.

    python scripts/bench_index_maps.py [--documents 21000000] [--tokens 30e9] [--samples 146432000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# 22 weights shaped like the Pile's components: GiB x epochs as the Pile paper's Table 1 lists them.
PILE_WEIGHTS = [227.12, 90.27 * 2, 100.96 * 1.5, 62.77 * 2, 56.21 * 2, 95.16, 51.15 * 1.5, 32.20 * 2, 22.90 * 2,
                19.26 * 2, 10.88 * 2.5, 12.98 * 1.5, 6.38 * 3, 7.75 * 2, 5.52 * 2, 6.30 * 1.5, 4.59 * 2, 3.90 * 2,
                3.73 * 2, 2.38 * 2, 1.89 * 2, 0.88 * 2]


def write_synthetic_idx(prefix: Path, documents: int, tokens: int, seed: int = 0):
    """An MMIDIDX index of `documents` lognormal document sizes summing to `tokens`, and a sparse `.bin`."""
    from neox_jax.data.indexed import CODES, MAGIC, VERSION

    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(6.5, 1.2, documents)
    sizes = np.maximum(1, np.floor(sizes * (tokens / sizes.sum()))).astype(np.int64)
    sizes[: tokens - sizes.sum()] += 1  # exactly `tokens` in all (the floor lost less than one per document)
    pointers = np.zeros(documents, np.int64)
    np.cumsum(sizes[:-1] * 2, out=pointers[1:])
    with open(f"{prefix}.idx", "wb") as f:
        f.write(MAGIC + struct.pack("<QBQQ", VERSION, CODES[np.dtype(np.uint16)], documents, documents + 1))
        f.write(sizes.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(documents + 1, dtype=np.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(sizes.sum()) * 2)


CHILD = r"""
import json, sys, time
import numpy as np
case, prefix, samples, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
if case == "one":
    from neox_jax.data.dataset import GPTDataset
    from neox_jax.data.indexed import IndexedDataset
    ds = IndexedDataset(prefix)
    tokens = int(ds.sizes.astype(np.int64).sum())
    n = (tokens - 1) // 2048  # one epoch
    out = GPTDataset(ds, np.arange(len(ds), dtype=np.int32), n, 2048, 1234, cache_dir=cache)
    what = {"documents": len(ds), "tokens": tokens, "samples": len(out)}
else:
    from neox_jax.data.dataset import normalised_weights
    from neox_jax.data.helpers import blending_indices
    PILE = json.loads(sys.argv[5])
    index, sample = blending_indices(normalised_weights(PILE), samples)
    what = {"sources": len(PILE), "samples": samples}
seconds = time.perf_counter() - start
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
print(json.dumps({"case": case, **what, "seconds": round(seconds, 2), "peak_rss_gb": round(peak / 1e9, 2)}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--documents", type=int, default=21_000_000)
    ap.add_argument("--tokens", type=float, default=30e9)
    ap.add_argument("--samples", type=int, default=143_000 * 1024)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        prefix = Path(tmp) / "pile_tenth_text_document"
        t = time.perf_counter()
        write_synthetic_idx(prefix, args.documents, int(args.tokens))
        print(json.dumps({"case": "synthetic .idx written", "seconds": round(time.perf_counter() - t, 1)}), flush=True)
        for case in ("one", "blend"):
            out = subprocess.run([sys.executable, "-c", CHILD, case, str(prefix), str(args.samples), f"{tmp}/cache",
                                  json.dumps(PILE_WEIGHTS)],
                                 capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if out.returncode:
                sys.exit(out.stderr)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
