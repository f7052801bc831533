"""GPT-NeoX's GPT2Dataset sampling, splits and blending, reproduced exactly.

A sample is `seq_length + 1` tokens packed across documents (consecutive samples overlap by one token).
The order comes from three index maps built with one `np.random.RandomState(seed)` in GPT-NeoX's call order:

    doc_idx      every document once per epoch, all epochs concatenated, then shuffled (one shuffle)
    sample_idx   (position in doc_idx, token offset) where each sample starts; [num_samples + 1, 2]
    shuffle_idx  a permutation of the samples, shuffled with the same generator

so the same data, seq_length, seed and sample count give the samples GPT-NeoX gives. The maps are cached
as .npy beside the data (or in `data_cache_dir`) under GPT-NeoX's file names, written atomically, with a stamp
of the data they came from: maps of other data (a prefix preprocessed again) are rebuilt, never reused.
A batch is a pure function of (seed, step): there is no iterator state to save.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from neox_jax.atomic import atomic_path, write_json
from neox_jax.data.helpers import blending_indices
from neox_jax.data.indexed import IndexedDataset


def split_boundaries(split: str, num_documents: int) -> list[int]:
    """GPT-NeoX's `get_train_valid_test_split_`: "969,30,1" -> document boundaries [0, a, b, n]."""
    sep = "," if "," in split else "/" if "/" in split else None
    try:
        weights = [float(s) for s in (split.split(sep) if sep else [split])]
    except ValueError:
        raise ValueError(f"split={split!r}: expected weights like '969,30,1'") from None
    weights = (weights + [0.0, 0.0])[:3]
    if sum(weights) <= 0 or min(weights) < 0:
        raise ValueError(f"split={split!r}: weights must be non-negative with a positive sum")
    weights = [w / sum(weights) for w in weights]
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    diff = bounds[-1] - num_documents
    return [bounds[0]] + [b - diff for b in bounds[1:]]


def num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """GPT-NeoX's `_num_epochs`: the fewest epochs E >= 1 with (E * tokens - 1) // seq_length >= num_samples."""
    if tokens_per_epoch <= 0:
        raise ValueError("the dataset has no tokens")
    return max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, epochs: int, rng: np.random.RandomState) -> np.ndarray:
    doc_idx = np.tile(np.asarray(documents), epochs).astype(np.int32)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, epochs: int,
                     tokens_per_epoch: int) -> np.ndarray:
    """Where each sample starts: GPT-NeoX's C++ `build_sample_idx`, vectorised.

    Sample k ends (inclusive) at token k*seq_length of the doc_idx stream, which is where sample k+1
    starts. That token lies in the first document whose cumulative end exceeds it.
    """
    num_samples = (epochs * tokens_per_epoch - 1) // seq_length
    ends = np.cumsum(sizes[doc_idx].astype(np.int64))
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    docs = np.searchsorted(ends, positions, side="right")
    offsets = positions - np.concatenate([[0], ends])[docs]
    dtype = np.int32 if ends[-1] < 2**31 else np.int64
    out = np.zeros((num_samples + 1, 2), dtype)
    out[1:, 0], out[1:, 1] = docs, offsets
    return out


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    shuffle = np.arange(size, dtype=dtype)
    rng.shuffle(shuffle)
    return shuffle


def source_stamp(prefix: str) -> dict:
    """What the index maps were built from: size and modification time of the .bin and .idx."""
    files = (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"))
    return {p.suffix[1:]: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def remove_index_maps(prefix: str | os.PathLike, folder: str | os.PathLike | None = None) -> list[Path]:
    """Delete the cached index maps (and their stamps) of a data prefix: preprocessing that overwrites the data
    calls this, so no map of the old data survives."""
    prefix = Path(prefix)
    gone = sorted(Path(folder or prefix.parent).glob(f"{prefix.name}_*_indexmap_*"))
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def _save_atomic(path: Path, array: np.ndarray):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


class GPTDataset:
    """Samples of `seq_length + 1` tokens from `documents` of an indexed dataset, in GPT-NeoX's order; with
    `labels` (a GPT-NeoX label file: the target ids of the same documents, -100 where not trained on) each sample
    is the pair [tokens, labels], cut at the same places. With `rewards` (KTO's: one integer per document, as
    GPT-NeoX's preprocessing writes them) a third row gives each token its document's reward, 0 on padding, and the
    labels are the tokens themselves where there is no label file.

    `pack_impl` is GPT-NeoX's: `packed` cuts the concatenated documents into samples; `unpacked` makes a sample of
    one document (its first `seq_length + 1` tokens, padded), in `unpacked_order`; `pack_until_overflow` of whole
    documents, as many as fit, in `until_overflow_order`. (GPT-NeoX's reader also appends the next document's first
    token to the last two kinds' samples; here a sample is its documents alone.)"""

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, num_samples: int, seq_length: int,
                 seed: int, name: str = "train", cache_dir: str | os.PathLike | None = None,
                 labels: IndexedDataset | None = None, rewards: IndexedDataset | None = None,
                 pack_impl: str = "packed"):
        self.indexed, self.seq_length, self.name, self.labels, self.rewards = indexed, seq_length, name, labels, rewards
        self.pack_impl = pack_impl
        self.fields = ("tokens",) + (("labels",) if labels is not None or rewards is not None else ()) + (
            ("rewards",) if rewards is not None else ())
        if labels is not None and not np.array_equal(labels.sizes, indexed.sizes):
            raise ValueError(f"label file {labels.prefix} does not match {indexed.prefix}: {len(labels.sizes)} "
                             f"documents against {len(indexed.sizes)}, or other lengths; a label file belongs to the "
                             "data file it was written with (label_data_paths in the order of data_paths)")
        if rewards is not None and (len(rewards.sizes) != len(indexed.sizes) or np.any(rewards.sizes < 1)
                                    or not np.issubdtype(rewards.dtype, np.integer)):
            raise ValueError(f"reward file {rewards.prefix} ({len(rewards.sizes)} documents of {rewards.dtype}) does "
                             f"not match {indexed.prefix} ({len(indexed.sizes)} documents): a reward file holds one "
                             "integer per document of the data file it was written with, as GPT-NeoX's "
                             "preprocess_data_with_chat_template.py --reward-key writes it (reward_data_paths in the "
                             "order of data_paths)")
        documents = np.asarray(documents)
        if documents.size == 0:
            raise ValueError(f"{indexed.prefix}: the {name} split has no documents; change `split`")
        what = f"{indexed.prefix} ({name})"
        if pack_impl == "unpacked":
            self.documents, self.order = unpacked_order(documents, [labels], seq_length, num_samples, seed, what)
            self.skipped = len(documents) - len(self.documents)
            return
        if pack_impl == "pack_until_overflow":
            self.doc_idx, self.starts, self.shuffle_idx, self.skipped = until_overflow_order(
                documents, indexed.sizes, labels, seq_length, num_samples, seed, what)
            return
        stem = f"{Path(indexed.prefix).name}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s_packedpi"
        folder = Path(cache_dir) if cache_dir else Path(indexed.prefix).parent
        files = {k: folder / f"{stem}_{k}_idx.npy" for k in ("doc", "sample", "shuffle")}
        stamp_file, stamp = folder / f"{stem}_source.json", source_stamp(indexed.prefix)
        # Maps without a stamp (GPT-NeoX's own) are trusted; stamped ones only for the data they were built from.
        fresh = not stamp_file.is_file() or json.loads(stamp_file.read_text()) == stamp
        if all(f.is_file() for f in files.values()) and fresh:
            maps = {k: np.load(f, mmap_mode="r", allow_pickle=False) for k, f in files.items()}
        else:
            tokens_per_epoch = int(indexed.sizes[documents].astype(np.int64).sum())
            epochs = num_epochs(tokens_per_epoch, seq_length, num_samples)
            rng = np.random.RandomState(seed=seed)
            doc_idx = build_doc_idx(documents, epochs, rng)
            sample_idx = build_sample_idx(indexed.sizes, doc_idx, seq_length, epochs, tokens_per_epoch)
            maps = {"doc": doc_idx, "sample": sample_idx, "shuffle": build_shuffle_idx(len(sample_idx) - 1, rng)}
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for k, f in files.items():
                    _save_atomic(f, maps[k])
                write_json(stamp_file, stamp)
            except OSError as e:
                raise OSError(f"cannot write the index maps of {indexed.prefix} into {folder} ({e.strerror}): set "
                              "data_cache_dir to a writable folder") from None
        self.doc_idx, self.sample_idx, self.shuffle_idx = maps["doc"], maps["sample"], maps["shuffle"]

    def __len__(self) -> int:
        return len(self.order if self.pack_impl == "unpacked" else self.shuffle_idx)

    def source(self, i: int) -> str:
        """Where sample `i` comes from, for error messages."""
        return f"{self.indexed.prefix} ({self.name} sample {i % len(self)})"

    def __getitem__(self, i: int) -> np.ndarray:
        """int64 [seq_length + 1], or [2, seq_length + 1] (tokens, labels) with a label file; an index past the end
        wraps around, as in GPT-NeoX."""
        pieces = self._pieces(i)
        tokens = self._read(self.indexed, pieces, 0)  # GPT-NeoX pads short samples with 0, their labels with -100
        if len(self.fields) == 1:
            return tokens
        rows = [tokens, tokens if self.labels is None else self._read(self.labels, pieces, -100)]
        return np.stack(rows + ([self._read(self.rewards, pieces, 0, per_token=True)] if self.rewards else []))

    def _pieces(self, i: int) -> list[tuple[int, int, int | None]]:
        """(document, offset, length or None for the rest) of each piece of sample i."""
        if self.pack_impl == "unpacked":
            return [(int(self.documents[self.order[i % len(self)]]), 0, None)]
        k = int(self.shuffle_idx[i % len(self)])
        if self.pack_impl == "pack_until_overflow":
            return [(int(d), 0, None) for d in self.doc_idx[self.starts[k]:self.starts[k + 1]]]
        (doc_f, off_f), (doc_l, off_l) = self.sample_idx[k], self.sample_idx[k + 1]
        pieces = [(int(self.doc_idx[j]), 0, None) for j in range(doc_f, doc_l + 1)]
        if doc_f == doc_l:
            return [(pieces[0][0], int(off_f), int(off_l - off_f + 1))]
        pieces[0], pieces[-1] = (pieces[0][0], int(off_f), None), (pieces[-1][0], 0, int(off_l + 1))
        return pieces

    def _read(self, indexed: IndexedDataset, pieces, pad: int, per_token: bool = False) -> np.ndarray:
        """A sample of `indexed` from its `pieces`, padded or cut to `seq_length + 1`; `per_token`: each token the
        first value of its document instead (KTO's rewards, as GPT-NeoX repeats them)."""
        if per_token:
            sizes = self.indexed.sizes
            sample = np.concatenate([np.full(int(sizes[d]) - off if n is None else n, indexed.get(d)[0])
                                     for d, off, n in pieces])
        else:
            sample = np.concatenate([indexed.get(d, offset=off, length=n) for d, off, n in pieces])
        out = np.full(self.seq_length + 1, pad, np.int64)
        n = min(len(sample), self.seq_length + 1)
        out[:n] = sample[:n]
        return out


def unpacked_order(documents: np.ndarray, labels: Sequence[IndexedDataset | None], seq_length: int,
                   num_samples: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """GPT-NeoX's `pack_impl: unpacked` order: the documents whose labels (every file given) train a token within
    `seq_length` (the others are skipped, as GPT-NeoX skips them), repeated to `num_samples` and shuffled once with
    the seed -> (documents, order): sample i is document documents[order[i]]."""
    documents = np.asarray(documents)
    kept = np.asarray([d for d in documents if all(
        lab is None or np.any(lab.get(int(d))[:seq_length] >= 0) for lab in labels)])
    if kept.size == 0:
        raise ValueError(f"{what}: no document has a trained token within seq_length={seq_length}")
    order = np.array([i % len(kept) for i in range(num_samples)])
    np.random.RandomState(seed=seed).shuffle(order)
    return kept, order


def until_overflow_order(documents: np.ndarray, sizes: np.ndarray, labels: IndexedDataset | None, seq_length: int,
                         num_samples: int, seed: int, what: str):
    """GPT-NeoX's `pack_impl: pack_until_overflow` maps: the documents in a seeded shuffle (reshuffled at each pass),
    those whose labels train nothing within `seq_length + 1` skipped, each sample taking whole documents until the
    next would overflow `seq_length + 1` (a longer one alone, cut) -> (doc_idx, starts: sample k is doc_idx[starts[k]:
    starts[k + 1]], the samples' shuffle, documents skipped). GPT-NeoX's loop, but that a skipped last document of a
    pass starts the next pass (GPT-NeoX's indexes past the end there)."""
    documents = np.asarray(documents)
    trained = np.array([labels is None or np.any(labels.get(int(d))[:seq_length + 1] != -100) for d in documents])
    if not trained.any():
        raise ValueError(f"{what}: no document has a trained token within seq_length + 1={seq_length + 1}")
    rng = np.random.RandomState(seed=seed)
    shuffle_idx = np.arange(num_samples)
    rng.shuffle(shuffle_idx)
    order = np.arange(len(documents))
    rng.shuffle(order)
    starts, doc_idx, running, cur = [], [], 0, 0
    while len(starts) < num_samples:
        j = order[cur]
        if trained[j]:
            n = int(sizes[documents[j]])
            if running == 0 or running + n > seq_length + 1:
                starts.append(len(doc_idx))
                running = 0
            running += n
            doc_idx.append(documents[j])
        cur += 1
        if cur == len(documents):
            cur = 0
            rng.shuffle(order)
    starts.append(len(doc_idx))
    return np.asarray(doc_idx), np.asarray(starts), shuffle_idx, int((~trained).sum())


class PairDataset:
    """DPO's pairs: sample i is document d of the chosen file and document d of the rejected one, each alone (GPT-NeoX's
    `pack_impl: unpacked`, which pairwise data uses), as [chosen, rejected] x [tokens, labels] x [seq_length + 1],
    tokens padded with 0 and labels with -100 (without label files, every token is a label). The order is GPT-NeoX's:
    the documents repeated to `num_samples` and shuffled once with the seed; a document whose labels mask its first
    `seq_length` tokens on either side is skipped, as GPT-NeoX skips it (`unpacked_order`; without the next document's
    first token GPT-NeoX's reader appends, as GPTDataset unpacked)."""

    pairs, fields = True, ("tokens", "labels")

    def __init__(self, chosen: IndexedDataset, rejected: IndexedDataset, chosen_labels: IndexedDataset | None,
                 rejected_labels: IndexedDataset | None, documents: np.ndarray, num_samples: int, seq_length: int,
                 seed: int, name: str = "train"):
        if len(chosen.sizes) != len(rejected.sizes):
            raise ValueError(f"{rejected.prefix} has {len(rejected.sizes)} documents but {chosen.prefix} has "
                             f"{len(chosen.sizes)}: DPO pairs document i of the chosen file with document i of the "
                             "rejected one (rejected_data_paths in the order of data_paths)")
        for data, labels in ((chosen, chosen_labels), (rejected, rejected_labels)):
            if labels is not None and not np.array_equal(labels.sizes, data.sizes):
                raise ValueError(f"label file {labels.prefix} does not match {data.prefix}: a label file belongs to "
                                 "the data file it was written with")
        self.files = [(chosen, chosen_labels), (rejected, rejected_labels)]
        self.seq_length, self.name = seq_length, name
        self.documents, self.order = unpacked_order(documents, [chosen_labels, rejected_labels], seq_length,
                                                    num_samples, seed, f"{chosen.prefix} ({name} pairs)")
        self.skipped = len(documents) - len(self.documents)

    def __len__(self) -> int:
        return len(self.order)

    def source(self, i: int) -> str:
        return f"{self.files[0][0].prefix} ({self.name} pair {int(self.documents[self.order[i % len(self)]])})"

    def __getitem__(self, i: int) -> np.ndarray:
        d = int(self.documents[self.order[i % len(self)]])
        out = np.empty((2, 2, self.seq_length + 1), np.int64)
        for side, (data, labels) in enumerate(self.files):
            tokens = data.get(d)[:self.seq_length + 1]
            out[side, 0] = 0
            out[side, 0, :len(tokens)] = tokens
            out[side, 1] = -100
            out[side, 1, :len(tokens)] = tokens if labels is None else labels.get(d)[:self.seq_length + 1]
        return out


def build_pair_datasets(chosen: Sequence[str], rejected: Sequence[str], chosen_labels: Sequence[str],
                        rejected_labels: Sequence[str], weights: Sequence[float] | None, split: str | None,
                        num_samples: int, seq_length: int, seed: int, name: str):
    """DPO pairs from the files of one split (`split` cuts each file's documents as for plain data; None reads
    them whole), blended by `weights` when there are several files."""
    index = (lambda ps: [IndexedDataset(p) for p in ps] or [None] * len(chosen))  # noqa: E731
    weights = list(weights) if weights else [1.0] * len(chosen)
    s = {"train": 0, "valid": 1}[name]
    parts = []
    for c, r, cl, rl, n in zip(index(chosen), index(rejected), index(chosen_labels), index(rejected_labels),
                               samples_per_dataset(weights, num_samples) if len(chosen) > 1 else [num_samples]):
        lo, hi = split_boundaries(split, len(c.sizes))[s:s + 2] if split else (0, len(c.sizes))
        if hi <= lo:
            return None
        parts.append(PairDataset(c, r, cl, rl, np.arange(lo, hi), n, seq_length, seed, name))
    return parts[0] if len(parts) == 1 else BlendedDataset(parts, weights)


def skipped_documents(dataset) -> int:
    """Documents an unpacked dataset (or a blend of them) skips because their labels train nothing."""
    return sum(getattr(d, "skipped", 0) for d in getattr(dataset, "datasets", [dataset]))


def normalised_weights(weights: Sequence[float]) -> np.ndarray:
    """The blend weights as GPT-NeoX computes them, bit for bit: divided by their Python sum
    (`get_normalized_weights_and_num_samples`), then again by their numpy sum (`BlendableDataset`)."""
    total = sum(weights)
    w = np.array([x / total for x in weights], np.float64)
    return w / np.sum(w)


class BlendedDataset:
    def __init__(self, datasets: Sequence[GPTDataset], weights: Sequence[float]):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.pairs, self.fields = getattr(datasets[0], "pairs", False), datasets[0].fields
        if len(datasets) >= 255:
            raise ValueError(f"{len(datasets)} datasets: GPT-NeoX blends at most 254")
        self.size = sum(len(d) for d in datasets)
        self.dataset_index, self.sample_index = blending_indices(normalised_weights(weights), self.size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        i %= self.size
        return self.datasets[self.dataset_index[i]][int(self.sample_index[i])]

    def source(self, i: int) -> str:
        i %= self.size
        return self.datasets[self.dataset_index[i]].source(int(self.sample_index[i]))


def samples_per_dataset(weights: Sequence[float], num_samples: int) -> list[int]:
    """GPT-NeoX asks each blended dataset for its share plus 0.5% slack."""
    total = sum(weights)
    return [int(math.ceil(num_samples * (w / total) * 1.005)) for w in weights]


def build_split_datasets(prefixes: Sequence[str], weights: Sequence[float] | None, split: str,
                         num_samples: Sequence[int], seq_length: int, seed: int,
                         cache_dir: str | os.PathLike | None = None, label_prefixes: Sequence[str] = (),
                         reward_prefixes: Sequence[str] = (), pack_impl: str = "packed"
                         ) -> list[GPTDataset | BlendedDataset | None]:
    """train / valid / test datasets from one or more data prefixes, each cut by `split` into
    contiguous document ranges, blended by `weights` when there are several. A split with no samples
    requested (or no documents) is None. `label_prefixes` and `reward_prefixes`, one per prefix where given, are
    read in step with them."""
    weights = list(weights) if weights else [1.0] * len(prefixes)
    if len(weights) != len(prefixes):
        raise ValueError(f"{len(prefixes)} data paths but {len(weights)} data weights")
    indexed = [IndexedDataset(p) for p in prefixes]
    labels = [IndexedDataset(p) for p in label_prefixes] or [None] * len(indexed)
    rewards = [IndexedDataset(p) for p in reward_prefixes] or [None] * len(indexed)
    out = []
    for s, (name, wanted) in enumerate(zip(("train", "valid", "test"), num_samples)):
        if wanted <= 0:
            out.append(None)
            continue
        parts = []
        for ds, lab, rew, n in zip(indexed, labels, rewards,
                                   samples_per_dataset(weights, wanted) if len(indexed) > 1 else [wanted]):
            lo, hi = split_boundaries(split, len(ds))[s:s + 2]
            if hi <= lo:
                parts = None
                break
            parts.append(GPTDataset(ds, np.arange(lo, hi, dtype=np.int32), n, seq_length, seed, name, cache_dir,
                                    lab, rew, pack_impl))
        out.append(None if parts is None else parts[0] if len(parts) == 1 else BlendedDataset(parts, weights))
    return out


def build_path_datasets(train: Sequence[str], train_weights: Sequence[float] | None, valid: Sequence[str],
                        valid_weights: Sequence[float] | None, num_samples: Sequence[int], seq_length: int, seed: int,
                        cache_dir: str | os.PathLike | None = None, train_labels: Sequence[str] = (),
                        valid_labels: Sequence[str] = (), train_rewards: Sequence[str] = (),
                        valid_rewards: Sequence[str] = (), pack_impl: str = "packed") -> list[BlendedDataset | None]:
    """train / valid datasets as GPT-NeoX builds them from `train_data_paths` / `valid_data_paths` (and their label
    and reward files): every document of each path, the i-th path's maps named `train_i` / `valid_i` and asked for
    its share plus 0.5% slack, always blended (one path too, where the blend is the identity). A split with no
    samples requested is None."""
    out = []
    for name, prefixes, weights, label_prefixes, reward_prefixes, wanted in (
            ("train", train, train_weights, train_labels, train_rewards, num_samples[0]),
            ("valid", valid, valid_weights, valid_labels, valid_rewards, num_samples[1])):
        if wanted <= 0 or not prefixes:
            out.append(None)
            continue
        weights = list(weights) if weights else [1.0] * len(prefixes)
        labels = [IndexedDataset(p) for p in label_prefixes] or [None] * len(prefixes)
        rewards = [IndexedDataset(p) for p in reward_prefixes] or [None] * len(prefixes)
        parts = [GPTDataset(ds, np.arange(len(ds), dtype=np.int32), n, seq_length, seed, f"{name}_{i}", cache_dir,
                            lab, rew, pack_impl)
                 for i, (ds, lab, rew, n) in enumerate(zip((IndexedDataset(p) for p in prefixes), labels, rewards,
                                                           samples_per_dataset(weights, wanted)))]
        out.append(BlendedDataset(parts, weights))
    return out


class GlobalBatches:
    """Step n's global batch as rows [n*B, (n+1)*B) of a dataset: a pure function of the step.

    Rows are ordered microstep-major, then data-parallel rank, then the rank's micro batch, as GPT-NeoX's
    DistributedBatchSampler deals them; `rows(n, lo, hi)` gives just the rows one process feeds.
    """

    def __init__(self, dataset, grad_accum_steps: int, micro_batch_size: int, data_parallel: int):
        self.dataset = dataset
        self.accum, self.micro, self.dp = grad_accum_steps, micro_batch_size, data_parallel
        self.per_microstep = micro_batch_size * data_parallel
        self.pairs = getattr(dataset, "pairs", False)  # DPO: each sample a pair, two rows (chosen, rejected)
        self.rows_per_microstep = self.per_microstep * (2 if self.pairs else 1)

    @property
    def global_batch_size(self) -> int:
        return self.accum * self.per_microstep

    def index(self, step: int, microstep: int, row: int) -> int:
        """The dataset index of a row of a step's batch."""
        return step * self.global_batch_size + microstep * self.per_microstep + row

    def source(self, step: int, microstep: int, row: int) -> str:
        return self.dataset.source(self.index(step, microstep, row // (2 if self.pairs else 1)))

    def batch(self, step: int, lo: int = 0, hi: int | None = None) -> dict[str, np.ndarray]:
        """{"tokens": [accum, hi - lo, seq + 1] int32} (and "labels", "rewards" alike where the dataset has them):
        microstep k holds rows lo..hi of that microstep. Pairs give two rows each, chosen then rejected."""
        f = 2 if self.pairs else 1
        hi = self.rows_per_microstep if hi is None else hi
        rows = np.stack([np.stack([self.dataset[self.index(step, k, j)] for j in range(lo // f, hi // f)])
                         for k in range(self.accum)]).astype(np.int32)
        if self.pairs:  # [accum, pairs, side, field, t] -> [accum, rows, field, t]
            rows = rows.reshape(rows.shape[0], -1, *rows.shape[3:])
        return {"tokens": rows} if rows.ndim == 3 else {name: rows[:, :, k] for k, name in
                                                         enumerate(self.dataset.fields)}
