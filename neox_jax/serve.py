"""`neox-jax serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (batching.py).

Built on Starlette and uvicorn: a small, well-kept ASGI toolkit and server (Starlette streams server-sent events and
tells a handler when its client went away; uvicorn has graceful shutdown), with prometheus_client for /metrics. The
engine runs in its own thread; each HTTP request waits on an asyncio queue the engine's callbacks feed.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics. Every /v1 route
asks for `Authorization: Bearer KEY` when the server has keys, and counts against the key's rate limits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import signal
import time
import weakref

from neox_jax import access
from neox_jax.batching import Engine, QueueFull, Request
from neox_jax.openai_api import (ApiError, Caps, ChoiceText, Params, chat_logprobs, completion_logprobs, new_id, now,
                                 parse_chat, parse_completion, text_offsets, token_text, top_dict)

log = logging.getLogger("neox_jax.serve")


@dataclasses.dataclass
class Settings:
    name: str
    keys: list[bytes] = dataclasses.field(default_factory=list)
    limits: dict = dataclasses.field(default_factory=dict)
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens_cap: int | None = None
    log_prompts: bool = False


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import CounterMetricFamily

        self.registry = r = CollectorRegistry()
        self.requests = Counter("neox_jax_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.rejections = Counter("neox_jax_rejections", "requests refused, by reason", ["reason"], registry=r)
        Gauge("neox_jax_queue_length", "requests waiting for a slot", registry=r).set_function(
            lambda: len(engine.waiting))
        Gauge("neox_jax_active_sequences", "KV-cache slots in use", registry=r).set_function(lambda: engine.active)
        Gauge("neox_jax_tokens_per_second", "tokens generated per second over the last 10 s", registry=r
              ).set_function(engine.tokens_per_second)
        latency = [.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10, 20, 60]
        self.ttft = Histogram("neox_jax_time_to_first_token_seconds", "from a request's arrival to its first token",
                              buckets=latency, registry=r)
        self.itl = Histogram("neox_jax_inter_token_latency_seconds", "between a choice's successive tokens",
                             buckets=latency, registry=r)

        class EngineCounters:
            def collect(self):
                for name, doc in (("prefilled_tokens", "prompt tokens prefilled"),
                                  ("generated_tokens", "tokens generated"), ("steps", "decode steps"),
                                  ("compilations", "XLA compilations since warm-up")):
                    value = engine.compilations if name == "compilations" else engine.stats[name]
                    yield CounterMetricFamily(f"neox_jax_{name}", doc, value=value)

        r.register(EngineCounters())

    def reject(self, reason: str):
        self.rejections.labels(reason).inc()


REASONS = {400: "invalid", 401: "unauthorized", 404: "not_found", 405: "invalid", 413: "too_large",
           429: "rate_limited", 503: "unavailable"}  # rejections by status; any other: "error"


class Service:
    """The routes' shared state: engine, tokenizer, access control, metrics, shutdown."""

    def __init__(self, engine: Engine, tokenizer, settings: Settings, chat=None):
        self.engine, self.tok, self.settings, self.chat = engine, tokenizer, settings, chat
        self.limiter = access.RateLimiter(settings.limits)
        self.metrics = Metrics(engine)
        self.caps = Caps(context=engine.max_context,
                         max_prompt_tokens=min(settings.max_prompt_tokens or engine.max_context, engine.max_context),
                         max_tokens=min(settings.max_tokens_cap or engine.max_context, engine.max_context),
                         max_n=engine.slots)
        self.draining = False
        self.in_flight = 0
        self._mailbox = None

    def mailbox(self) -> "Mailbox":
        if self._mailbox is None:
            self._mailbox = Mailbox(asyncio.get_running_loop())
        return self._mailbox

    # ---- plumbing -------------------------------------------------------------------------------------
    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.scrape, methods=["GET"])]
        return Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})

    async def _not_found(self, request, exc):
        return self._error(ApiError(404, f"no route {request.url.path} (see /v1/completions, /v1/chat/completions, "
                                         "/v1/models, /health, /metrics)", kind="not_found_error"), "other")

    async def _not_allowed(self, request, exc):
        return self._error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"), "other")

    def _error(self, e: ApiError, endpoint: str):
        from starlette.responses import JSONResponse

        self.metrics.reject(REASONS.get(e.status, "error"))
        self.metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def _authorize(self, request) -> str:
        key = access.authenticate(self.settings.keys, request.headers.get("authorization"))
        if key is None:
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                           kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        return key

    async def _body(self, request):
        cap = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"the body is {declared} bytes, more than this server's cap of {cap} "
                                "(--max-body-bytes)")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > cap:
                raise ApiError(413, f"the body is more than this server's cap of {cap} bytes (--max-body-bytes)")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None

    # ---- routes ---------------------------------------------------------------------------------------
    async def health(self, request):
        from starlette.responses import JSONResponse

        if self.engine.error is not None:
            return JSONResponse({"status": "error", "error": "the engine stopped"}, status_code=500)
        status = "draining" if self.draining else "ok"
        return JSONResponse({"status": status, "active": self.engine.active, "waiting": len(self.engine.waiting)},
                            status_code=503 if self.draining else 200)

    async def scrape(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request):
        from starlette.responses import JSONResponse

        try:
            self._authorize(request)
        except ApiError as e:
            return self._error(e, "models")
        self.metrics.requests.labels("models", "200").inc()
        return JSONResponse({"object": "list", "data": [
            {"id": self.settings.name, "object": "model", "created": 0, "owned_by": "neox-jax",
             "max_model_len": self.engine.max_context}]})

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request):
        return await self._generate(request, chat=True)

    async def _generate(self, request, chat: bool):
        from starlette.responses import JSONResponse, StreamingResponse

        endpoint = "chat" if chat else "completions"
        arrived = time.monotonic()
        try:
            key = self._authorize(request)
            if self.draining:
                raise ApiError(503, "the server is shutting down", kind="server_error")
            body = await self._body(request)
            # in a thread: tokenizing a long prompt (or rendering a chat) would hold up every stream
            params = await asyncio.to_thread(*((parse_chat, body, self.tok, self.chat, self.caps) if chat else
                                               (parse_completion, body, self.tok, self.caps)))
            model = body.get("model")
            if model is not None and model != self.settings.name:
                raise ApiError(404, f"model {model!r} is not served here (this server serves {self.settings.name!r})",
                               "model", kind="not_found_error")
            cost = sum(len(p) for p in params.prompts) + params.max_tokens * params.n * len(params.prompts)
            problem = self.limiter.check_cost(cost)
            if problem:
                raise ApiError(400, problem, "max_tokens")
            wait = self.limiter.take(key, cost)
            if wait:
                raise ApiError(429, f"rate limit reached for this key: retry in {access.retry_after(wait)} s",
                               kind="rate_limit_error", headers={"Retry-After": access.retry_after(wait)})
            run = Run(self, params, arrived)
        except ApiError as e:
            return self._error(e, endpoint)
        log.info("request %s: %d prompt(s), %d prompt tokens, n=%d, max_tokens=%d, stream=%s", run.id,
                 len(params.prompts), run.prompt_tokens, params.n, params.max_tokens, params.stream)
        if self.settings.log_prompts:
            log.info("request %s prompts: %r", run.id, [self.tok.decode(p) for p in params.prompts])
        if params.stream:
            self.metrics.requests.labels(endpoint, "200").inc()
            events = run.stream()
            weakref.finalize(events, run.close)  # a client gone before the stream started: it never runs
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            body = await run.collect(request)
        except ApiError as e:
            return self._error(e, endpoint)
        if body is None:  # the client went away: nobody to answer
            self.metrics.requests.labels(endpoint, "499").inc()
            return JSONResponse({}, status_code=499)
        self.metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(body)


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

    def __init__(self, service: Service, params: Params, arrived: float):
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


# ---- running ----------------------------------------------------------------------------------------------


def run(service: Service, host: str, port: int, grace: float, ready=None) -> int:
    """Serve until SIGTERM or SIGINT; then stop accepting, let in-flight requests finish for up to `grace`
    seconds, cancel the rest, and return 0."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # ours: drain first (uvicorn's would re-raise the signal and exit non-zero)
            def on_signal(sig, frame):
                if service.draining:
                    self.force_exit = True
                service.draining = True
            old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    async def drain():
        while not service.draining:
            await asyncio.sleep(0.05)
        log.info("shutting down: no new requests; %d in flight get up to %.0f s", service.in_flight, grace)
        for listener in server.servers:
            listener.close()  # stop accepting connections
        deadline = time.monotonic() + grace
        while (service.in_flight or not service.engine.idle()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = await asyncio.to_thread(service.engine.close, 0)
        if not left:
            log.warning("the grace period ended: unfinished requests were cancelled")
        await asyncio.sleep(0.1)  # let the cancelled requests answer
        server.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.ensure_future(drain())
        if ready is not None:
            ready()
        yield
        task.cancel()

    app = service.app()
    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(1, int(grace)), lifespan="on")
    server = Server(config)
    server.run()
    return 0
