"""Test setup: 8 emulated CPU devices (set before jax is imported) and shared helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# threads for collectives waiting on their peers, as distributed.emulate_cpu_devices gives the CLI's devices
os.environ.setdefault("PJRT_NPROC", "64")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from neox_jax import host_malloc  # noqa: E402

host_malloc.reuse_freed_memory()  # as the CLI does: the suite's compiled calls reuse the memory the last one freed

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# ../shared beside the checkout holds the real tokenizer, NeoX configs and NeoX-written data.
SHARED = Path(os.environ.get("NEOX_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture
def shared():
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data folder {SHARED / 'data'} is absent: set NEOX_JAX_SHARED to the folder "
                    "holding data/20B_tokenizer.json and data/neox-configs")
    return SHARED / "data"


def require(module: str, extra: str = "test"):
    """Import an optional dependency (the oracles torch, transformers, lm_eval; the notebooks' runner): skip without
    it, except where NEOX_JAX_REQUIRE_ORACLES=1 (CI sets it), where a missing one is a failure: its tests must run
    there."""
    if os.environ.get("NEOX_JAX_REQUIRE_ORACLES") == "1":
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is missing but NEOX_JAX_REQUIRE_ORACLES=1: install the {extra} extra ({e})")
    return pytest.importorskip(module, reason=f"needs the {extra} extra: pip install -e '.[{extra}]'")


def require_gpu_plan():
    """The gpu-plan extra (XLA's GPU compiler here): skipped without it, a failure where NEOX_JAX_REQUIRE_ORACLES=1."""
    from neox_jax import gpus

    lacking = gpus.missing()
    if lacking and os.environ.get("NEOX_JAX_REQUIRE_ORACLES") == "1":
        pytest.fail(f"{', '.join(lacking)} missing but NEOX_JAX_REQUIRE_ORACLES=1: {gpus.GPU_PLAN}")
    if lacking:
        pytest.skip(f"needs the gpu-plan extra ({', '.join(lacking)} missing): {gpus.GPU_PLAN}")


def make_hf_model(seed=0, classifier: bool = False, **overrides):
    """A transformers GPTNeoXForCausalLM (`classifier`: a GPTNeoXForSequenceClassification with one label, a reward
    model, its padding token the end-of-text one) with every parameter random (biases and LayerNorms too, so that a
    layout bug in any of them shows), fp32, eval mode."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    kwargs = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=160, rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=1024,
                  hidden_act="gelu", use_parallel_residual=True, layer_norm_eps=1e-5)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    if classifier:
        kwargs.update(num_labels=1, pad_token_id=GPTNeoXConfig(**kwargs).eos_token_id)
    model = (GPTNeoXForSequenceClassification if classifier else GPTNeoXForCausalLM)(GPTNeoXConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08 if p.ndim > 1 else 0.05)
    return model


# fp32 logits of ours against transformers on the same weights: the two sum in different orders (4.5e-7 measured
# on these shapes); 1e-4 leaves room for other CPUs' kernels, while a wrong layout or formula moves them by > 1e-2.
LOGITS_ATOL = 1e-4


def hf_logits(model, ids, attention_mask=None, position_ids=None):
    import torch

    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask))
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(position_ids))
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)), **kwargs).logits.float().numpy()


def hf_and_neox(folder, **overrides):
    """A random transformers model saved to `folder`, and neox_jax's load of that folder."""
    from neox_jax import from_pretrained

    hf = make_hf_model(**overrides)
    hf.save_pretrained(folder)
    return hf, from_pretrained(folder)


def max_diff(a, b) -> float:
    """Largest absolute difference between two pytrees of arrays."""
    import jax

    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


def read_scalars(logdir) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a TensorBoard log folder, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, tag, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]


# A small model and a learnable corpus (documents counting up by a per-document stride, modulo the
# vocabulary) for training tests.
TINY_MODEL = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=64, rotary_pct=0.5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from neox_jax.data.indexed import IndexedDatasetWriter

    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.RandomState(0)
    with IndexedDatasetWriter(folder / "count", np.uint16) as w:
        for _ in range(300):
            start, stride = rng.randint(0, 128), rng.randint(1, 4)
            w.add_document((start + stride * np.arange(rng.randint(20, 80))) % 128)
    return str(folder / "count")


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def serving_model(tmp_path_factory):
    """(folder, model, tokenizer): a random Hugging Face model with a tokenizer of its 384 tokens and a chat template,
    saved where `neox-jax serve` and lm-eval look, and neox_jax's load of it."""
    import json

    from neox_jax import from_pretrained
    from neox_jax.data.tokenizer import NeoXTokenizer, train_tokenizer

    require("torch")
    folder = tmp_path_factory.mktemp("served")
    make_hf_model(max_position_embeddings=256).save_pretrained(folder)
    words = [f"w{i}" for i in range(300)]
    train_tokenizer([" ".join(words)] * 3 + ["the cat sat on the mat. a dog ran. é ü 日本"] * 20, 384,
                    folder / "tokenizer.json", min_frequency=1)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>",
         "model_max_length": 128, "chat_template": CHAT_TEMPLATE}))
    return folder, from_pretrained(folder), NeoXTokenizer(folder)


@pytest.fixture(scope="session")
def engine(serving_model):
    """A warmed-up, running continuous-batching engine over `serving_model`: 4 slots of 128 positions, prefill chunks
    of 32 (and 8)."""
    from neox_jax.batching import Engine

    eng = Engine(serving_model[1], slots=4, max_context=128, chunk=32, max_queue=64)
    eng.warmup()
    eng.start()
    yield eng
    eng.close(5)
