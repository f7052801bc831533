"""The embedded default corpus: Python's own standard library source, on every machine with Python.

Real code, where NeoX's whitespace tokens matter, available offline. `build_corpus` writes
`corpus.jsonl` (one file per document), trains a NeoX-style tokenizer on it, and preprocesses it into
`stdlib_text_document.bin/.idx` with an end-of-document token after each file.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

from neox_jax.atomic import atomic_path
from neox_jax.data.preprocess import preprocess
from neox_jax.data.tokenizer import train_tokenizer


def stdlib_sources(max_bytes: int) -> list[tuple[str, str]]:
    """(relative path, text) of standard-library .py files in sorted order, up to `max_bytes` of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "test" in rel.parts[0]:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        out.append((str(rel), text))
        total += len(text.encode())
        if total >= max_bytes:
            break
    return out


def build_corpus(out_dir: str | os.PathLike, max_mb: float = 4.0, vocab_size: int = 4096,
                 workers: int = 1) -> Path:
    """Write the corpus, its tokenizer and its .bin/.idx under `out_dir`; returns the data prefix."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = stdlib_sources(int(max_mb * 1e6))
    jsonl = out / "corpus.jsonl"
    with atomic_path(jsonl) as tmp, open(tmp, "w") as f:
        for rel, text in sources:
            f.write(json.dumps({"text": text, "path": rel}) + "\n")
    print(f"corpus: {len(sources)} standard-library files, {jsonl.stat().st_size / 1e6:.1f} MB -> {jsonl}")
    tokenizer = train_tokenizer((text for _, text in sources), vocab_size, out / "tokenizer.json")
    print(f"tokenizer: NeoX-style byte-level BPE, {vocab_size} tokens -> {tokenizer}")
    summary = preprocess([jsonl], tokenizer, str(out / "stdlib"), append_eod=True, workers=workers)
    print(summary)
    return out / "stdlib_text_document"
