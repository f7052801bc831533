"""Log-likelihoods and rolling perplexity against transformers; the lm-eval backend against lm-eval's `hf`."""

import json

import numpy as np
import pytest

from neox_jax.data.tokenizer import train_tokenizer
from neox_jax.evaluate import Scorer, perplexity, rolling_windows
from tests.conftest import hf_and_neox

from .conftest import require

torch = require("torch")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    return (*hf_and_neox(folder, max_position_embeddings=64), folder)


def hf_continuation_logprob(hf, ctx, cont):
    seq = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        logp = torch.log_softmax(hf(seq).logits.float(), -1)[0]
    n = len(ctx)
    return sum(float(logp[n - 1 + j, t]) for j, t in enumerate(cont))


def test_loglikelihoods_equal_transformers(pair):
    hf, model, _ = pair
    rng = np.random.RandomState(1)
    pairs = [(list(rng.randint(1, 384, rng.randint(1, 40))), list(rng.randint(1, 384, rng.randint(1, 12))))
             for _ in range(21)]
    scores = Scorer(model, batch_size=8, bucket=16).loglikelihood(pairs)
    for (ctx, cont), (logp, greedy) in zip(pairs, scores):
        assert logp == pytest.approx(hf_continuation_logprob(hf, ctx, cont), abs=1e-4)
    # greedy: a continuation made of the argmax tokens is greedy, a perturbed one is not
    ctx = pairs[0][0]
    with torch.no_grad():
        best = int(hf(torch.tensor([ctx])).logits[0, -1].argmax())
    (_, yes), (_, no) = Scorer(model).loglikelihood([(ctx, [best]), (ctx, [(best + 1) % 384])])
    assert yes and not no


def test_rolling_windows_cover_every_token_once():
    tokens = list(range(100, 237))
    windows = rolling_windows(tokens, 0, 32)
    assert [t for _, cont in windows for t in cont] == tokens
    assert all(len(ctx) + len(cont) - 1 <= 32 for ctx, cont in windows)
    assert windows[0][0] == [0] and windows[1][0][-1] == tokens[31]


def test_rolling_perplexity_equals_transformers(pair):
    hf, model, _ = pair
    doc = list(np.random.RandomState(2).randint(1, 384, 150))  # longer than the 64-token context
    ours = Scorer(model, batch_size=4, bucket=16).rolling_loglikelihood(doc, prefix_token=0)
    ref = sum(hf_continuation_logprob(hf, ctx, cont) for ctx, cont in rolling_windows(doc, 0, 64))
    assert ours == pytest.approx(ref, abs=1e-3)
    result = perplexity(Scorer(model), [doc], 0, num_bytes=600)
    assert result["perplexity"] == pytest.approx(np.exp(-ref / 150), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(-ref / 600 / np.log(2), rel=1e-5)


def test_scorer_rejects_bad_requests(pair):
    _, model, _ = pair
    with pytest.raises(ValueError, match="max_length=100 exceeds"):
        Scorer(model, max_length=100)
    with pytest.raises(ValueError, match="pair 0 has an empty continuation"):
        Scorer(model).loglikelihood([([1], [])])


TASK = """task: neox_local_{kind}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
"""


@pytest.mark.slow
def test_lm_eval_backend_matches_lm_evals_hf_backend(pair, tmp_path, monkeypatch):
    lm_eval = require("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, _, folder = pair
    # a tokenizer that fits the model's 384 tokens, saved where both backends look for it
    words = [f"w{i}" for i in range(300)]
    tok = train_tokenizer([" ".join(words)] * 3 + ["the cat sat on the mat. a dog ran."] * 20, 384,
                          folder / "tokenizer.json", min_frequency=1)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>",
         "model_max_length": 64}))
    assert tok.is_file()
    docs = [{"question": f"Q{i}: the cat sat on the", "choices": [" mat", " dog", " w12 w7"], "answer": i % 3,
             "text": f"the cat sat on the mat {i} " * (3 + i)} for i in range(6)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    mc = TASK.format(kind="multiple_choice", data=tmp_path / "data.jsonl") + (
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n")
    rolling = TASK.format(kind="loglikelihood_rolling", data=tmp_path / "data.jsonl") + (
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
        "  - metric: bits_per_byte\n")
    (tmp_path / "mc.yaml").write_text(mc)
    (tmp_path / "rolling.yaml").write_text(rolling)

    import neox_jax.harness  # noqa: F401  (registers the `neox-jax` model)
    from lm_eval.tasks import TaskManager

    def run(model, model_args):
        out = lm_eval.simple_evaluate(model=model, model_args=model_args,
                                      tasks=["neox_local_multiple_choice", "neox_local_loglikelihood_rolling"],
                                      task_manager=TaskManager(include_path=str(tmp_path)), batch_size=4,
                                      log_samples=True)
        return out

    ours = run("neox-jax", f"path={folder}")
    ref = run("hf", f"pretrained={folder},dtype=float32,device=cpu")
    for task, metrics in ref["results"].items():
        for name, value in metrics.items():
            if isinstance(value, float) and "stderr" not in name:
                assert ours["results"][task][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (task, name)
    # per-request log-likelihoods agree too, not only the aggregates
    ours_ll = [r["resps"] for r in ours["samples"]["neox_local_multiple_choice"]]
    ref_ll = [r["resps"] for r in ref["samples"]["neox_local_multiple_choice"]]
    for a, b in zip(ours_ll, ref_ll):
        for (la,), (lb,) in zip(a, b):
            assert float(la[0]) == pytest.approx(float(lb[0]), abs=1e-4) and bool(la[1]) == bool(lb[1])


@pytest.mark.slow
def test_lm_eval_generate_until_batches_and_stops_like_lm_evals_hf(pair, tmp_path, monkeypatch):
    require("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, _, folder = pair
    if not (folder / "tokenizer.json").is_file():
        words = [f"w{i}" for i in range(300)]
        train_tokenizer([" ".join(words)] * 3 + ["the cat sat on the mat. a dog ran."] * 20, 384,
                        folder / "tokenizer.json", min_frequency=1)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
             "pad_token": "<|padding|>", "model_max_length": 64}))
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from neox_jax.harness import NeoXJaxLM

    def request(ctx, until, n=12):
        return Instance("generate_until", {}, (ctx, {"until": until, "max_gen_toks": n, "do_sample": False}), 0)

    # random weights ramble: pick stop strings from what the model actually writes, so that they cut
    ours = NeoXJaxLM(path=str(folder), batch_size=3)
    free = ours.generate_until([request(c, []) for c in ("the cat", "a dog ran", "w1 w2 w3", "the")])
    stops = [[t[3:6]] if len(t) > 6 else ["\n\n"] for t in free]
    requests = [request(c, s) for c, s in zip(("the cat", "a dog ran", "w1 w2 w3", "the"), stops)]
    requests.append(request("the mat", [], n=5))
    got = ours.generate_until(requests)
    want = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=2).generate_until(requests)
    assert got == want
    assert any(s[0] not in g and len(g) < len(f) for g, s, f in zip(got, stops, free))  # a stop really cut

    with pytest.raises(ValueError, match=r"unknown key 'max_lenght' \(did you mean 'max_length'\?\)"):
        NeoXJaxLM(path=str(folder), max_lenght=32)
