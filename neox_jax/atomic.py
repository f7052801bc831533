"""Files that appear whole or not at all: written under a temporary name beside their final one (same folder,
so the rename cannot cross filesystems) and renamed into place only once complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator


_partial: set[Path] = set()  # temporary files and folders this process has named: gone once it ends early


def partial(path: str | os.PathLike) -> Path:
    """Note a temporary file or folder this process writes, for `discard_partial()`."""
    path = Path(path).absolute()
    _partial.add(path)
    return path


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name `path` is written under (hidden, and unique to this process)."""
    path = Path(path)
    return partial(path.with_name(f".{path.name}.tmp{os.getpid()}"))


def discard_partial():
    """Remove every temporary file or folder still there (a process ending on a signal calls this)."""
    for path in _partial:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes `path` when the block succeeds and is removed when it fails."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")
