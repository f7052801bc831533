"""GPT-NeoX / Megatron MMIDIDX `.bin` + `.idx`, read memory-mapped and written byte for byte.

`.idx`, little endian: b"MMIDIDX\\x00\\x00", version u64 (1), dtype code u8, len(sizes) u64, len(doc_idx) u64,
then sizes int32[n], pointers int64[n] (byte offsets into .bin), doc_idx int64[d]. `.bin` is the tokens.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from neox_jax.atomic import temp_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64,
          8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
HEADER = len(MAGIC) + 8 + 1 + 8 + 8


def token_dtype(vocab_size: int) -> np.dtype:
    """GPT-NeoX's rule: uint16 while the vocabulary fits (below 65500), int32 otherwise."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDataset:
    """Read-only view of `prefix.bin` / `prefix.idx`; item i is a numpy view of its tokens."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        bin_path, idx_path = paths(prefix)
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found (a dataset is given by its prefix, without .bin/.idx)")
        with open(idx_path, "rb") as f:
            head = f.read(HEADER)
        if len(head) < HEADER or head[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{idx_path} is not an MMIDIDX index (bad magic); "
                             "only GPT-NeoX/Megatron's mmap format is supported")
        version, code, n, d = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION or code not in DTYPES:
            raise ValueError(f"{idx_path}: version {version}, dtype code {code} not supported")
        self.dtype = np.dtype(DTYPES[code])
        expected = HEADER + n * 4 + n * 8 + d * 8
        if idx_path.stat().st_size != expected:
            raise ValueError(f"{idx_path} is {idx_path.stat().st_size} bytes, its header promises {expected}: "
                             "the file is truncated or corrupt")
        idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(idx, np.int32, n, HEADER)
        self.pointers = np.frombuffer(idx, np.int64, n, HEADER + n * 4)
        self.doc_idx = np.frombuffer(idx, np.int64, d, HEADER + n * 12)
        total = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        if bin_path.stat().st_size != total:
            raise ValueError(f"{bin_path} is {bin_path.stat().st_size} bytes, the index describes {total}")
        self.tokens = np.memmap(bin_path, mode="r", dtype=self.dtype) if total else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sizes[i]) - offset if length is None else length
        return self.tokens[start:start + n]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)


class IndexedDatasetWriter:
    """Append documents, then `finalize()`; writes `prefix.bin`/`.idx` under temporary names first and
    renames them only when both are complete."""

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        self.bin_path, self.idx_path = paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin, self._tmp_idx = temp_path(self.bin_path), temp_path(self.idx_path)
        self._bin = open(self._tmp_bin, "wb")
        self.sizes: list[int] = []
        self.doc_idx: list[int] = [0]
        self.num_tokens = 0

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < np.iinfo(self.dtype).min or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids {arr.min()}..{arr.max()} do not fit {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self.sizes.append(arr.size)
        self.doc_idx.append(len(self.sizes))
        self.num_tokens += arr.size

    def finalize(self) -> None:
        self._bin.close()
        sizes = np.asarray(self.sizes, np.int32)
        pointers = np.zeros(len(sizes), np.int64)
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<QBQQ", VERSION, CODES[self.dtype], len(sizes), len(self.doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self.doc_idx, np.int64).tobytes(order="C"))
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        """Drop the partial files; the final names are never touched."""
        self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            p.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.finalize() if exc_type is None else self.abort()
