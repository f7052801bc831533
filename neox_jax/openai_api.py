"""The OpenAI completions and chat completions protocol: requests checked field by field, text made from tokens.

What is implemented is OpenAI's meaning; what is not is refused by name (400), never ignored: `logit_bias`,
`presence_penalty` and `frequency_penalty` other than 0, `suffix`, `best_of` other than n, tools, response formats.
`top_k` is an extension (vLLM's name; 0 or -1 is off). Stop strings are found in the text, also where they span
tokens, and while streaming the text that could begin one is held back, as is a character whose bytes have not all
come. Log-probabilities are the model's own (before temperature and filters).
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from neox_jax.generation import Sampling
from neox_jax.slots import TOP_LOGPROBS

MAX_STOPS = 4  # OpenAI's
UNSUPPORTED = {  # field: when it is refused
    "logit_bias": lambda v: bool(v), "presence_penalty": lambda v: v not in (0, 0.0),
    "frequency_penalty": lambda v: v not in (0, 0.0), "suffix": lambda v: bool(v), "tools": lambda v: bool(v),
    "tool_choice": lambda v: v not in ("none",), "functions": lambda v: bool(v), "function_call": lambda v: bool(v),
    "response_format": lambda v: v not in ({"type": "text"},), "parallel_tool_calls": lambda v: bool(v),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed",
          "user", *UNSUPPORTED}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


class ApiError(Exception):
    """An OpenAI-shaped error: status, message, the field at fault, OpenAI's error type."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclasses.dataclass(frozen=True)
class Caps:
    """The server's limits on one request."""

    context: int
    max_prompt_tokens: int
    max_tokens: int
    max_n: int


@dataclasses.dataclass
class Params:
    """A checked request: token prompts and how to continue them."""

    prompts: list[list[int]]
    max_tokens: int
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top alternatives per token; None: no log-probabilities
    echo: bool = False
    chat: bool = False


class _Checker:
    """Reads fields of a JSON body, collecting every problem (all reported at once, the first field named)."""

    def __init__(self, body, allowed: set[str]):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.body, self.problems, self.params = body, [], []
        for name in sorted(set(body) - allowed):
            self.fail(name, f"{name}: unknown field (the fields are: {', '.join(sorted(allowed))})")
        for name, refused in UNSUPPORTED.items():
            if name in body and body[name] is not None and refused(body[name]):
                self.fail(name, f"{name}={body[name]!r} is not supported by this server (leave it out)")

    def fail(self, name: str, message: str):
        self.params.append(name)
        self.problems.append(message)

    def number(self, name, default, lo=None, hi=None, whole=False, lo_open=False):
        value = self.body.get(name)
        if value is None:
            return default
        kinds = (int,) if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            self.fail(name, f"{name}={value!r}: expected {'an integer' if whole else 'a number'}")
            return default
        if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
            low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
            high = "" if hi is None else f"<= {hi}"
            self.fail(name, f"{name}={value}: must be {' and '.join(x for x in (low, high) if x)}")
            return default
        return value

    def flag(self, name, default=False):
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(name, f"{name}={value!r}: expected true or false")
            return default
        return value

    def done(self):
        if self.problems:
            raise ApiError(400, "; ".join(self.problems), self.params[0])


def _stops(c: _Checker) -> tuple[str, ...]:
    stop = c.body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        c.fail("stop", f"stop={stop!r}: expected a non-empty string or a list of at most {MAX_STOPS} of them")
        return ()
    return tuple(stops)


def _common(c: _Checker, caps: Caps, seed_default=None) -> dict:
    temperature = c.number("temperature", 1.0, 0, 2)
    top_p = c.number("top_p", 1.0, 0, 1, lo_open=True)
    top_k = c.number("top_k", 0, -1, whole=True)
    n = c.number("n", 1, 1, caps.max_n, whole=True)
    seed = c.number("seed", seed_default, 0, 2**32 - 1, whole=True)
    options = c.body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        c.fail("stream_options", f"stream_options={options!r}: expected {{\"include_usage\": true or false}}")
        options = None
    stream = c.flag("stream")
    if options and not stream:
        c.fail("stream_options", "stream_options: only with stream=true")
    if "model" in c.body and not isinstance(c.body["model"], str):
        c.fail("model", f"model={c.body['model']!r}: expected a string")
    if "user" in c.body and not isinstance(c.body["user"], (str, type(None))):
        c.fail("user", f"user={c.body['user']!r}: expected a string")
    seed = secrets.randbits(32) if seed is None else seed
    return dict(sampling=Sampling(float(temperature), max(0, top_k), 0.0 if top_p >= 1 else float(top_p), seed),
                n=n, stream=stream, include_usage=bool(options and options.get("include_usage")), stop=_stops(c))


def _max_tokens(c: _Checker, name: str, default: int, caps: Caps, floor: int = 1) -> int:
    value = c.number(name, default, floor, whole=True)
    if value > caps.max_tokens:
        c.fail(name, f"{name}={value} is above this server's cap of {caps.max_tokens} (--max-tokens-cap)")
    return value


def _check_length(prompts: list[list[int]], max_tokens: int, caps: Caps, field: str):
    for i, p in enumerate(prompts):
        which = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        if not p:
            raise ApiError(400, f"{which} is empty: give at least one token", field)
        if len(p) > caps.max_prompt_tokens:
            raise ApiError(400, f"{which} has {len(p)} tokens, more than this server's cap of {caps.max_prompt_tokens} "
                                "(--max-prompt-tokens)", field)
        if len(p) + max_tokens > caps.context:
            raise ApiError(400, f"{which} has {len(p)} tokens; with max_tokens={max_tokens} that is more than the "
                                f"context of {caps.context} tokens: shorten it or lower max_tokens", "max_tokens")


def parse_completion(body, tokenizer, caps: Caps) -> Params:
    c = _Checker(body, COMPLETION_FIELDS)
    common = _common(c, caps)
    echo = c.flag("echo")
    logprobs = c.number("logprobs", None, 0, TOP_LOGPROBS, whole=True)
    max_tokens = _max_tokens(c, "max_tokens", 16, caps, floor=0)
    best_of = c.number("best_of", None, 1, whole=True)
    if best_of is not None and best_of != common["n"]:
        c.fail("best_of", f"best_of={best_of} is not supported by this server (only best_of = n)")
    if max_tokens == 0 and not (echo and logprobs is not None):
        c.fail("max_tokens", "max_tokens=0 only scores a prompt: with echo=true and logprobs")
    prompt = body.get("prompt")
    prompts = None
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
        prompts = [list(p) for p in prompt]
    elif _is_ids(prompt) and prompt:
        prompts = [list(prompt)]
    else:
        c.fail("prompt", "prompt: expected a string, a list of strings, a list of token ids or a list of such lists")
    c.done()
    if common["stream"] and len(prompts) * common["n"] > 1 and max_tokens == 0:
        raise ApiError(400, "max_tokens=0 with stream=true: nothing would stream", "max_tokens")
    ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    vocab = tokenizer.vocab_size
    for i, p in enumerate(ids):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary (0 .. {vocab - 1})",
                           "prompt")
    _check_length(ids, max_tokens, caps, "prompt")
    return Params(ids, max_tokens, echo=echo, logprobs=logprobs, **common)


def _is_ids(p) -> bool:
    return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def parse_chat(body, tokenizer, chat, caps: Caps) -> Params:
    """`chat`: the tokenizer's chat template (data/chat.py's ChatEncoder), or None."""
    c = _Checker(body, CHAT_FIELDS)
    common = _common(c, caps)
    want = c.flag("logprobs")
    top = c.number("top_logprobs", 0, 0, TOP_LOGPROBS, whole=True)
    if top and not want:
        c.fail("top_logprobs", "top_logprobs: only with logprobs=true")
    limit_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _max_tokens(c, limit_name, 0, caps)  # 0: the rest of the context
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        c.fail("messages", "messages: expected a non-empty list of {\"role\": ..., \"content\": \"text\"}")
    c.done()
    if chat is None:
        raise ApiError(400, "this model's tokenizer has no chat template (tokenizer_config.json's chat_template): use "
                            "/v1/completions, or serve with --chat-template FILE", "messages")
    try:
        ids = chat.render([{"role": m["role"], "content": m["content"]} for m in messages], add_generation_prompt=True)
    except Exception as e:  # the template's raise_exception, or a template error
        raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
    if not max_tokens:
        max_tokens = min(caps.max_tokens, caps.context - len(ids))
    _check_length([ids], max(max_tokens, 1), caps, "messages")
    return Params([ids], max_tokens, logprobs=top if want else None, chat=True, **common)


# ---- text --------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's, the NeoX tokenizer's): each byte's character, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _bytes_to_unicode()


def token_bytes(tokenizer, token: int) -> bytes:
    piece = tokenizer.tokenizer.id_to_token(token) or ""
    if all(ch in _BYTES for ch in piece):
        return bytes(_BYTES[ch] for ch in piece)
    return tokenizer.decode([token]).encode()  # an added (special) token: its text


def token_text(tokenizer, token: int) -> str:
    """A token's text; a token that holds part of a character is written as its bytes ("bytes:\\xe2\\x80")."""
    raw = token_bytes(tokenizer, token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def text_offsets(tokenizer, ids: list[int]) -> list[int]:
    """Where each token's text starts in the decoded text (characters), in one pass over the tokens' bytes."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    offsets, length = [], 0
    for token in ids:
        offsets.append(length)
        length += len(decoder.decode(token_bytes(tokenizer, token)))
    return offsets


class ChoiceText:
    """One choice's text as its tokens come: what can be sent now (whole characters, no possible start of a stop
    string), where a stop string ended it, and its tokens' log-probabilities as the text holds them. Detokenized
    incrementally (each token decodes only the few tokens since the last whole character, not the whole text)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""  # whole characters so far
        self.start = self.read = 0  # ids[start:read] decode to the end of `text`; ids[read:] are not in it yet
        self.sent = 0
        self.stopped = False
        self.entries: list[tuple[int, str, float, dict | None]] = []  # (offset, token text, logprob, top)
        self.entries_sent = 0

    def push(self, token: int, logprob: float | None = None, top: dict | None = None) -> None:
        """The next token; with its log-probability (and top alternatives) when they are asked for."""
        if self.stopped:
            return
        offset = len(self.text)
        self.ids.append(token)
        if logprob is not None:
            self.entries.append((offset, token_text(self.tok, token), logprob, top))
        done = self.tok.decode(self.ids[self.start:self.read])
        now = self.tok.decode(self.ids[self.start:])
        if len(now) > len(done) and not now.endswith("\ufffd"):  # else a character's bytes are still to come
            self.text += now[len(done):]
            self.start, self.read = self.read, len(self.ids)
        self._find_stop(offset)

    def _find_stop(self, since: int):
        if not self.stops:
            return
        hits = [i for i in (self.text.find(s, max(0, since - max(map(len, self.stops)))) for s in self.stops)
                if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            self.entries = [e for e in self.entries if e[0] < len(self.text)]

    def take(self, final: bool = False) -> tuple[str, list]:
        """(text not yet sent that is safe to send, the log-prob entries of its tokens); `final`: all of it (bytes
        that never made a character as replacement characters)."""
        if final and not self.stopped and self.read < len(self.ids):
            offset = len(self.text)
            self.text += self.tok.decode(self.ids[self.start:])[len(self.tok.decode(self.ids[self.start:self.read])):]
            self.start = self.read = len(self.ids)
            self._find_stop(offset)
        end = len(self.text)
        if not final and not self.stopped:
            end -= max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        ready = len(self.entries) if final or self.stopped else sum(e[0] < end for e in self.entries)
        entries = self.entries[self.entries_sent:ready]
        self.entries_sent = max(ready, self.entries_sent)
        return out, entries


def completion_logprobs(entries: list, base: int) -> dict:
    """OpenAI completions' `logprobs` of entries (offset, text, logprob, top), offsets counted from `base`."""
    return {"tokens": [e[1] for e in entries], "token_logprobs": [e[2] for e in entries],
            "top_logprobs": [e[3] for e in entries], "text_offset": [base + e[0] for e in entries]}


def chat_logprobs(entries: list) -> dict:
    """OpenAI chat's `logprobs`: each token with its bytes and its top alternatives."""
    def item(text, lp):
        raw = bytes.fromhex(text[6:].replace("\\x", "")) if text.startswith("bytes:\\x") else text.encode()
        return {"token": text, "logprob": lp, "bytes": list(raw)}
    return {"content": [dict(item(e[1], e[2]), top_logprobs=[item(t, lp) for t, lp in (e[3] or {}).items()])
                        for e in entries]}


def top_dict(tokenizer, top, k: int) -> dict | None:
    """The k most likely alternatives {token text: logprob} of an engine (ids, logprobs) pair."""
    if top is None or not k:
        return None if top is None else {}
    ids, lps = top
    return {token_text(tokenizer, t): lp for t, lp in zip(ids[:k], lps[:k])}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())
