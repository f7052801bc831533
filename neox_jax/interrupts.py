"""SIGINT and SIGTERM at any moment, for the CLI (`install()`; library callers keep Python's own handling).

Until a command has something to save, a signal ends it at once with one line and status 128 + the signal
(130 for SIGINT, 143 for SIGTERM), also inside an XLA compile, where the main thread is in C++ (it polls
Python's signal handlers there, and one that raises makes it hold the interpreter until the compile ends, so
none here raises): a watcher thread, woken through `signal.set_wakeup_fd`, removes the partial outputs being
written (neox_jax/atomic.py: every output is written under a temporary name and renamed when complete) and
ends the process by `os._exit`, so no interpreter teardown races XLA's threads.

Inside `deferred(handler)` (the training loop) the first signal is the handler's (it finishes the step,
saves and stops) and a second one ends the process at once; Orbax's temporary folder is not a checkpoint, so
the last complete one stays the latest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from neox_jax import atomic

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_lock = threading.Lock()
_installed = False
_handler: Callable[[int], None] | None = None
_repeat = False  # the handler takes every signal, not only the first
_handled = 0  # signals the current handler has taken
_command = "neox-jax"  # how the line names the command


def install(command: str = "neox-jax"):
    """Take SIGINT and SIGTERM for the rest of the process (main thread only; once)."""
    global _installed, _command
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    _command = command
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    for sig in SIGNALS:
        signal.signal(sig, _ignore)
    threading.Thread(target=_watch, args=(read,), daemon=True, name="neox-jax-signals").start()
    _installed = True


def take_back():
    """Point SIGINT and SIGTERM at this module again: JAX's distributed runtime installs its own SIGTERM handler
    (a preemption notifier) when a multi-process backend starts, and ours would never hear of it."""
    if _installed:
        for sig in SIGNALS:
            signal.signal(sig, _ignore)


def _ignore(_signum, _frame):  # the watcher acts; Python raises nothing in the main thread
    pass


def _watch(fd: int):
    global _handled
    while True:
        signum = os.read(fd, 1)[0]
        if signum not in SIGNALS:
            continue
        with _lock:
            second = _handler is not None and not _repeat and _handled > 0
            handler = None if second else _handler
            _handled += handler is not None
        if handler is None:
            end(signum, "a second signal: stopped without saving the step in flight" if second else "")
        handler(signum)


def end(signum: int, detail: str = ""):
    """Remove partial outputs, print one line and end the process with status 128 + signum (from any thread)."""
    with _lock:  # held until the process is gone: a second caller never prints
        atomic.discard_partial()
        sys.stdout.flush()
        print(f"\n{_command}: stopped by {signal.Signals(signum).name}" + (f"; {detail}" if detail else ""),
              file=sys.stderr, flush=True)
        os._exit(128 + signum)


@contextlib.contextmanager
def deferred(handler: Callable[[int], None], repeat: bool = False) -> Iterator[None]:
    """Within the block the first signal (every one with `repeat`) calls `handler(signum)` instead of ending the
    process. Without `install()` the block sets Python handlers that call it, as a library caller expects."""
    global _handler, _repeat, _handled
    if not _installed:
        previous = {}
        for sig in SIGNALS:
            try:
                previous[sig] = signal.signal(sig, lambda s, _f: handler(s))
            except ValueError:  # not the main thread: the caller handles signals
                pass
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
        return
    take_back()
    with _lock:
        outer = _handler, _repeat, _handled
        _handler, _repeat, _handled = handler, repeat, 0
    try:
        yield
    finally:
        with _lock:
            _handler, _repeat, _handled = outer
