"""The continuous-batching engine against `generate()` and a full forward pass: every request of a mixed load gets
what it would get alone, prompts are prefilled once, nothing compiles under traffic, a cancelled sequence's slot is
reused at once."""

import threading
import time

import jax
import numpy as np
import pytest

from neox_jax.batching import Engine, QueueFull, Request, split_prompt
from neox_jax.generation import Sampling, generate


class Collector:
    """A request's events, gathered as the engine sends them."""

    def __init__(self, n: int = 1):
        self.tokens = [[] for _ in range(n)]
        self.logprobs = [[] for _ in range(n)]
        self.finish = {}
        self.prompt = None
        self.done = threading.Event()
        self.n = n

    def __call__(self, event):
        if event[0] == "token":
            self.tokens[event[1]].append(event[2])
            self.logprobs[event[1]].append(event[3])
        elif event[0] == "prompt":
            self.prompt = event[1:]
        elif event[0] == "done":
            self.finish[event[1]] = event[2]
            if len(self.finish) == self.n:
                self.done.set()


def wait_idle(engine, timeout=60):
    deadline = time.monotonic() + timeout
    while not engine.idle():
        assert time.monotonic() < deadline, "the engine did not finish its requests"
        time.sleep(0.01)


def test_every_request_of_a_mixed_load_gets_what_generate_gives_it_alone(engine, serving_model):
    """24 requests (prompts of 1-90 tokens, so one to three chunks; 1-30 new tokens; greedy and seeded sampling with
    and without top-k / top-p; n of 1 or 2; stop ids) submitted in waves while others decode, through 4 slots: each
    choice equals generate() on its prompt alone (choice j as row j of generate(seed)); each prompt prefilled once,
    whatever its n; no compilation."""
    _, model, _ = serving_model
    rng = np.random.RandomState(0)
    jobs = []
    before = engine.compilations, engine.stats["prefilled_tokens"]
    for i in range(24):
        prompt = rng.randint(1, 384, rng.randint(1, 90)).tolist()
        sampling = [Sampling(), Sampling(0.9, 0, 0.0, 100 + i), Sampling(1.0, 20, 0.9, 7 * i)][i % 3]
        n = 2 if i % 4 == 1 else 1
        stop_ids = (int(rng.randint(1, 384)),) if i % 5 == 0 else ()
        out = Collector(n)
        jobs.append((prompt, int(rng.randint(1, 31)), sampling, n, stop_ids, out))
        engine.submit(Request(prompt, jobs[-1][1], out, sampling, n=n, stop_ids=stop_ids))
        if i % 6 == 5:
            time.sleep(0.2)  # the next wave joins a running batch
    wait_idle(engine)
    assert engine.compilations == before[0], "a program compiled under traffic"
    assert engine.stats["prefilled_tokens"] - before[1] == sum(len(job[0]) for job in jobs)
    for prompt, max_tokens, s, n, stop_ids, out in jobs:
        want = generate(model, [prompt] * n, max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        seed=s.seed, stop_ids=stop_ids)
        for j in range(n):
            stopped = bool(want[j]) and want[j][-1] in stop_ids
            assert out.tokens[j] == (want[j][:-1] if stopped else want[j]), (prompt, s, j)
            assert out.finish[j] == ("stop" if stopped else "length")


def test_the_test_model_separates_its_greedy_choices(serving_model):
    """What makes the equality above meaningful: the engine and generate() compute the same logits up to rounding
    (different batch shapes and cache lengths sum in other orders, ~1e-6 here); a greedy choice is only guaranteed
    where its top two logits are further apart than that, which this model's are by far."""
    _, model, _ = serving_model
    prompt = np.random.RandomState(1).randint(1, 384, 40).tolist()
    new = generate(model, [prompt], 30)[0]
    logits = np.asarray(model(np.asarray([prompt + new])))[0, len(prompt) - 1:-1]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4


def test_prompt_scores_equal_a_full_forward(engine, serving_model):
    """Echo's log-probabilities of a 70-token prompt (three chunks: 32, 32, 8) and of the generated tokens equal
    log_softmax of one forward pass over the whole text."""
    _, model, _ = serving_model
    prompt = np.random.RandomState(2).randint(1, 384, 70).tolist()
    assert split_prompt(70, 32) == [(0, 32), (32, 32), (64, 8)]
    out = Collector()
    engine.submit(Request(prompt, 3, out, logprobs=True, prompt_logprobs=True))
    assert out.done.wait(30)
    full = prompt + out.tokens[0]
    logp = np.asarray(jax.nn.log_softmax(model(np.asarray([full]))[0], axis=-1))
    want = [logp[i - 1, t] for i, t in enumerate(full)][1:]
    scores, top = out.prompt
    assert scores[0] is None and top[0] is None
    np.testing.assert_allclose(scores[1:] + out.logprobs[0], want, atol=1e-5)
    ids, lps = top[5]
    assert ids == np.argsort(-logp[4])[:5].tolist()
    np.testing.assert_allclose(lps, np.sort(logp[4])[::-1][:5], atol=1e-5)
    scored = Collector()  # max_tokens 0: the prompt's scores only
    engine.submit(Request(prompt, 0, scored, prompt_logprobs=True))
    assert scored.done.wait(30) and scored.finish == {0: "length"} and scored.tokens == [[]]
    np.testing.assert_allclose(scored.prompt[0][1:], scores[1:], atol=1e-6)


def test_a_cancelled_sequence_frees_its_slot_for_the_next_request(engine):
    """Four sequences of 120 tokens fill the slots, a fifth request waits; the second is cancelled at its fifth token
    (from the engine's own callback, so no timing is involved): the waiting request runs in its slot at once, while
    the other three are still decoding."""
    long = [Collector() for _ in range(engine.slots)]
    requests = [Request([5, 6, 7], 120, out) for out in long]
    seen = {}

    def cancel_at_fifth(event):
        long[1](event)
        if event[0] == "token" and len(long[1].tokens[0]) == 5:
            requests[1].cancel()

    requests[1].on_event = cancel_at_fifth
    waiting = Collector()

    def record(event):
        waiting(event)
        if event[0] == "token":
            seen.setdefault("first", [len(out.tokens[0]) for out in long])

    for r in requests + [Request([9, 10], 2, record)]:
        engine.submit(r)
    assert waiting.done.wait(30) and waiting.finish == {0: "length"}
    assert long[1].finish == {0: "cancelled"} and len(long[1].tokens[0]) <= 7
    assert max(seen["first"]) < 20, f"the waiting request started only after {seen['first']} tokens of the others"
    wait_idle(engine)
    assert [len(out.tokens[0]) for out in long if out is not long[1]] == [120] * 3


def test_bad_requests_and_a_full_queue(engine):
    with pytest.raises(ValueError, match="prompt of 100 tokens \\+ max_tokens=40 exceeds the context of 128"):
        engine.submit(Request([1] * 100, 40, print))
    with pytest.raises(ValueError, match="n=5: must be in 1 .. 4"):
        engine.submit(Request([1], 4, print, n=5))
    with pytest.raises(ValueError, match="token id 384 is outside the vocabulary"):
        engine.submit(Request([1, 384], 4, print))
    held = engine.max_queue
    engine.max_queue = 0
    try:
        with pytest.raises(QueueFull, match="--max-queue=0"):
            engine.submit(Request([1], 4, print))
    finally:
        engine.max_queue = held


@pytest.mark.slow
def test_tensor_parallel_engine_equals_one_device(serving_model):
    """Weights and the KV cache split over tensor=2 (the cache by heads): greedy choices as on one device."""
    from neox_jax import from_pretrained
    from neox_jax.sharding import make_mesh

    folder, model, _ = serving_model
    sharded = from_pretrained(folder, mesh=make_mesh({"data": 1, "pipe": 1, "tensor": 2}, jax.devices()[:2]))
    eng = Engine(sharded, slots=2, max_context=64, chunk=16)
    assert eng.copies is None and eng.state["cache"]["k"].sharding.spec[2] == "tensor"
    eng.start()
    prompts = [np.random.RandomState(3).randint(1, 384, n).tolist() for n in (5, 20, 33)]
    outs = [Collector() for _ in prompts]
    for p, out in zip(prompts, outs):
        eng.submit(Request(p, 12, out))
    assert eng.close(60)
    for p, out in zip(prompts, outs):
        assert out.tokens[0] == generate(model, [p], 12)[0]
