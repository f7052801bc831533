"""`neox-jax serve` through real clients: the `openai` package, lm-eval's `local-completions`, raw HTTP for the
errors; SIGTERM on a real server process."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from neox_jax.generation import generate

from .conftest import require

openai = require("openai")
httpx = require("httpx")
require("uvicorn")
KEY = "test-key-0123456789abcdef"


@contextlib.contextmanager
def serving(engine, tok, chat=True, **settings):
    """A Service over the shared engine on 127.0.0.1 (a free port), uvicorn in a thread -> (base url, service)."""
    import uvicorn

    from neox_jax.serve import Service, Settings

    encoder = None
    if chat:
        from neox_jax.inference_commands import _chat_encoder

        encoder = _chat_encoder(tok, None)
    service = Service(engine, tok, Settings(name="tiny", keys=[KEY.encode()], **settings), encoder)
    server = uvicorn.Server(uvicorn.Config(service.app(), host="127.0.0.1", port=0, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(engine, serving_model):
    with serving(engine, serving_model[2]) as (url, service):
        yield url, service


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_completions_through_the_openai_client(server, serving_model):
    """Text and token-id prompts, n, usage; greedy text equals generate()'s; echo with logprobs (the prompt's own,
    the first null) and the top alternatives; the returned model list."""
    url, _ = server
    _, model, tok = serving_model
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    prompt = "the cat sat on the"
    ids = tok.encode(prompt)
    want = generate(model, [ids], 12)[0]
    r = c.completions.create(model="tiny", prompt=[prompt, prompt], max_tokens=12, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert all(ch.text == tok.decode(want) and ch.finish_reason == "length" for ch in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2 * len(ids), 48)
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt + tok.decode(want[:3])
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
    assert lp.text_offset[:len(ids) + 1] == [len(tok.decode(ids[:j])) for j in range(len(ids) + 1)]
    assert all(len(top) == 2 and max(top.values()) == lp.token_logprobs[len(ids) + i]
               for i, top in enumerate(lp.top_logprobs[len(ids):]))  # greedy: each token is its position's best


def test_a_mixed_concurrent_load_through_the_openai_client(server, serving_model, engine):
    """32 requests at once from 16 threads (prompts of 1-60 tokens, 1-40 new, n 1 or 2, streamed or not, greedy or
    seeded): every choice's text is generate()'s for its prompt alone, each prompt was prefilled once whatever its n,
    and nothing compiled under the load."""
    from concurrent.futures import ThreadPoolExecutor

    url, _ = server
    _, model, tok = serving_model
    c = client(url)
    rng = np.random.RandomState(5)
    jobs = [dict(prompt=rng.randint(1, 384, rng.randint(1, 61)).tolist(), max_tokens=int(rng.randint(1, 41)),
                 n=1 + (i % 5 == 0), temperature=0.0 if i % 2 else 0.7, seed=i, stream=i % 3 == 0) for i in range(32)]

    def run(job):
        if not job["stream"]:
            return [ch.text for ch in c.completions.create(model="tiny", **job).choices]
        texts = [""] * job["n"]
        for chunk in c.completions.create(model="tiny", **job):
            texts[chunk.choices[0].index] += chunk.choices[0].text
        return texts

    compiled, prefilled = engine.compilations, engine.stats["prefilled_tokens"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(run, jobs))
    assert engine.compilations == compiled
    assert engine.stats["prefilled_tokens"] - prefilled == sum(len(job["prompt"]) for job in jobs)  # once each
    for job, texts in zip(jobs, answers):
        want = generate(model, [job["prompt"]] * job["n"], job["max_tokens"], temperature=job["temperature"],
                        seed=job["seed"], stop_ids=[tok.eod_id])
        assert texts == [tok.decode([t for t in row if t != tok.eod_id]) for row in want], job


def test_sampling_is_reproducible_from_the_seed(server, serving_model):
    url, _ = server
    _, model, tok = serving_model
    c = client(url)
    ids = tok.encode("a dog ran")
    args = dict(model="tiny", prompt=ids, max_tokens=10, temperature=0.9, top_p=0.95, seed=11, n=2)
    a, b = c.completions.create(**args), c.completions.create(**args)
    want = generate(model, [ids] * 2, 10, temperature=0.9, top_p=0.95, seed=11, stop_ids=[tok.eod_id])
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices] == \
        [tok.decode([t for t in row if t != tok.eod_id]) for row in want]


def test_stop_strings_also_across_tokens_and_streaming(server, serving_model):
    """A stop string made of the end of one token and the start of the next ends the text before it, streamed or
    not; streamed chunks add up to the whole text, the held-back prefix of the stop string never sent."""
    url, _ = server
    _, model, tok = serving_model
    c = client(url)
    ids = tok.encode("the cat sat")
    new = generate(model, [ids], 20)[0]
    pieces = [tok.decode(new[:i]) for i in range(len(new) + 1)]
    i = next(i for i in range(3, 15) if len(pieces[i]) - len(pieces[i - 1]) >= 2 and
             len(pieces[i + 1]) - len(pieces[i]) >= 2 and pieces[i + 1].count(pieces[i + 1][len(pieces[i]) - 1:]) == 1)
    stop = pieces[i + 1][len(pieces[i]) - 1:len(pieces[i]) + 1]  # last character of token i, first of token i + 1
    full = c.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0, stop=[stop, "never"])
    assert full.choices[0].text == pieces[i][:-1] and full.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0, stop=stop,
                                       stream=True, stream_options={"include_usage": True}))
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert "".join(texts) == pieces[i][:-1]
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == i + 1
    streamed = c.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == tok.decode(new)


def test_chat_completions_with_the_tokenizers_template(server, serving_model, engine):
    url, _ = server
    _, model, tok = serving_model
    c = client(url)
    messages = [{"role": "user", "content": "the cat sat"}]
    ids = tok.encode("<|user|>the cat sat\n<|assistant|>")
    want = generate(model, [ids], 8, stop_ids=[tok.eod_id])[0]
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                  top_logprobs=1)
    assert r.choices[0].message.content == tok.decode([t for t in want if t != tok.eod_id])
    assert r.choices[0].message.role == "assistant" and len(r.choices[0].logprobs.content) == len(want)
    assert r.usage.prompt_tokens == len(ids)
    streamed = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == r.choices[0].message.content
    with serving(engine, tok, chat=False) as (other, _):
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client(other).chat.completions.create(model="tiny", messages=messages)


def post(url, body, key=KEY, raw=None, **headers):
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(url + "/v1/completions", content=raw if raw is not None else json.dumps(body),
                      headers={"Content-Type": "application/json", **headers}, timeout=30)


@pytest.mark.parametrize("body, field, message", [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens=-1: must be >= 0"),
    ({"prompt": "x", "top_p": 1.5}, "top_p", "top_p=1.5: must be > 0 and <= 1"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "temperature='hot': expected a number"),
    ({"prompt": "x", "n": True}, "n", "n=True: expected an integer"),
    ({"prompt": 5}, "prompt", "prompt: expected a string"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias", "logit_bias={'5': 1} is not supported"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "presence_penalty=0.5 is not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of", "best_of=3 is not supported"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate", "frobnicate: unknown field"),
    ({"prompt": "x", "max_tokens": 200}, "max_tokens", "max_tokens=200 is above this server's cap of 128"),
    ({"prompt": [1, 2, 999]}, "prompt", "token id 999 is outside the vocabulary"),
    ({"prompt": [[1] * 100], "max_tokens": 40}, "max_tokens", "more than the context of 128 tokens"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field, message):
    url, _ = server
    r = post(url, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and message in error["message"] and error["type"] == "invalid_request_error"


def test_every_problem_is_named_at_once_and_malformed_json_is_refused(server):
    url, _ = server
    r = post(url, {"prompt": "x", "top_p": 2, "n": 0})
    assert r.status_code == 400 and "top_p=2" in r.json()["error"]["message"] and "n=0" in r.json()["error"]["message"]
    r = post(url, None, raw=b'{"prompt": "x",')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_keys_limits_caps_and_a_full_queue(engine, serving_model, caplog):
    """401 without or with a wrong key (the key, and prompts, never logged); 429 past the request limit with a
    Retry-After after which the request goes through; 413 past the body cap; 400 past the prompt cap; 503 with a full
    queue."""
    import logging

    caplog.set_level(logging.INFO, "neox_jax.serve")
    tok = serving_model[2]
    with serving(engine, tok, limits={"requests": (2.0, 2.0)}, max_body_bytes=400,
                 max_prompt_tokens=20) as (url, _):
        assert post(url, {"prompt": "x"}, key=None).status_code == 401
        wrong = post(url, {"prompt": "x"}, key="wrong-key-0123456789abc")
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert [post(url, {"prompt": "x", "max_tokens": 1}).status_code for _ in range(2)] == [200, 200]
        limited = post(url, {"prompt": "x", "max_tokens": 1})
        assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
        time.sleep(int(limited.headers["Retry-After"]))
        assert post(url, {"prompt": "x", "max_tokens": 1}).status_code == 200
        time.sleep(1.5)
        big = post(url, {"prompt": "x" * 500})
        assert big.status_code == 413 and "cap of 400 (--max-body-bytes)" in big.json()["error"]["message"]
        assert post(url, {"prompt": "private words here", "max_tokens": 1}).status_code == 200
        long = post(url, {"prompt": list(range(1, 30))})
        assert long.status_code == 400 and "more than this server's cap of 20 (--max-prompt-tokens)" in long.text
        time.sleep(1.0)
        held, engine.max_queue = engine.max_queue, 0
        try:
            busy = post(url, {"prompt": "x"})
        finally:
            engine.max_queue = held
        assert busy.status_code == 503 and busy.headers["Retry-After"]
    assert KEY not in caplog.text and "wrong-key" not in caplog.text and "private words" not in caplog.text
    assert "request cmpl-" in caplog.text  # the requests were logged, by counts


def hold_engine(engine):
    """(held, gate): a request whose first token blocks the engine's thread until `gate` is set, `held` set once it
    does (so what the test does next happens while nothing decodes)."""
    from neox_jax.batching import Request

    held, gate = threading.Event(), threading.Event()

    def hold(event):
        if event[0] == "token" and not held.is_set():
            held.set()
            gate.wait(10)

    engine.submit(Request([5, 6], 2, hold))
    assert held.wait(10)
    return gate


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_client_leaving_mid_stream_frees_its_slot(server, engine):
    """A stream of 120 tokens is left after its first chunk, while the engine is held: its sequence is cancelled
    (the request closed) before the engine goes on, so it draws at most one more token, and the next request runs."""
    url, service = server
    with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                      json={"prompt": [5, 6], "max_tokens": 120, "temperature": 0, "stream": True}) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data:"))
        gate = hold_engine(engine)
        generated = engine.stats["generated_tokens"]
    try:
        assert wait_for(lambda: service.in_flight == 0), "the stream's request was not closed"
    finally:
        gate.set()
    assert wait_for(engine.idle)
    assert engine.stats["generated_tokens"] - generated <= 3  # the holder's second token, one step in flight
    assert post(url, {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_client_leaving_before_its_answer_cancels_its_sequence(server, engine, caplog):
    """Not streaming: the server watches the connection while the request waits and cancels it when the client
    goes (here while the engine is held, so the request is still queued: it is dropped unprefilled)."""
    import logging

    url, _ = server
    caplog.set_level(logging.INFO, "neox_jax.serve")
    gate = hold_engine(engine)
    prefilled = engine.stats["prefilled_tokens"]
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3,
                       json={"prompt": [7, 8, 9], "max_tokens": 100, "temperature": 0})
        assert wait_for(lambda: "the client disconnected; its sequences are cancelled" in caplog.text)
    finally:
        gate.set()
    assert wait_for(engine.idle) and engine.stats["prefilled_tokens"] == prefilled  # dropped from the queue


def test_metrics_parse_and_count_the_requests(engine, serving_model):
    from prometheus_client.parser import text_string_to_metric_families

    compiled = engine.compilations
    with serving(engine, serving_model[2]) as (url, _):
        made = [post(url, {"prompt": f"the cat {i}", "max_tokens": 4, "temperature": 0}) for i in range(3)]
        assert [r.status_code for r in made] == [200] * 3
        tokens = [r.json()["usage"]["completion_tokens"] for r in made]
        assert post(url, {"prompt": "x"}, key=None).status_code == 401
        assert post(url, {"prompt": "x", "top_p": 9}).status_code == 400
        streamed = list(client(url).completions.create(model="tiny", prompt="a", max_tokens=3, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
        tokens.append(streamed[-1].usage.completion_tokens)
        text = httpx.get(url + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("neox_jax_requests_total", (("endpoint", "completions"), ("status", "200")))] == 4
    assert samples[("neox_jax_requests_total", (("endpoint", "completions"), ("status", "401")))] == 1
    assert samples[("neox_jax_rejections_total", (("reason", "unauthorized"),))] == 1
    assert samples[("neox_jax_rejections_total", (("reason", "invalid"),))] == 1
    assert samples[("neox_jax_time_to_first_token_seconds_count", ())] == 4
    assert samples[("neox_jax_inter_token_latency_seconds_count", ())] == sum(tokens) - 4
    assert samples[("neox_jax_compilations_total", ())] == engine.compilations == compiled  # none under traffic
    assert ("neox_jax_queue_length", ()) in samples and ("neox_jax_active_sequences", ()) in samples


@pytest.mark.slow
def test_lm_eval_local_completions_equals_the_neox_jax_backend(server, serving_model, tmp_path, monkeypatch):
    """lm-eval's `local-completions` model (token-id prompts, echo, logprobs=1, max_tokens=1) through the server
    gives the log-likelihoods and greedy flags `neox-jax lm-eval`'s backend computes in process."""
    lm_eval = require("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    url, _ = server
    folder = serving_model[0]
    docs = [{"question": f"Q{i}: the cat sat on the", "choices": [" mat", " dog", " w12 w7"], "answer": i % 3}
            for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mc.yaml").write_text(
        "task: neox_serve_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n')
    import neox_jax.harness  # noqa: F401
    from lm_eval.tasks import TaskManager

    def run(model, args):
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["neox_serve_mc"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path)))
        return [resp for sample in out["samples"]["neox_serve_mc"] for (resp,) in sample["resps"]]

    served = run("local-completions", f"base_url={url}/v1/completions,model=tiny,tokenizer={folder},"
                                      "tokenizer_backend=huggingface,max_length=128,num_concurrent=1,max_retries=1")
    local = run("neox-jax", f"path={folder}")
    assert len(served) == len(local) == 12
    for (a, greedy_a), (b, greedy_b) in zip(served, local):
        assert float(a) == pytest.approx(float(b), abs=1e-4) and bool(greedy_a) == bool(greedy_b)


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(serving_model, tmp_path):
    """A real `neox-jax serve` process with one slot: eight requests accepted (one decoding, the rest queued) when
    SIGTERM comes are all answered in full, new
    connections are refused, and the process exits 0; the API key is in no log line."""
    folder = serving_model[0]
    keys = tmp_path / "keys"
    keys.write_text(f"# the test's key\n{KEY}\n")
    port = 18000 + os.getpid() % 1000
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-m", "neox_jax.cli", "serve", "--model", str(folder), "--port",
                             str(port), "--max-batch", "1", "--max-context", "256", "--prefill-chunk", "16",
                             "--api-keys", str(keys), "--grace", "60"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        results = []

        def one(i):
            r = post(url, {"prompt": [5 + i, 6], "max_tokens": 200, "temperature": 0})
            results.append((r.status_code, r.json()["choices"][0]["finish_reason"], r.json()["usage"]))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        def accepted():
            health = httpx.get(url + "/health").json()
            return health["active"] + health["waiting"] + len(results) == 8

        assert wait_for(accepted, 30)  # one slot: one decoding, the others queued
        proc.send_signal(signal.SIGTERM)
        answered_before = len(results)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
        assert answered_before < 8 and len(results) == 8 and all(status == 200 for status, _, _ in results)
        assert all(finish in ("length", "stop") and usage["completion_tokens"] for _, finish, usage in results)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "shutting down" in log and KEY not in log


def test_text_is_sent_in_whole_characters_and_never_shows_a_stop_strings_start(serving_model):
    """Byte-level tokens that split a character: nothing is sent until the character is whole; text that may begin
    a stop string is held back, and sent when it turns out not to."""
    from neox_jax.openai_api import ChoiceText, token_text

    tok = serving_model[2]
    ids = [i for ch in "日本" for i in tok.tokenizer.encode(ch).ids]
    split = [t for t in ids if "\ufffd" in tok.decode([t])]
    assert split, "the test tokenizer has byte tokens inside a character"
    assert token_text(tok, split[0]).startswith("bytes:\\x")
    text = ChoiceText(tok, ())
    sent = []
    for t in ids:
        text.push(t)
        sent.append(text.take()[0])
    assert all("\ufffd" not in piece for piece in sent) and "".join(sent) == "日本"
    for seed in range(5):  # incremental detokenization equals decoding the whole output, broken bytes included
        ids = np.random.RandomState(seed).randint(0, 384, 200).tolist()
        text = ChoiceText(tok, ())
        pieces = []
        for t in ids:
            text.push(t)
            pieces.append(text.take()[0])
        assert "".join(pieces) + text.take(final=True)[0] == tok.decode(ids)
    text = ChoiceText(tok, ("cat sat",))
    pieces = []
    for t in tok.encode("the cat ran"):
        text.push(t)
        pieces.append(text.take()[0])
    assert not any(p.endswith("cat") for p in pieces), "'cat' may begin the stop string: held back"
    assert "".join(pieces) + text.take(final=True)[0] == "the cat ran" and not text.stopped


def test_serve_refuses_bad_settings_before_loading(serving_model, tmp_path, capsys):
    from neox_jax.cli import main as cli

    folder = str(serving_model[0])
    assert cli(["serve", "--model", folder, "--mesh", "data=2,tensor=2", "--grace", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--grace=-1.0: must be >= 0" in err and "over `tensor` only" in err and "data=2 is not supported" in err
    assert cli(["serve", "--model", folder, "--rate-limit", "requests=5/day"]) == 2
    assert "'requests=5/day' is not requests=N/UNIT" in capsys.readouterr().err
    (tmp_path / "keys").write_text("short\n")
    assert cli(["serve", "--model", folder, "--api-keys", str(tmp_path / "keys")]) == 2
    assert "shorter than 16 characters" in capsys.readouterr().err


def test_token_limits_count_prompt_and_max_tokens_per_key():
    from neox_jax.access import RateLimiter, authenticate, key_id, parse_limits

    limiter = RateLimiter(parse_limits("tokens=100/m"))
    assert limiter.take("a", 60) == 0 and limiter.take("b", 60) == 0  # per key
    wait = limiter.take("a", 60)
    assert 0 < wait <= 60 * 20 / 100 + 1e-6  # 20 more tokens at 100 per minute
    assert "needs 101 tokens" in limiter.check_cost(101)
    with pytest.raises(ValueError, match="'tokens=5/day' is not requests=N/UNIT"):
        parse_limits("requests=2/s,tokens=5/day")
    keys = [b"k" * 20, b"j" * 20]
    assert authenticate(keys, "Bearer " + "j" * 20) == key_id(b"j" * 20)
    assert authenticate(keys, "Bearer " + "j" * 19) is None and authenticate(keys, None) is None
    assert authenticate([], None) == ""
