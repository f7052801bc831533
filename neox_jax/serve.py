"""`neox-jax serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (batching.py).

Built on Starlette and uvicorn: a small, well-kept ASGI toolkit and server (Starlette streams server-sent events and
tells a handler when its client went away; uvicorn has graceful shutdown), with prometheus_client for /metrics. The
engine runs in its own thread; each HTTP request (completion.py's `Run`) waits on an asyncio queue the engine's
callbacks feed.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics. Every /v1 route
asks for `Authorization: Bearer KEY` when the server has keys, and counts against the key's rate limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
import weakref

from neox_jax import access
from neox_jax.batching import Engine
from neox_jax.completion import Mailbox, Run
from neox_jax.openai_api import ApiError, Caps, parse_chat, parse_completion

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

    def mailbox(self) -> Mailbox:
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
