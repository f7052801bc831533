"""A small progress bar for long work (conversion, preprocessing, training) on stderr."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True,
             stream=None) -> Iterator[T]:
    """Yield from `items`, redrawing `desc [####    ] i/total elapsed` in place on a terminal.

    Off a terminal (logs, CI) it prints a line at every 10% instead of redrawing.
    """
    if not enabled:
        yield from items
        return
    stream = stream or sys.stderr
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0
    tty = stream.isatty()
    start, last_decile = time.perf_counter(), -1
    i = 0

    def draw(end=""):
        elapsed = time.perf_counter() - start
        if total:
            filled = int(30 * i / total)
            bar = f"[{'#' * filled}{' ' * (30 - filled)}] {i}/{total}"
        else:
            bar = f"{i}"
        stream.write(f"\r{desc} {bar} {elapsed:.1f}s{end}" if tty else f"{desc} {bar} {elapsed:.1f}s\n")
        stream.flush()

    for item in items:
        yield item
        i += 1
        decile = 10 * i // total if total else i
        if tty or decile != last_decile:
            draw()
            last_decile = decile
    if tty:
        draw("\n")
