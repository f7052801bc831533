"""A small progress bar for long work (conversion, preprocessing, training) on stderr."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True,
             stream=None, stats: Callable[[float], str] | None = None) -> Iterator[T]:
    """Yield from `items`, redrawing `desc [####    ] i/total elapsed` in place on a terminal.

    `stats(elapsed_seconds)` adds a caller's figures (rates, say) to the line. Off a terminal (logs, CI) it
    prints a line at every 10% (every 10 seconds without a total) instead of redrawing.
    """
    if not enabled:
        yield from items
        return
    stream = stream or sys.stderr
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0
    tty = stream.isatty()
    start = time.perf_counter()
    i = 0

    def draw(end=""):
        elapsed = time.perf_counter() - start
        if total:
            filled = int(30 * i / total)
            bar = f"[{'#' * filled}{' ' * (30 - filled)}] {i}/{total}"
        else:
            bar = f"{i}"
        extra = f" {stats(elapsed)}" if stats else ""
        line = f"{desc} {bar} {elapsed:.1f}s{extra}"
        stream.write(f"\r{line}\033[K{end}" if tty else f"{line}\n")
        stream.flush()

    last_mark, last_drawn, last_time = None, -1, -1.0
    for item in items:
        yield item
        i += 1
        now = time.perf_counter() - start
        mark = 10 * i // total if total else int(now) // 10
        if (tty and now - last_time >= 0.1) or (not tty and mark != last_mark):
            draw()
            last_mark, last_drawn, last_time = mark, i, now
    if tty:
        draw("\n")
    elif last_drawn != i:
        draw()
