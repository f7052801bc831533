"""Who may call the server and how often: API keys compared in constant time, per-key token buckets.

Keys come from a file (one per line, `#` comments) or NEOX_JAX_API_KEYS (comma-separated). They are held only
to be compared: the limits are kept per key under a digest of it, and nothing here logs or prints a key.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import threading
import time
from pathlib import Path

ENV_KEYS = "NEOX_JAX_API_KEYS"
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def load_keys(path: str | os.PathLike | None) -> list[bytes]:
    """The keys of `--api-keys FILE` and NEOX_JAX_API_KEYS; none: the server is open."""
    keys = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--api-keys {path}: no such file (one key per line, # comments)")
        for line in p.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    keys += [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
    short = sum(len(k) < 16 for k in keys)
    if short:
        raise ValueError(f"{short} API key(s) shorter than 16 characters (--api-keys / {ENV_KEYS}): use long random "
                         "keys, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return [k.encode() for k in keys]


def key_id(key: bytes) -> str:
    """A name for a key that does not reveal it (the limits' table, the logs)."""
    return hashlib.sha256(key).hexdigest()[:12]


def authenticate(keys: list[bytes], header: str | None) -> str | None:
    """The key id of `Authorization: Bearer KEY` when it is one of `keys` (every key compared, each in constant
    time, so the time taken tells nothing of which matched or how much); "" when the server has no keys; None when
    refused."""
    if not keys:
        return ""
    given = b""
    if header and header[:7].lower() == "bearer ":
        given = header[7:].strip().encode()
    match = None
    for key in keys:
        if hmac.compare_digest(key, given):
            match = key
    return None if match is None else key_id(match)


class TokenBucket:
    """`capacity` units, refilled at `rate` per second."""

    def __init__(self, capacity: float, rate: float):
        self.capacity, self.rate = capacity, rate
        self.level, self.stamp = capacity, time.monotonic()

    def _refill(self, now: float):
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, cost: float, now: float) -> float:
        """Seconds until `cost` units are there (0: now)."""
        self._refill(now)
        return 0.0 if self.level >= cost else (cost - self.level) / self.rate


def parse_limits(spec: str | None) -> dict[str, tuple[float, float]]:
    """`requests=60/m,tokens=40000/m` -> {"requests": (capacity, per second), ...}; units s, m, h."""
    out: dict[str, tuple[float, float]] = {}
    if not spec:
        return out
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(requests|tokens)\s*=\s*(\d+)\s*/\s*([smh])\s*", part)
        if not m or int(m.group(2)) < 1:
            raise ValueError(f"--rate-limit {spec!r}: {part.strip()!r} is not requests=N/UNIT or tokens=N/UNIT "
                             "(N >= 1, UNIT s, m or h), e.g. requests=60/m,tokens=40000/m")
        n = int(m.group(2))
        out[m.group(1)] = (float(n), n / UNITS[m.group(3)])
    return out


class RateLimiter:
    """Per-key token buckets for requests and tokens (a request costs its prompt tokens plus max_tokens for each
    choice, as OpenAI counts its limits). One entry per key (the server's, or "" for an open server): bounded."""

    def __init__(self, limits: dict[str, tuple[float, float]]):
        self.limits = limits
        self.buckets: dict[str, dict[str, TokenBucket]] = {}
        self.lock = threading.Lock()

    def check_cost(self, tokens: int) -> str | None:
        """A problem when one request could never fit the token limit."""
        if "tokens" in self.limits and tokens > self.limits["tokens"][0]:
            return (f"this request needs {tokens} tokens (prompt + max_tokens x n), more than the server's token "
                    f"limit of {int(self.limits['tokens'][0])} (--rate-limit tokens=...): ask for fewer")
        return None

    def take(self, key: str, tokens: int) -> float:
        """0 and the request's cost taken, or the seconds to wait before it would fit (nothing taken)."""
        if not self.limits:
            return 0.0
        now = time.monotonic()
        with self.lock:
            buckets = self.buckets.setdefault(key, {name: TokenBucket(*lim) for name, lim in self.limits.items()})
            costs = {"requests": 1, "tokens": tokens}
            wait = max(bucket.wait(costs[name], now) for name, bucket in buckets.items())
            if wait == 0:
                for name, bucket in buckets.items():
                    bucket.level -= costs[name]
            return wait


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))
