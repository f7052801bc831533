"""`neox-jax serve` under load, beside `Generator`'s own batch throughput and a naive server, in one run.

    python scripts/bench_serve.py [--presets pythia-70m pythia-160m] [--clients 1 4 16 64] [--runs 3]
                                  [--prompt-len 32] [--new-tokens 64] [--requests-per-client 4]
                                  [--rss-requests 200 2000] [--tokenizer ../shared/data/20B_tokenizer.json]

For each preset: random weights of its shape written as a Hugging Face folder; `Generator`'s batch-16 throughput
(prompts of --prompt-len, --new-tokens each, prefill included) measured in this process; then a real
`neox-jax serve` process (16 slots) driven by this one asyncio process: C streaming clients, each sending
--requests-per-client requests (more for few clients, so every load sends at least 16), greedy, token-id prompts.
Figures: the engine alone (in this process, 16 threads submitting, no HTTP); output tokens/s over the load's wall
time, time to first token and inter-token latency (p50, p99; gaps between a stream's chunks) at each C; the server's
resident memory after the first and second --rss-requests sequential requests; the same 16-client load against a
naive server (this script with --naive: `generate()` per request, one at a time, the whole answer as one event). Each
figure is the median of --runs loads. One JSON line per preset, then a summary against the targets (16 clients: >= 85%
of Generator, >= 3x the naive server; RSS growth <= 50 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import random_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "20B_tokenizer.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    return np.random.RandomState(seed).randint(1, vocab, (n, length)).tolist()


def generator_throughput(folder: Path, args) -> float:
    import neox_jax

    model = neox_jax.from_pretrained(folder)
    gen = neox_jax.Generator(model)
    ids = prompts(16, args.prompt_len, args.vocab, 0)
    gen(ids, args.new_tokens)  # compiles
    rates = []
    for _ in range(args.runs):
        start = time.perf_counter()
        out = gen(ids, args.new_tokens)
        rates.append(sum(map(len, out)) / (time.perf_counter() - start))
    return statistics.median(rates)


def engine_throughput(folder: Path, args, context: int) -> float:
    """The engine alone, in this process, no HTTP: 16 threads each submitting requests one after another."""
    import threading

    import neox_jax
    from neox_jax.batching import Engine, Request

    engine = Engine(neox_jax.from_pretrained(folder), slots=16, max_context=context)
    engine.warmup()
    engine.start()
    rates = []
    for seed in range(args.runs):
        tokens = []

        def client(c: int):
            for prompt in prompts(args.requests_per_client, args.prompt_len, args.vocab, seed * 1000 + c):
                done = threading.Event()
                def on_event(event, done=done):
                    if event[0] == "token":
                        tokens.append(1)
                    elif event[0] == "done":
                        done.set()

                engine.submit(Request(prompt, args.new_tokens, on_event))
                done.wait()

        threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates.append(len(tokens) / (time.perf_counter() - start))
    engine.close()
    return statistics.median(rates)


def start_server(cmd: list[str], url: str) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up in 10 minutes")
        time.sleep(0.5)


async def load(url: str, clients: int, args, seed: int) -> dict:
    """C streaming clients -> tokens/s, TTFT and inter-token gaps (aiohttp: its C parser leaves the cores to the
    server)."""
    import aiohttp

    each = max(args.requests_per_client, -(-16 // clients))
    ttft, gaps, tokens = [], [], []

    async def client(c: int, http):
        for prompt in prompts(each, args.prompt_len, args.vocab, seed * 1000 + c):
            body = {"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            sent = last = time.perf_counter()
            first = True
            async with http.post(url + "/v1/completions", json=body) as response:
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    now = time.perf_counter()
                    if chunk.get("usage"):
                        tokens.append(chunk["usage"]["completion_tokens"])
                    elif chunk["choices"] and chunk["choices"][0]["text"]:
                        (ttft.append(now - sent) if first else gaps.append(now - last))
                        first, last = False, now

    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        elapsed = time.perf_counter() - start
    q = statistics.quantiles
    return {"tokens_per_s": sum(tokens) / elapsed, "requests": len(tokens),
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * q(ttft, n=100)[98],
            "itl_p50_ms": 1e3 * statistics.median(gaps) if gaps else None,
            "itl_p99_ms": 1e3 * q(gaps, n=100)[98] if len(gaps) > 1 else None}


def median_of(runs: list[dict]) -> dict:
    return {k: (statistics.median(r[k] for r in runs) if runs[0][k] is not None else None) for k in runs[0]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sequential(url: str, n: int, args):
    import httpx

    with httpx.Client(timeout=600) as http:
        for i, prompt in enumerate(prompts(n, 8, args.vocab, 7)):
            r = http.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text


def bench(preset: str, args) -> dict:
    from neox_jax import NeoXConfig

    row = {"preset": preset, "device": "cpu", "cores": os.cpu_count(), "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_folder(preset, "float32", Path(tmp))  # bench_decode's: random weights of the preset's shape
        shutil.copy(args.tokenizer, folder / "tokenizer.json")
        args.vocab = min(NeoXConfig.preset(preset).vocab_size, 50277)
        row["generator_batch16_tokens_per_s"] = generator_throughput(folder, args)
        print(f"[{preset}] Generator batch 16: {row['generator_batch16_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        context = -(-(args.prompt_len + args.new_tokens) // 64) * 64
        row["engine_16_tokens_per_s"] = engine_throughput(folder, args, context)
        print(f"[{preset}] the engine alone, 16 threads: {row['engine_16_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server([sys.executable, "-m", "neox_jax.cli", "serve", "--model", str(folder), "--port",
                             str(port), "--max-batch", "16", "--max-context", str(context), "--max-queue", "256"], url)
        try:
            for clients in args.clients:
                runs = [asyncio.run(load(url, clients, args, seed)) for seed in range(args.runs)]
                row[f"serve_{clients}"] = median_of(runs)
                print(f"[{preset}] serve, {clients} clients: {row[f'serve_{clients}']}", file=sys.stderr)
            first, second = args.rss_requests
            sequential(url, first, args)
            row["rss_mb_after"] = {first: rss_mb(proc.pid)}
            sequential(url, second - first, args)
            row["rss_mb_after"][second] = rss_mb(proc.pid)
            print(f"[{preset}] RSS: {row['rss_mb_after']}", file=sys.stderr)
        finally:
            proc.send_signal(signal.SIGTERM)
            row["serve_exit_status"] = proc.wait(120)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server([sys.executable, __file__, "--naive", str(folder), "--port", str(port)], url)
        try:
            row["naive_16"] = median_of([asyncio.run(load(url, 16, args, seed)) for seed in range(args.runs)])
            print(f"[{preset}] naive, 16 clients: {row['naive_16']}", file=sys.stderr)
        finally:
            proc.kill()
    serve16 = row["serve_16"]["tokens_per_s"] if "serve_16" in row else None
    if serve16:
        row["serve16_over_generator"] = serve16 / row["generator_batch16_tokens_per_s"]
        row["serve16_over_naive"] = serve16 / row["naive_16"]["tokens_per_s"]
    first, second = args.rss_requests
    row["rss_growth_mb"] = row["rss_mb_after"][second] - row["rss_mb_after"][first]
    return row


def naive_server(folder: str, port: int):
    """`generate()` per request, one at a time (a lock), the whole answer as one server-sent event."""
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    import neox_jax
    from neox_jax.pretrained import load_tokenizer

    model, tok = neox_jax.from_pretrained(folder), load_tokenizer(folder)
    lock = threading.Lock()

    def run(ids, n):
        with lock:
            return neox_jax.generate(model, [ids], n, stop_ids=[tok.eod_id])[0]

    async def completions(request):
        body = await request.json()
        new = await asyncio.to_thread(run, body["prompt"], body["max_tokens"])
        chunk = {"choices": [{"index": 0, "text": tok.decode([t for t in new if t != tok.eod_id])}]}
        usage = {"choices": [], "usage": {"completion_tokens": len(new)}}

        async def events():
            yield f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(request):
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["pythia-70m", "pythia-160m"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--rss-requests", nargs=2, type=int, default=[200, 2000])
    p.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER)
    p.add_argument("--naive", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive:
        return naive_server(args.naive, args.port)
    if not args.tokenizer.is_file():
        raise SystemExit(f"--tokenizer {args.tokenizer}: not found (the GPT-NeoX-20B tokenizer.json)")
    for preset in args.presets:
        row = bench(preset, args)
        print(json.dumps(row), flush=True)
        at16 = (f"16 clients / Generator batch 16 = {row['serve16_over_generator']:.2f} (>= 0.85); / naive = "
                f"{row['serve16_over_naive']:.1f}x (>= 3); " if "serve16_over_generator" in row else "")
        print(f"[{preset}] targets: {at16}RSS growth {row['rss_growth_mb']:.1f} MB (<= 50)", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
