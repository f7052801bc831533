"""One HTTP request's generation (`Run`): its engine requests, their events turned into text, the OpenAI answer
whole or as server-sent events; and the `Mailbox` that carries the engine thread's events to the event loop."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time

from neox_jax.batching import QueueFull, Request
from neox_jax.openai_api import (ApiError, ChoiceText, Params, chat_logprobs, completion_logprobs, new_id, now,
                                 text_offsets, token_text, top_dict)

log = logging.getLogger("neox_jax.serve")


class Mailbox:
    """Events from the engine's thread to the requests' queues on the event loop, with one wake-up of the loop for
    all that arrive together (a decode step's tokens), not one per token."""

    def __init__(self, loop):
        self.loop, self.items, self.scheduled = loop, collections.deque(), False

    def post(self, queue: asyncio.Queue, item):  # the engine's thread: append first, then look at the flag
        self.items.append((queue, item))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self):  # the event loop
        self.scheduled = False
        while self.items:
            queue, item = self.items.popleft()
            queue.put_nowait(item)


class Run:
    """One HTTP request's generation: its engine requests (one per prompt), their events, the answer."""

    def __init__(self, service, params: Params, arrived: float):  # service: serve.Service
        self.service, self.params, self.arrived = service, params, arrived
        self.tok = service.tok
        self.id = new_id("chatcmpl" if params.chat else "cmpl")
        self.created = now()
        self.prompt_tokens = sum(len(p) for p in params.prompts)
        self.queue: asyncio.Queue = asyncio.Queue()
        mailbox = service.mailbox()
        n = params.n
        chat_eos = service.chat.eos if params.chat else None  # the template's end of turn, if the vocabulary has it
        stop_ids = tuple({self.tok.eod_id} | ({chat_eos} if chat_eos is not None else set()))
        self.echo_text = [self.tok.decode(p) if params.echo else "" for p in params.prompts]
        self.texts = [ChoiceText(self.tok, params.stop) for _ in range(len(params.prompts) * n)]
        self.finish: dict[int, str] = {}
        self.last_token: dict[int, float] = {}
        self.prompt_entries: dict[int, list] = {}
        self.requests: list[Request] = []
        self.open = False
        try:
            for i, prompt in enumerate(params.prompts):
                def emit(event, i=i):
                    mailbox.post(self.queue, (i, event))
                request = Request(prompt, params.max_tokens, emit, params.sampling, n=n, stop_ids=stop_ids,
                                  logprobs=params.logprobs is not None,
                                  prompt_logprobs=params.echo and params.logprobs is not None)
                service.engine.submit(request)
                self.requests.append(request)
        except QueueFull as e:
            self.cancel()
            raise ApiError(503, f"the server is busy: {e}; retry later", kind="server_error",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:
            self.cancel()
            raise ApiError(400, str(e)) from None
        service.in_flight += 1
        self.open = True

    def cancel(self):
        for request in self.requests:
            request.cancel()

    def close(self):
        self.cancel()
        if self.open:
            self.open = False
            self.service.in_flight -= 1

    @property
    def done(self) -> bool:
        return len(self.finish) == len(self.texts)

    async def _events(self):
        """(choice index, "echo" or "text", finish reason or None) as each event from the engine comes; raises the
        ApiError of a failed or shut-down generation."""
        n, metrics = self.params.n, self.service.metrics
        while not self.done:
            i, event = await self.queue.get()
            kind = event[0]
            if kind == "error":
                raise ApiError(500, f"generation failed: {event[1]}", kind="server_error")
            if kind == "prompt":
                self.prompt_entries[i] = self._prompt_entries(i, event[1], event[2])
                for j in range(n):
                    yield i * n + j, "echo", None
                continue
            g = i * n + event[1]
            if g in self.finish:
                continue
            text = self.texts[g]
            if kind == "token":
                _, _, token, lp, top = event
                t = time.monotonic()
                if g in self.last_token:
                    metrics.itl.observe(t - self.last_token[g])
                else:
                    metrics.ttft.observe(t - self.arrived)
                self.last_token[g] = t
                text.push(token, lp, top_dict(self.tok, top, self.params.logprobs or 0))
                if text.stopped:
                    self.requests[i].stop(event[1])
                    self.finish[g] = "stop"
                yield g, "text", self.finish.get(g)
            else:  # done
                if event[2] == "cancelled":
                    raise ApiError(503, "the server shut down before this request finished", kind="server_error")
                self.finish[g] = event[2]
                yield g, "text", event[2]

    def _prompt_entries(self, i: int, logprobs: list, top: list) -> list:
        prompt, k = self.params.prompts[i], self.params.logprobs or 0
        return [(offset, token_text(self.tok, token), lp, None if alternatives is None else
                 top_dict(self.tok, alternatives, k))
                for offset, token, lp, alternatives in zip(text_offsets(self.tok, prompt), prompt, logprobs, top)]

    def _usage(self) -> dict:
        completion = sum(len(t.ids) for t in self.texts)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _logprobs(self, g: int, entries: list, echo: bool = False):
        if self.params.logprobs is None:
            return None
        if self.params.chat:
            return chat_logprobs(entries)
        i = g // self.params.n
        return completion_logprobs(entries, 0 if echo else len(self.echo_text[i]))

    async def collect(self, request) -> dict | None:
        """The whole answer, or None if the client disconnected first (its sequences are cancelled)."""
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        async def answer():
            async for _ in self._events():
                pass

        watch, work = asyncio.ensure_future(disconnected()), asyncio.ensure_future(answer())
        try:
            await asyncio.wait({watch, work}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                log.info("request %s: the client disconnected; its sequences are cancelled", self.id)
                return None
            work.result()
        finally:
            watch.cancel()
            work.cancel()
            self.close()
        choices = []
        for g, text in enumerate(self.texts):
            i = g // self.params.n
            text.take(final=True)  # the bytes of a character the output ended inside, as a replacement character
            content = self.echo_text[i] + text.text
            logprobs = self._logprobs(g, self.prompt_entries.get(i, []) + _shift(text.entries, len(self.echo_text[i])),
                                      echo=True)
            if self.params.chat:
                choices.append({"index": g, "message": {"role": "assistant", "content": content},
                                "logprobs": logprobs, "finish_reason": self.finish[g]})
            else:
                choices.append({"index": g, "text": content, "logprobs": logprobs,
                                "finish_reason": self.finish[g]})
        self._log()
        return {"id": self.id, "object": "chat.completion" if self.params.chat else "text_completion",
                "created": self.created, "model": self.service.settings.name, "choices": choices,
                "usage": self._usage()}

    def _chunk(self, choices: list, usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.params.chat else "text_completion",
                "created": self.created, "model": self.service.settings.name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def _choice_delta(self, g: int, text: str, entries: list, finish: str | None, first: bool = False,
                      echo: bool = False) -> dict:
        if self.params.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": g, "delta": delta, "logprobs": self._logprobs(g, entries), "finish_reason": finish}
        return {"index": g, "text": text, "logprobs": self._logprobs(g, entries, echo=echo), "finish_reason": finish}

    def _flush(self, dirty: dict) -> list[str]:
        """Chunks of the choices in `dirty` (choice: finish reason or None) with text to send; `dirty` emptied."""
        chunks = []
        for g, finish in dirty.items():
            text, entries = self.texts[g].take(final=finish is not None)
            if text or entries or finish:
                chunks.append(self._chunk([self._choice_delta(g, text, entries, finish)]))
        dirty.clear()
        return chunks

    async def stream(self):
        """Server-sent events, OpenAI's chunks; the last is `data: [DONE]`. Cancelled if the client goes away."""
        started: set[int] = set()
        try:
            scored = self.params.echo and self.params.logprobs is not None
            for g in range(len(self.texts)):
                i = g // self.params.n
                if self.params.chat:
                    started.add(g)
                    yield self._chunk([self._choice_delta(g, "", [], None, first=True)])
                elif self.params.echo and not scored:
                    yield self._chunk([self._choice_delta(g, self.echo_text[i], [], None, echo=True)])
            dirty: dict[int, str | None] = {}  # choices with text to send, and their finish reasons
            try:
                async for g, kind, finish in self._events():
                    i = g // self.params.n
                    if kind == "echo":
                        yield self._chunk([self._choice_delta(g, self.echo_text[i], self.prompt_entries[i], None,
                                                              echo=True)])
                        continue
                    dirty[g] = dirty.get(g) or finish
                    if self.queue.empty():  # else behind the engine: the tokens piling up go out as one chunk
                        for chunk in self._flush(dirty):
                            yield chunk
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            for chunk in self._flush(dirty):
                yield chunk
            if self.params.include_usage:
                yield self._chunk([], self._usage())
            yield "data: [DONE]\n\n"
            self._log()
        finally:
            self.close()

    def _log(self):
        usage = self._usage()
        log.info("request %s done in %.3f s: %d completion tokens, finish %s", self.id,
                 time.monotonic() - self.arrived, usage["completion_tokens"], sorted(set(self.finish.values())))
        if self.service.settings.log_prompts:
            log.info("request %s outputs: %r", self.id, [t.text for t in self.texts])


def _shift(entries: list, by: int) -> list:
    return [(offset + by, *rest) for offset, *rest in entries]
