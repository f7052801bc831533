"""jsonl / jsonl.zst / txt -> GPT-NeoX `{prefix}_{key}_document.bin/.idx`, in parallel, losing nothing.

Each jsonl line is a document (its `--jsonl-keys` fields); each .txt file is one document, as GPT-NeoX's
lm_dataformat reader has it. A record that cannot be used (invalid JSON or UTF-8, a missing key, empty
text) is reported with its file and line, counted, and listed in `{prefix}_rejects.tsv`; `--strict` stops at
the first. Outputs are written under temporary names and renamed only when the run completes.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from neox_jax.atomic import temp_path
from neox_jax.data.dataset import remove_index_maps
from neox_jax.data.indexed import IndexedDatasetWriter, token_dtype
from neox_jax.data.tokenizer import PIECE_CHARS, NeoXTokenizer
from neox_jax.errors import BadRecordError
from neox_jax.progress import progress

CHUNK_RECORDS = 256  # records per task sent to a worker


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    bytes_in: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = lambda n: n / self.seconds if self.seconds else 0.0  # noqa: E731
        lines = [f"{self.documents:,} documents, {self.tokens:,} tokens from {self.bytes_in / 1e6:.1f} MB in "
                 f"{self.seconds:.1f}s ({rate(self.documents):,.0f} docs/s, {rate(self.tokens):,.0f} tokens/s, "
                 f"{rate(self.bytes_in) / 1e6:.1f} MB/s)"]
        total_bad = sum(self.rejected.values())
        lines.append(f"{total_bad} records rejected" + (": " + ", ".join(
            f"{n} {reason}" for reason, n in sorted(self.rejected.items())) if total_bad else ""))
        lines += [f"wrote {p}" for p in self.outputs]
        return "\n".join(lines)


def _open_lines(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        with open(path, "rb") as raw:
            yield from io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    else:
        with open(path, "rb") as f:
            yield from f


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) per document: each line of .jsonl[.zst], or a whole .txt file as line 1."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input {p} does not exist")
    if p.suffix == ".txt":
        yield 1, p.read_bytes()
        return
    if not (p.name.endswith(".jsonl") or p.name.endswith(".jsonl.zst") or p.name.endswith(".json")):
        raise ValueError(f"input {p}: expected .jsonl, .jsonl.zst or .txt")
    for number, line in enumerate(_open_lines(p), start=1):
        if line.strip():
            yield number, line


def parse_record(raw: bytes, is_text: bool, keys: Sequence[str]) -> list[str]:
    """The texts of one record, or BadRecordError saying why it cannot be used."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(f"invalid UTF-8 at byte {e.start}") from None
    if is_text:
        texts = [text]
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecordError(f"invalid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise BadRecordError(f"expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise BadRecordError(f"missing key {missing[0]!r}")
        texts = [obj[k] for k in keys]
        wrong = next((k for k in keys if not isinstance(obj[k], str)), None)
        if wrong is not None:
            raise BadRecordError(f"key {wrong!r} is not a string: {type(obj[wrong]).__name__}")
    if any(not t for t in texts):
        raise BadRecordError("empty text")
    return texts


def record_texts(paths: Sequence[str | os.PathLike], keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Every text of every record, for a reader that needs them all (eval, train-tokenizer): the first bad
    record stops it, named by file and line."""
    for path in paths:
        for line, raw in read_records(path):
            try:
                yield from parse_record(raw, str(path).endswith(".txt"), keys)
            except BadRecordError as e:
                raise BadRecordError(f"{path}:{line}: {e}: fix or remove that record") from None


# ---- workers -------------------------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(tokenizer_path: str, keys: Sequence[str], append_eod: bool, single_thread: bool = False):
    if single_thread:  # one tokenizer thread per worker process: N workers use N cores, not N x cores
        os.environ["RAYON_NUM_THREADS"] = "1"
    _worker["tok"] = NeoXTokenizer(tokenizer_path)
    _worker["keys"], _worker["eod"] = list(keys), append_eod


def _encode_chunk(chunk: list[tuple[str, int, bytes]]):
    """-> per record: (file, line, None, reason) or (file, line, [token arrays per key], None)."""
    tok, keys, eod = _worker["tok"], _worker["keys"], _worker["eod"]
    out, good, texts = [], [], []
    for file, line, raw in chunk:
        try:
            t = parse_record(raw, file.endswith(".txt"), keys)
        except BadRecordError as e:
            out.append((file, line, None, str(e), len(raw)))
            continue
        good.append(len(out))
        out.append((file, line, None, None, len(raw)))
        texts.extend(t)
    dtype = token_dtype(tok.vocab_size)
    short = [t for t in texts if len(t) <= PIECE_CHARS]  # batched; a long one alone, piece by piece
    batched = iter(tok.encode_batch(short) if short else [])
    ids = [np.asarray(next(batched), dtype) if len(t) <= PIECE_CHARS else tok.encode_array(t, dtype) for t in texts]
    del texts, short
    for j, i in enumerate(good):
        arrays = [np.append(x, np.asarray(tok.eod_id, dtype)) if eod else x
                  for x in ids[j * len(keys):(j + 1) * len(keys)]]
        file, line, _, _, n = out[i]
        out[i] = (file, line, arrays, None, n)
    return out


def _chunks(inputs: Sequence[str]) -> Iterator[list[tuple[str, int, bytes]]]:
    chunk = []
    for path in inputs:
        for line, raw in read_records(path):
            chunk.append((str(path), line, raw))
            if len(chunk) == CHUNK_RECORDS:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def preprocess(inputs: Sequence[str | os.PathLike], tokenizer: str | os.PathLike, output_prefix: str,
               jsonl_keys: Sequence[str] = ("text",), append_eod: bool = False, workers: int = 1,
               strict: bool = False, show_progress: bool = True, log=None) -> Summary:
    log = log or sys.stderr  # looked up at call time, so a caller's redirection applies
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} (--workers): a whole number of processes, at least 1")
    inputs = [str(p) for p in inputs]
    for p in inputs:
        if not Path(p).is_file():
            raise FileNotFoundError(f"input {p} does not exist")
    tok = NeoXTokenizer(tokenizer)  # fail early on a bad tokenizer path
    dtype = token_dtype(tok.vocab_size)
    writers = {k: IndexedDatasetWriter(f"{output_prefix}_{k}_document", dtype) for k in jsonl_keys}
    rejects_path = Path(f"{output_prefix}_rejects.tsv")
    rejects_tmp = temp_path(rejects_path)
    summary = Summary()
    start = time.perf_counter()
    args = (str(tok.path), list(jsonl_keys), append_eod)
    pool = None
    try:
        if workers > 1:
            # spawn, not fork: the parent may hold threads (tokenizers, JAX) that fork would copy half-alive
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (*args, True))
            results = pool.imap(_encode_chunk, _chunks(inputs), chunksize=2)
        else:
            _init_worker(*args)
            results = map(_encode_chunk, _chunks(inputs))

        def stats(elapsed):
            e = max(elapsed, 1e-9)
            return (f"{summary.documents:,} docs {summary.documents / e:,.0f}/s  "
                    f"{summary.tokens / e:,.0f} tokens/s  {summary.bytes_in / e / 1e6:.1f} MB/s"
                    + (f"  {sum(summary.rejected.values())} rejected" if summary.rejected else ""))

        with open(rejects_tmp, "w") as rejects:
            rejects.write("file\tline\treason\n")
            for chunk in progress(results, "preprocessing chunks", enabled=show_progress, stats=stats, stream=log):
                for file, line, arrays, reason, nbytes in chunk:
                    summary.bytes_in += nbytes
                    if reason is not None:
                        if strict:
                            raise BadRecordError(f"{file}:{line}: {reason} (--strict stops at the first bad record)")
                        kind = reason.split(":")[0].split(" at ")[0]  # "invalid JSON: ..." -> "invalid JSON"
                        summary.rejected[kind] = summary.rejected.get(kind, 0) + 1
                        rejects.write(f"{file}\t{line}\t{reason}\n")
                        if sum(summary.rejected.values()) <= 20:
                            print(f"\nrejected {file}:{line}: {reason}", file=log)
                        continue
                    for key, arr in zip(jsonl_keys, arrays):
                        writers[key].add_document(arr)
                    summary.documents += 1
                    summary.tokens += sum(a.size for a in arrays)
        if not summary.documents:
            rejected = sum(summary.rejected.values())
            if rejected:
                os.replace(rejects_tmp, rejects_path)
            raise BadRecordError(f"no usable document in {', '.join(inputs)}: " + (
                f"all {rejected} records were rejected (reasons in {rejects_path})" if rejected else "no records"))
    except BaseException:
        for w in writers.values():
            w.abort()
        rejects_tmp.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    for key, w in writers.items():
        w.finalize()
        summary.outputs += [str(w.bin_path), str(w.idx_path)]
        remove_index_maps(f"{output_prefix}_{key}_document")  # maps of the data this replaced
    if summary.rejected:
        os.replace(rejects_tmp, rejects_path)
        summary.outputs.append(str(rejects_path))
    else:
        rejects_tmp.unlink()
    summary.seconds = time.perf_counter() - start
    return summary
