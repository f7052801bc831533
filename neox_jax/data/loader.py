"""Per-process batches -> global sharded arrays, prefetched on a background thread.

Each process computes only the rows its devices hold (`GlobalBatches.batch(step, lo, hi)`) and
`jax.make_array_from_process_local_data` assembles the global array, so a multi-host run never reads
another host's data. Prefetching overlaps the host work (memory-mapped reads, packing) with the step.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from neox_jax.data.dataset import GlobalBatches


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int = 1) -> tuple[int, int]:
    """The [lo, hi) range along `axis` that this process's devices hold (contiguous on a NeoX mesh)."""
    spans = [idx[axis] for idx in sharding.addressable_devices_indices_map(global_shape).values()]
    lo = min(s.start or 0 for s in spans)
    hi = max(global_shape[axis] if s.stop is None else s.stop for s in spans)
    return lo, hi


class LocalBatches:
    """Step n's global batch as one array on the mesh, built from this process's rows alone."""

    def __init__(self, batches: GlobalBatches, sharding: NamedSharding, seq_length: int, vocab_size: int = 0):
        self.batches, self.sharding, self.vocab_size = batches, sharding, vocab_size
        self.global_shape = (batches.accum, batches.rows_per_microstep, seq_length + 1)
        self.lo, self.hi = local_rows(sharding, self.global_shape)

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step `step` ({"tokens"}, "labels" with label files, KTO's "rewards"); with
        `vocab_size`, every token id and label is checked to fall inside the embedding (ids past it would train to
        NaN; a label below 0 marks a token not trained on)."""
        batch = self.batches.batch(step, self.lo, self.hi)
        for name, rows in batch.items():
            if name == "rewards":
                continue
            below = rows < 0 if name == "tokens" else False  # a negative label is not trained on, as in GPT-NeoX
            outside = np.argwhere(below | (rows >= self.vocab_size)) if self.vocab_size else ()
            if len(outside):
                k, j, p = outside[0]
                raise ValueError(
                    f"{'label' if name == 'labels' else 'token'} id {rows[k, j, p]} in "
                    f"{self.batches.source(step, k, self.lo + j)} (step {step + 1}'s batch) is outside the model's "
                    f"vocab_size={self.vocab_size}: the data was tokenized with a larger vocabulary than the model's; "
                    "preprocess it with the model's tokenizer, or train a model with a larger vocab_size")
        return batch

    def device_batch(self, step: int) -> dict[str, jax.Array]:
        return {name: jax.make_array_from_process_local_data(self.sharding, rows, self.global_shape)
                for name, rows in self.host_batch(step).items()}


class Loader(LocalBatches):
    """Iterate (step, global batch array) from `start_step`, prepared ahead on a thread; the batch for a step
    never depends on the past."""

    def __init__(self, batches: GlobalBatches, sharding: NamedSharding, seq_length: int, start_step: int = 0,
                 prefetch: int = 2, vocab_size: int = 0):
        super().__init__(batches, sharding, seq_length, vocab_size)
        self.step = start_step
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="neox-jax-loader")
        self._thread.start()

    def _fill(self):
        step = self.step
        while not self._stop.is_set():
            try:
                item = (step, self.device_batch(step))
            except BaseException as e:  # hand the error to the consumer instead of dying silently
                item = (step, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            step += 1

    def __iter__(self) -> Iterator[tuple[int, jax.Array]]:
        return self

    def __next__(self) -> tuple[int, jax.Array]:
        step, batch = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        return step, batch

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()
