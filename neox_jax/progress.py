"""Progress bars for long work (conversion, preprocessing, training): tqdm on stderr.

On a terminal the bar redraws in place ten times a second at most; written to a file or a CI log it prints
one plain line every 30 seconds (and a last one at the end) instead of carriage-return redraws.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_INTERVAL_S = 30.0


class _Lines:
    """A stream wrapper that turns tqdm's in-place redraws into one line each (for logs)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str):
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def bar(desc: str, total: int | None = None, enabled: bool = True, stream=None, unit: str = "it") -> tqdm:
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, file=stream if tty else _Lines(stream), unit=unit,
                unit_scale=unit == "B", mininterval=0.1 if tty else LOG_INTERVAL_S, dynamic_ncols=tty, ascii=not tty)


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True,
             stream=None, stats: Callable[[float], str] | None = None) -> Iterator[T]:
    """Yield from `items` with a bar; `stats(elapsed_seconds)` adds the caller's figures (rates, say)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with bar(desc, total, enabled, stream) as b:
        for item in items:
            yield item
            if stats:
                b.set_postfix_str(stats(b.format_dict["elapsed"]), refresh=False)
            b.update(1)
