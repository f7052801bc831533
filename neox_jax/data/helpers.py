"""Compiled loops for the index maps, where no exact vectorised form exists (GPT-NeoX's C++ helpers.cpp).

`blending_indices` is GPT-NeoX's greedy blend: sample i goes to the first dataset with the largest error
`weights[d] * max(i, 1) - taken[d]`, in float64 as the C++ computes it. Each choice depends on all the choices
before it, so it is a loop: numba compiles it (about 1 s on first use, cached after). Pythia's whole blend, 146M
samples over 22 datasets, takes about 12 s here; a Python loop took about 9 minutes (scripts/bench_index_maps.py).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _blend(weights: np.ndarray, dataset_index: np.ndarray, sample_index: np.ndarray) -> None:
    taken = np.zeros(len(weights), np.int64)
    for i in range(len(dataset_index)):
        at = max(float(i), 1.0)
        best, best_error = 0, weights[0] * at - float(taken[0])
        for d in range(1, len(weights)):
            error = weights[d] * at - float(taken[d])
            if error > best_error:  # strict: the first maximum wins ties
                best, best_error = d, error
        dataset_index[i] = best
        sample_index[i] = taken[best]
        taken[best] += 1


def blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index uint8 [size], sample_index int64 [size]) as GPT-NeoX's `build_blending_indices` fills them,
    for weights already normalised the way `BlendedDataset` normalises them."""
    w = np.ascontiguousarray(weights, np.float64)
    dataset_index, sample_index = np.zeros(size, np.uint8), np.zeros(size, np.int64)
    _blend(w, dataset_index, sample_index)
    return dataset_index, sample_index
