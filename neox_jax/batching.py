"""Continuous batching, serving's engine: a fixed number of KV-cache slots, each row at its own position, sequences
joining and leaving between decode steps.

The device programs (slots.py) are compiled per shape bucket and warmed up before traffic. The positions the cache
holds are a bucket (the chunk size doubled up to the context), grown and shrunk one bucket at a time with the longest
sequence, so that a step reads all of it as it lies (generation.py's spans). A decode step runs the first 1, 2, 4,
... slots that hold every decoding row (new sequences take the lowest free slots). A prompt is prefilled once, into
its slot, in chunks under a per-step budget (a long prompt spread over several steps, so decoding rows are not
stalled for long); a request's n choices are copies of that slot.

`Engine` runs the loop in a thread: drop cancelled sequences, admit waiting requests to free slots, prefill chunks,
dispatch a decode step and, while the device runs it, hand the previous step's tokens to their requests (one step in
flight; JAX dispatches asynchronously). Requests see their tokens through a callback.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from neox_jax import sharding as shd
from neox_jax import slots as programs
from neox_jax.generation import Sampling, weight_copies
from neox_jax.model import GPTNeoX, cache_length, require_lm_head

_COMPILES = [0]  # XLA compilations in this process: serving must not compile under traffic


def _count_compiles(event: str, *_, **__):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)

class QueueFull(Exception):
    """The engine's queue of waiting requests is full (a server answers 503)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt's generation: `n` choices of up to `max_tokens` each. `on_event` is called from the engine's
    thread with ("prompt", logprobs [len(prompt)] (the first None), top [(ids, logprobs)]) once prefilled when
    `prompt_logprobs`; ("token", choice, id, logprob, top) per token (with `logprobs`: its log-probability and the
    slots.TOP_LOGPROBS most likely (ids, logprobs); else None, None); ("done", choice, reason) with reason "stop" (a
    stop id, not sent), "length" or "cancelled"; ("error", message) if the engine failed."""

    prompt: list[int]
    max_tokens: int
    on_event: Callable
    sampling: Sampling = Sampling()
    n: int = 1
    stop_ids: tuple[int, ...] = ()
    logprobs: bool = False
    prompt_logprobs: bool = False
    cancelled: bool = False
    finished: set = dataclasses.field(default_factory=set)  # choices the engine is done with (or told to drop)
    stopping: set = dataclasses.field(default_factory=set)  # choices the caller has finished (a stop string)

    def cancel(self):
        """Drop every choice (the client went away); their slots are freed before the next step."""
        self.cancelled = True

    def stop(self, choice: int):
        """Drop one choice (the caller found a stop string in its text)."""
        self.stopping.add(choice)


@dataclasses.dataclass(eq=False)
class _Row:  # a slot's occupant
    request: Request
    choice: int
    count: int = 0  # tokens drawn
    decoding: bool = False


def length_buckets(chunk: int, max_context: int) -> tuple[int, ...]:
    """The cache lengths programs are compiled for: the chunk size doubled, up to the context."""
    out = [min(chunk, max_context)]
    while out[-1] < max_context:
        out.append(min(2 * out[-1], max_context))
    return tuple(out)


def row_buckets(slots: int) -> tuple[int, ...]:
    """The row counts decode steps are compiled for: powers of two below `slots`, and `slots` (a step computes the
    first bucket's worth of slots that holds every decoding row; new sequences take the lowest free slots)."""
    out = [1]
    while out[-1] < slots:
        out.append(min(2 * out[-1], slots))
    return tuple(out)


def chunk_sizes(chunk: int) -> tuple[int, ...]:
    """Prefill chunk sizes: `chunk`, and a half and a quarter of it for short prompts and long ones' tails (a prompt
    padded to a chunk twice its length costs twice the compute)."""
    return (chunk // 4, chunk // 2, chunk) if chunk >= 32 else (chunk,)


def split_prompt(length: int, chunk: int) -> list[tuple[int, int]]:
    """(start, size) of the chunks a prompt of `length` tokens is prefilled in: whole chunks, then the smallest
    size that holds the rest."""
    out, start = [], 0
    while start < length:
        size = next(n for n in chunk_sizes(chunk) + (chunk,) if n >= min(length - start, chunk))
        out.append((start, size))
        start += size
    return out


class Engine:
    """Continuous batching over `slots` KV-cache rows of up to `max_context` positions for one model. `submit`
    queues a `Request` (QueueFull past `max_queue` waiting); `start` runs the loop in a thread; `close` drains. Each
    step prefills prompt chunks of `chunk` tokens (or a half or a quarter) up to `prefill_budget` tokens (default
    4 chunks), then decodes every decoding row once (the first `row_buckets` slots that hold them all)."""

    def __init__(self, model: GPTNeoX, slots: int = 8, max_context: int | None = None, chunk: int = 64,
                 max_queue: int = 64, prefill_budget: int | None = None, copies: bool | None = None):
        require_lm_head(model.config)
        cfg = model.config
        max_context = max_context or cfg.max_position_embeddings
        problems = []
        if slots < 1:
            problems.append(f"max_batch={slots}: must be at least 1")
        if chunk < 1 or (chunk >= 32 and chunk % 4):
            problems.append(f"prefill_chunk={chunk}: must be at least 1 (and a multiple of 4 from 32)")
        if not 0 < max_context <= cfg.max_position_embeddings:
            problems.append(f"max_context={max_context}: must be in 1 .. the model's max_position_embeddings="
                            f"{cfg.max_position_embeddings}")
        elif chunk >= 1 and max_context % chunk:
            problems.append(f"max_context={max_context} is not a multiple of prefill_chunk={chunk}")
        if max_queue < 0:
            problems.append(f"max_queue={max_queue}: must be >= 0")
        if prefill_budget is not None and prefill_budget < 1:
            problems.append(f"prefill_budget={prefill_budget}: must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))
        self.config, self.slots, self.max_context, self.chunk = cfg, slots, max_context, chunk
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget or 4 * chunk
        self.lengths = length_buckets(chunk, max_context)
        self.graphdef, self.params = nnx.split(model)
        leaf = jax.tree.leaves(self.params)[0]
        mesh = leaf.sharding.mesh if isinstance(getattr(leaf, "sharding", None), NamedSharding) else None
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        if copies is None:  # generation.Generator's measured choice: on one CPU device, fused per-layer copies
            copies = jax.default_backend() == "cpu" and self.mesh is None and jax.process_count() == 1
        self.copies = weight_copies(model, output_kernel=slots > 1) if copies else None
        self.state = self._place(programs.init_state(self.graphdef, self.params, slots, self.lengths[0],
                                                     self.copies is not None))
        self.rows: list[_Row | None] = [None] * slots
        self.pos = np.zeros(slots, np.int32)  # where each row's next token is written
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: collections.deque = collections.deque()  # (request, slots, chunks left, scores)
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closing = self.thread_stop = False
        self.stats = collections.Counter()  # prefilled_tokens, generated_tokens, steps, resizes, compilations
        self.compiled = _COMPILES[0]
        self.recent: collections.deque = collections.deque(maxlen=4096)  # (time, tokens) of the latest steps
        self.error: BaseException | None = None

    # ---- placing and programs -----------------------------------------------------------------------
    def _place(self, state):
        if self.mesh is None:
            return state
        axes = ("layers", "batch", "heads", "length", "head_dim")  # model.init_cache's
        spec = shd._trim(shd.logical_to_spec(axes), dict(self.mesh.shape))
        return {"cache": jax.device_put(state["cache"], NamedSharding(self.mesh, spec)),
                "logits": jax.device_put(state["logits"], NamedSharding(self.mesh, jax.sharding.PartitionSpec()))}

    @property
    def length(self) -> int:
        return cache_length(self.state["cache"])

    def _resize_to(self, need: int):
        """Grow (or shrink) the cache a bucket at a time to the smallest bucket holding `need` positions."""
        target = next(n for n in self.lengths if n >= need)
        while self.length != target:
            i = self.lengths.index(self.length)
            self.state = programs.resize(self.state, self.lengths[i + 1 if target > self.length else i - 1])
            self.stats["resizes"] += 1

    def _prefill_chunk(self, slot: int, prompt: list[int], start: int, size: int, scores: bool):
        def padded(tokens):
            ids = np.zeros(size, np.int32)
            ids[:len(tokens)] = tokens
            return ids

        part = prompt[start:start + size]
        following = padded(prompt[start + 1:start + size + 1]) if scores else None  # what each position predicts
        self._resize_to(max(start + size, self.length))
        self.state, out = programs.prefill(self.graphdef, self.params, self.copies, self.state, np.int32(slot),
                                           padded(part), np.int32(start), np.int32(len(part) - 1), scores, following)
        self.stats["prefilled_tokens"] += len(part)
        return out

    def _rows_args(self, decoding: list[int], b: int):
        rows = {"pos": np.full(b, self.length, np.int32), "seed": np.zeros(b, np.uint32),
                "count": np.zeros(b, np.int32), "temperature": np.zeros(b, np.float32), "top_k": np.zeros(b, np.int32),
                "top_p": np.zeros(b, np.float32), "logprobs": np.zeros(b, bool)}
        for s in decoding:
            row = self.rows[s]
            sampling = row.request.sampling
            rows["pos"][s], rows["count"][s] = self.pos[s], row.count
            rows["seed"][s] = (sampling.seed + row.choice) % 2**32  # choice j draws as row j of generate(seed)
            rows["temperature"][s], rows["top_k"][s], rows["top_p"][s] = (sampling.temperature, sampling.top_k,
                                                                          sampling.top_p)
            rows["logprobs"][s] = row.request.logprobs
        return rows

    def warmup(self) -> int:
        """Compile every program traffic can need (for each cache length: each prefill chunk size with and without
        echo scores, a fork, a decode step of each row bucket): none compiles under load. Run before `start`; returns
        the number of compilations."""
        assert self.thread is None, "warm up before start"
        before = _COMPILES[0]
        for length in self.lengths:
            self._resize_to(length)
            for size in chunk_sizes(self.chunk):
                if size <= length:
                    for scores in (False, True):
                        self._prefill_chunk(0, [0], length - size, size, scores)
            if self.slots > 1:
                self.state = programs.fork(self.state, np.int32(0), np.int32(1), self.config.num_heads)
            for rows in row_buckets(self.slots):
                self.state, out = programs.decode(self.graphdef, self.params, self.copies, self.state,
                                                  self._rows_args([], rows))
        self._resize_to(1)
        jax.block_until_ready(self.state)
        self.stats.clear()
        self.compiled = _COMPILES[0]
        return self.compiled - before

    @property
    def compilations(self) -> int:
        """XLA compilations in this process since warm-up (or since the engine was made)."""
        return _COMPILES[0] - self.compiled

    def tokens_per_second(self, window: float = 10.0) -> float:
        cutoff = time.monotonic() - window
        return sum(n for t, n in list(self.recent) if t >= cutoff) / window

    # ---- requests -------------------------------------------------------------------------------------
    def check(self, request: Request):
        """ValueError naming what the engine cannot run (the server checks first, with its own caps)."""
        problems = []
        if not request.prompt:
            problems.append("the prompt is empty")
        elif len(request.prompt) + request.max_tokens > self.max_context:
            problems.append(f"prompt of {len(request.prompt)} tokens + max_tokens={request.max_tokens} exceeds the "
                            f"context of {self.max_context} tokens")
        if request.max_tokens < 0:
            problems.append(f"max_tokens={request.max_tokens}: must be >= 0")
        if request.max_tokens == 0 and not request.prompt_logprobs:
            problems.append("max_tokens=0 only scores a prompt (with echo and logprobs)")
        if not 1 <= request.n <= self.slots:
            problems.append(f"n={request.n}: must be in 1 .. {self.slots} (the server's --max-batch)")
        bad = [t for t in request.prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            problems.append(f"token id {bad[0]} is outside the vocabulary (0 .. {self.config.vocab_size - 1})")
        if problems:
            raise ValueError("; ".join(problems))

    def submit(self, request: Request):
        self.check(request)
        with self.lock:
            if self.closing or self.error is not None:
                raise QueueFull("the server is shutting down" if self.closing else f"the engine stopped: {self.error}")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue holds --max-queue="
                                f"{self.max_queue})")
            self.waiting.append(request)
            self.lock.notify()

    @property
    def active(self) -> int:
        return sum(row is not None for row in self.rows)

    def idle(self) -> bool:
        return not self.waiting and self.active == 0

    def start(self):
        self.thread = threading.Thread(target=self._run, name="neox-jax-engine", daemon=True)
        self.thread.start()

    def close(self, timeout: float | None = None) -> bool:
        """Stop admitting, let the running and waiting requests finish for up to `timeout` seconds (None: until
        they do), then cancel what is left and stop the loop. True when nothing had to be cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self.closing = True
            while not self.idle() and self.error is None and (deadline is None or time.monotonic() < deadline):
                self.lock.wait(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))
            drained = self.idle()
            for request in list(self.waiting) + [row.request for row in self.rows if row is not None]:
                request.cancel()
            self.thread_stop = True  # the loop frees the cancelled requests' slots, then returns
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()
        return drained

    # ---- the loop -------------------------------------------------------------------------------------
    def _run(self):
        in_flight = None
        try:
            while True:
                with self.lock:
                    while not (self.waiting or self.active or in_flight or self.thread_stop):
                        self.lock.wait()
                    if self.thread_stop and not in_flight and not self.active and not self.waiting:
                        return
                self._reap()
                self._admit()
                self._prefill()
                step = self._dispatch()
                if in_flight is not None:
                    self._deliver(*in_flight)
                in_flight = step
                self._shrink()
                with self.lock:
                    self.lock.notify_all()  # close() waits on the queue draining
        except BaseException as e:  # a device error: every request is told, the server reports unhealthy
            self.error = e
            for request in list(self.waiting) + [row.request for row in self.rows if row is not None] + \
                    [p[0] for p in self.prefilling]:
                request.on_event(("error", f"{type(e).__name__}: {e}"))
            with self.lock:
                self.lock.notify_all()
            raise

    def _free(self, slot: int, reason: str | None):
        row = self.rows[slot]
        self.rows[slot] = None
        if row is not None and row.choice not in row.request.finished:
            row.request.finished.add(row.choice)
            if reason is not None:
                row.request.on_event(("done", row.choice, reason))

    def _reap(self):
        """Free the slots of cancelled requests and stopped choices."""
        for s, row in enumerate(self.rows):
            if row is not None and (row.request.cancelled or row.choice in row.request.stopping):
                self._free(s, "cancelled" if row.request.cancelled else None)
        with self.lock:
            gone = [r for r in self.waiting if r.cancelled]
            for request in gone:
                self.waiting.remove(request)
        for request in gone:
            for choice in range(request.n):
                request.finished.add(choice)
                request.on_event(("done", choice, "cancelled"))
        for entry in [p for p in self.prefilling if p[0].cancelled]:
            self.prefilling.remove(entry)

    def _admit(self):
        """Waiting requests, oldest first, into free slots (all of a request's choices at once)."""
        while True:
            with self.lock:
                free = [s for s, row in enumerate(self.rows) if row is None]
                if not self.waiting or len(free) < self.waiting[0].n:
                    return
                request = self.waiting.popleft()
            slots = free[:request.n]
            for choice, s in enumerate(slots):
                self.rows[s] = _Row(request, choice)
            self.prefilling.append((request, slots, split_prompt(len(request.prompt), self.chunk), []))

    def _prefill(self):
        """Prompt chunks, oldest first, up to `prefill_budget` tokens (at least one chunk): the decoding rows wait
        that long for their next token, and a burst of requests fills the batch in a few steps, not one per row."""
        spent = 0
        while self.prefilling and (spent == 0 or spent + self.prefilling[0][2][0][1] <= self.prefill_budget):
            spent += self._prefill_next()

    def _prefill_next(self) -> int:
        """One chunk of the oldest prompt being prefilled (its size returned); after its last one, the prompt's
        choices start decoding."""
        request, slots, chunks, scored = self.prefilling[0]
        start, size = chunks.pop(0)
        out = self._prefill_chunk(slots[0], request.prompt, start, size, request.prompt_logprobs)
        if out is not None:
            scored.append((start, out))
        if chunks:
            return size
        self.prefilling.popleft()
        if request.prompt_logprobs:
            request.on_event(("prompt", *_prompt_scores(request.prompt, scored)))
        for s in slots[1:]:
            self.state = programs.fork(self.state, np.int32(slots[0]), np.int32(s), self.config.num_heads)
        for s in slots:
            self.pos[s] = len(request.prompt)
            if request.max_tokens == 0:
                self._free(s, "length")
            else:
                self.rows[s].decoding = True
        return size

    def _dispatch(self):
        """A decode step of every decoding row that has tokens left to draw -> (outputs, [(slot, row, count)])."""
        decoding = [s for s, row in enumerate(self.rows)
                    if row is not None and row.decoding and row.count < row.request.max_tokens]
        if not decoding:
            return None
        self._resize_to(max(max(int(self.pos[s]) + 1 for s in decoding), self.length))
        rows = next(b for b in row_buckets(self.slots) if b > max(decoding))
        self.state, out = programs.decode(self.graphdef, self.params, self.copies, self.state,
                                          self._rows_args(decoding, rows))
        taken = []
        for s in decoding:
            row = self.rows[s]
            row.count += 1
            self.pos[s] += 1
            taken.append((s, row, row.count))
        self.stats["steps"] += 1
        return out, taken

    def _deliver(self, out, taken):
        tokens, logprobs, top_ids, top_lp = (np.asarray(x) for x in out)
        self.recent.append((time.monotonic(), len(taken)))
        for s, row, count in taken:
            request = row.request
            if row.choice in request.finished or request.cancelled or row.choice in request.stopping:
                continue
            token = int(tokens[s])
            if token in request.stop_ids:
                self._free(s, "stop")
                continue
            scores = (float(logprobs[s]), (top_ids[s].tolist(), top_lp[s].tolist())) if request.logprobs else \
                (None, None)
            self.stats["generated_tokens"] += 1
            request.on_event(("token", row.choice, token, *scores))
            if count == request.max_tokens:
                self._free(s, "length")

    def _shrink(self):
        """Give back cache positions no sequence needs (at most half of them are kept idle)."""
        need = [int(self.pos[s]) + 1 for s, row in enumerate(self.rows) if row is not None and row.decoding]
        need += [len(p[0].prompt) + self.chunk for p in self.prefilling]  # a prefill's chunks end within this
        target = next(n for n in self.lengths if n >= max(need, default=1))
        if target <= self.length // 2:
            self._resize_to(target)


def _prompt_scores(prompt: list[int], scored: list) -> tuple[list, list]:
    """The prompt's log-probabilities (None for its first token) and top alternatives, from its chunks' scores."""
    logprobs: list = [None]
    top: list = [None]
    for start, (lp, ids, top_lp) in scored:
        lp, ids, top_lp = np.asarray(lp), np.asarray(ids), np.asarray(top_lp)
        for j in range(min(len(lp), len(prompt) - 1 - start)):
            logprobs.append(float(lp[j]))
            top.append((ids[j].tolist(), top_lp[j].tolist()))
    return logprobs, top

