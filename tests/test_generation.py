"""KV-cache generation against transformers and against full forward passes; sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neox_jax.generation import Generator, Sampling, filter_logits, generate, sample
from tests.conftest import hf_and_neox, make_hf_model

from .conftest import require

torch = require("torch")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return hf_and_neox(tmp_path_factory.mktemp("hf"), max_position_embeddings=256)


PROMPTS = [list(np.random.RandomState(0).randint(2, 384, n)) for n in (5, 17, 40)]


@pytest.mark.parametrize("copies", ["cpu copies", "model's weights"])
def test_greedy_batch_equals_transformers_generate(pair, copies):
    """Through the CPU generator's per-layer weights and caches, and through the stacked ones every other backend
    (and several processes) reads."""
    hf, model = pair
    gen = Generator(model, copies=copies == "cpu copies")
    assert (gen.copies is None) == (copies != "cpu copies")
    ours = gen(PROMPTS, 64)
    width = max(map(len, PROMPTS))
    ids = torch.zeros((3, width), dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[:, width:].numpy()
    assert [len(o) for o in ours] == [64, 64, 64]
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_kv_cache_logits_equal_full_forward_at_every_step(pair):
    _, model = pair
    gen = Generator(model)
    state, knobs, spans = gen._start(PROMPTS, 12, 8, [], Sampling())  # cache spans read: 16, then 24
    forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
    tokens = [list(p) for p in PROMPTS]
    for step in range(12):
        # the cache's next-token logits vs a full pass over prompt + everything generated so far
        width = max(map(len, tokens))
        ids = np.zeros((3, width), np.int32)
        mask = np.zeros((3, width), np.int32)
        for i, t in enumerate(tokens):
            ids[i, width - len(t):], mask[i, width - len(t):] = t, 1
        full = np.asarray(forward(model, ids, mask))[:, -1]
        assert np.abs(np.asarray(state["logits"]) - full).max() <= 1e-5, step
        state = gen.step(state, knobs, spans)
        new = np.asarray(state["out"])[:, step]
        for i in range(3):
            tokens[i].append(int(new[i]))


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_decoding_writes_one_token_in_place_and_reads_its_span_as_it_lies(batch):
    """The compiled decode step and a whole generation's loops: the cache is updated in place (the step's donated,
    aliased, no cache-sized temporary), sized to the span the step reads (128 positions of the 1024 this generation
    needs; grown a span at a time), and never copied: the only ops that produce a layer's cache in the step are the
    in-place writes of one token's keys and values, and nothing in either program copies or transposes a cache (a
    slice of a longer cache was copied at every step: 1/3 of a pythia-160m step at batch 16; at batch 1 a [1, n, S, h]
    cache was copied four times per layer and step in the loop). On the CPU no layer's weights are sliced out of the
    stacked arrays or copied into another layout."""
    import re

    from neox_jax import GPTNeoX, NeoXConfig
    from neox_jax.generation import _decode_step, _generate

    cfg = NeoXConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, max_position_embeddings=2048)
    gen = Generator(GPTNeoX(cfg, rngs=nnx.Rngs(0)))
    state, knobs, spans = gen._start([[3] * 30] * batch, 900, 64, [], Sampling())
    assert spans == (128, 256, 512, 1024)  # the prompt's bucket of 64, then doubling up to 64 + 900 rounded up
    assert len(state["cache"]) == cfg.num_layers  # per-layer caches, with the per-layer weight copies
    groups, length, h = state["cache"][0]["k"].shape
    assert (groups, length, h) == (batch * cfg.num_heads, spans[0], cfg.head_dim)
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(state["cache"]))
    step = _decode_step.lower(gen.graphdef, gen.params, gen.copies, state, knobs, spans[0]).compile()
    memory = step.memory_analysis()
    assert memory.alias_size_in_bytes >= cache_bytes and memory.temp_size_in_bytes < cache_bytes / 10
    entry = step.as_text().split("\nENTRY ")[1]
    made = [op for op in re.findall(rf"%\S+ = f32\[{groups},{length},{h}\]\S* (\S+)\(", entry) if op != "parameter"]
    assert made == ["fusion"] * 2 * cfg.num_layers, made  # the writes: dynamic-update-slice fusions, in place
    assert set(re.findall(rf"f32\[{groups},(\d+),{h}\]", step.as_text())) == {"1", str(length)}  # written; read
    loops = _generate.lower(gen.graphdef, gen.params, gen.copies, state, jnp.int32(900), knobs, gen.replicated,
                            spans).compile().as_text()
    loops = loops[:loops.index("\nENTRY ")]  # the loops' bodies (the entry copies the caches it is given, once)
    for hlo in (step.as_text(), loops):
        for span in spans:  # as the cache lies, transposed, or with batch and heads apart
            shapes = (rf"({groups},{span},{h}|{groups},{h},{span}|1,{groups},{span},{h}|"
                      rf"{batch},{cfg.num_heads},{span},{h})")
            assert not re.findall(rf"%(copy\S*) = f32\[{shapes}\]", hlo)
    d, f = cfg.hidden_size, cfg.intermediate_size
    kernels = rf"f32\[({3 * d + f},{d}|{d},{d + f})\]"  # the fused layers' [out, in] kernels
    assert re.findall(rf"= {kernels}\S* parameter\(", entry)
    assert not [line for line in entry.splitlines() if re.search(rf"= {kernels}\S* \S+\(", line)
                and not re.search(r" (parameter|bitcast)\(", line)]  # read as they lie

    for _ in range(spans[0] - int(state["index"]) + 1):  # into the next span: the cache grows to it
        state = gen.step(state, knobs, spans)
    assert state["cache"][0]["v"].shape[1] == spans[1] and int(state["index"]) == spans[0] + 1


def test_generate_compiles_once_per_model_shape_and_bucket(pair):
    _, model = pair
    compiled = []

    def listener(event, _seconds, fun_name="", **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(fun_name)

    generate(model, PROMPTS[:2], 10)  # compiles (or finds what other tests compiled)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = generate(model, PROMPTS[:2], 10)  # a new Generator inside, the same shapes
        other = generate(model, [p[:3] for p in PROMPTS[:2]], 12)  # shorter prompts, the same 64-token buckets
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == [] and len(again) == len(other) == 2


def test_generate_keeps_the_generator_while_the_weights_are_the_same(pair):
    """`generate()` reuses the model's Generator (its CPU weight copies cost 10% of a short generation to make)
    until the model's weights are replaced; then the new weights are the ones read."""
    from neox_jax.generation import generator_for

    _, model = pair
    gen = generator_for(model)
    assert generator_for(model) is gen
    before = generate(model, PROMPTS[:2], 8)
    kernel = model.embed_out.kernel[...]
    model.embed_out.kernel[...] = -kernel  # greedy picks the least likely token instead
    try:
        assert generator_for(model) is not gen
        after = generate(model, PROMPTS[:2], 8)
        assert after == Generator(model)(PROMPTS[:2], 8) and after != before
    finally:
        model.embed_out.kernel[...] = kernel


def test_text_in_text_out(pair, tmp_path):
    from neox_jax.data.tokenizer import NeoXTokenizer, train_tokenizer
    from neox_jax.generation import generate_text

    _, model = pair
    path = train_tokenizer([f"alpha beta {i} gamma" for i in range(500)], 380, tmp_path / "tok.json")
    tok = NeoXTokenizer(path)
    want = generate(model, [tok.encode("alpha beta")], 16, stop_ids=[tok.eod_id])[0]
    text = generate_text(model, path, "alpha beta", 16)
    assert text == tok.decode([t for t in want if t != tok.eod_id])
    assert generate_text(model, tok, ["alpha beta", "gamma"], 16)[0] == text


def test_sampling_is_reproducible_for_a_seed(pair):
    _, model = pair
    a = generate(model, PROMPTS[:2], 20, temperature=1.0, top_k=50, seed=7)
    b = generate(model, PROMPTS[:2], 20, temperature=1.0, top_k=50, seed=7)
    c = generate(model, PROMPTS[:2], 20, temperature=1.0, top_k=50, seed=8)
    assert a == b and a != c


def test_stop_tokens_end_generation(pair):
    _, model = pair
    free = generate(model, PROMPTS[:1], 30)[0]
    stop = free[5]
    cut = generate(model, PROMPTS[:1], 30, stop_ids=[stop])[0]
    assert cut == free[:free.index(stop) + 1]


def test_top_k_and_top_p_never_leave_the_allowed_set():
    probs = np.array([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    logits = jnp.log(jnp.asarray(np.tile(probs, (4096, 1)), jnp.float32))
    keys = jax.random.split(jax.random.key(0), 4096)  # one per row

    def draws(top_k, top_p, temperature=1.0):
        return set(np.asarray(sample(logits, keys, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))))

    assert draws(3, 0.0) == {0, 1, 2}
    assert draws(0, 0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it: the smallest set holding 70%
    assert draws(0, 0.85) == {0, 1, 2}
    assert draws(2, 0.95) == {0, 1}  # both filters apply
    assert draws(0, 0.0) == {0, 1, 2, 3, 4, 5}  # both off: every token can come
    assert draws(5, 0.3, temperature=0.0) == {0}  # greedy
    kept = np.isfinite(np.asarray(filter_logits(logits[:1], jnp.int32(4), jnp.float32(0.0))))
    assert kept.tolist() == [[True, True, True, True, False, False]]


def test_bad_generation_requests(pair):
    _, model = pair
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=256"):
        generate(model, [[1] * 250], 10)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate(model, [[1]], 4, top_p=1.5)


def test_generate_cli_errors(tmp_path, capsys):
    from neox_jax.cli import main as cli

    make_hf_model().save_pretrained(tmp_path / "hf")
    assert cli(["generate", "--model", str(tmp_path / "hf"), "--prompt", "hi",
                "--tokenizer", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "not found" in err


def test_weight_copies_are_one_process_s(pair, monkeypatch):
    """`Generator(copies=True)` keeps the decode layouts on any backend, but not across processes, where each holds
    only its share of the weights: refused, naming the setting."""
    _, model = pair
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert Generator(model).copies is None  # the default reads the model's own weights there
    with pytest.raises(ValueError, match=r"Generator\(copies=True\).*several processes"):
        Generator(model, copies=True)
