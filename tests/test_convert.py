"""Hugging Face <-> neox_jax conversion: bit-exact round trips, every file form, and clear errors."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from neox_jax import from_pretrained, save_pretrained
from neox_jax.cli import main as cli
from neox_jax.convert.hf import TensorSource, hf_shapes
from neox_jax.errors import CheckpointError, ConfigError
from tests.conftest import hf_logits, make_hf_model

from .conftest import LOGITS_ATOL, require

torch = require("torch")
transformers = require("transformers")

forward = nnx.jit(lambda m, ids: m(ids))
IDS = np.random.RandomState(0).randint(0, 384, (2, 64))


def assert_same_tensors(folder_a, folder_b):
    a, b = TensorSource(folder_a), TensorSource(folder_b)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"


def test_hf_roundtrip_is_bit_exact_and_transformers_loads_it(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "out")
    assert_same_tensors(tmp_path / "hf", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(back, transformers.GPTNeoXForCausalLM)
    np.testing.assert_array_equal(hf_logits(back, IDS), hf_logits(hf, IDS))
    assert np.abs(np.asarray(forward(model, IDS)) - hf_logits(hf, IDS)).max() <= LOGITS_ATOL


def test_a_reward_model_round_trips_as_a_sequence_classifier(tmp_path):
    """A GPTNeoXForSequenceClassification (one label) reads as a score model and writes back bit for bit; our
    score at a sequence's last token is transformers' pooled logit, padding (the end-of-text token) after it
    included; generation is refused by name."""
    hf = make_hf_model(classifier=True)
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    assert model.config.num_labels == 1
    save_pretrained(model, tmp_path / "out")
    assert_same_tensors(tmp_path / "hf", tmp_path / "out")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    eos = model.config.eos_token_id
    assert isinstance(back, transformers.GPTNeoXForSequenceClassification) and back.config.pad_token_id == eos
    ids = np.array(IDS)
    ids[ids == eos] = eos + 1
    ids[1, 50:] = eos  # the second sequence ends at 49, then end-of-text tokens
    with torch.no_grad():
        pooled = back(torch.from_numpy(ids)).logits.numpy()[:, 0]
    scores = np.asarray(forward(model, ids))[:, :, 0]
    np.testing.assert_allclose([scores[0, -1], scores[1, 49]], pooled, atol=LOGITS_ATOL)
    from neox_jax import generate

    with pytest.raises(ConfigError, match="num_labels=1: a reward model"):
        generate(model, [[5, 6]], max_new_tokens=2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoint_roundtrip_is_bit_exact(tmp_path, dtype):
    hf = make_hf_model().to(getattr(torch, dtype))
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")  # fp32 parameters: an exact upcast
    save_pretrained(model, tmp_path / "out", dtype=dtype)
    assert_same_tensors(tmp_path / "hf", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == dtype


def test_sharded_safetensors_both_ways(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = from_pretrained(tmp_path / "hf")
    np.testing.assert_allclose(np.asarray(forward(model, IDS)), hf_logits(hf, IDS), atol=LOGITS_ATOL)

    from neox_jax.convert.hf import save_params

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    save_params(params, model.config, tmp_path / "out", max_shard_bytes=150_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert set(index["weight_map"]) == set(hf_shapes(model.config))
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert_same_tensors(tmp_path / "hf", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(hf_logits(back, IDS), hf_logits(hf, IDS))


def test_pytorch_bin_with_old_buffers_and_lm_head_name(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["embed_out.weight"] = state.pop("lm_head.weight")  # the name on the Hub
    for i in range(2):  # buffers that old Hub checkpoints carry
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    model = from_pretrained(folder)
    np.testing.assert_allclose(np.asarray(forward(model, IDS)), hf_logits(hf, IDS), atol=LOGITS_ATOL)

    # transformers v5 writes the output layer as lm_head.weight in safetensors too: both names load
    from safetensors.torch import save_file

    state["lm_head.weight"] = state.pop("embed_out.weight")
    (tmp_path / "st").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "st" / "model.safetensors")
    (tmp_path / "st" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    np.testing.assert_array_equal(np.asarray(forward(from_pretrained(tmp_path / "st"), IDS)),
                                  np.asarray(forward(model, IDS)))


def test_sharded_pytorch_bin(tmp_path):
    """The 20B's Hub folder: pytorch_model-0000N-of-0000M.bin with pytorch_model.bin.index.json."""
    hf = make_hf_model()
    state = hf.state_dict()
    names = sorted(state)
    folder = tmp_path / "bin"
    folder.mkdir()
    weight_map = {}
    for i, part in enumerate((names[:10], names[10:])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k].clone() for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf.config.save_pretrained(folder)
    np.testing.assert_allclose(np.asarray(forward(from_pretrained(folder), IDS)), hf_logits(hf, IDS), atol=LOGITS_ATOL)


def test_bin_with_code_in_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "evil"
    folder.mkdir()
    make_hf_model().config.save_pretrained(folder)
    torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="pytorch_model.bin: weights-only unpickling refused it \\(it holds print\\)"):
        from_pretrained(folder)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    make_hf_model().save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        from_pretrained(tmp_path / "hf")


def test_config_with_heads_not_dividing_hidden(tmp_path):
    make_hf_model().save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_attention_heads"] = 5
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json.*hidden_size=64 is not divisible by num_heads=5"):
        from_pretrained(tmp_path / "hf")


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    make_hf_model().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(tmp_path / "hf")
    make_hf_model().save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-.*missing"):
        from_pretrained(tmp_path / "sharded")


def test_missing_unexpected_and_misshaped_tensors_listed_together(tmp_path):
    from safetensors.numpy import save_file

    make_hf_model().save_pretrained(tmp_path / "hf")
    src = TensorSource(tmp_path / "hf")
    tensors = {n: src.get(n) for n in src.names()}
    del tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    tensors["gpt_neox.layers.7.attention.dense.weight"] = np.zeros((2, 2), np.float32)
    tensors["gpt_neox.layers.0.attention.dense.weight"] = np.zeros((64, 63), np.float32)
    (tmp_path / "bad").mkdir()
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        from_pretrained(tmp_path / "bad")
    msg = str(err.value)
    assert "1 missing" in msg and "gpt_neox.layers.1.mlp.dense_4h_to_h.bias" in msg
    assert "1 unexpected" in msg and "gpt_neox.layers.7.attention.dense.weight" in msg
    assert "1 mis-shaped" in msg and "(64, 63), config expects (64, 64)" in msg


def test_cli_convert_hf_orbax_hf_is_bit_exact(tmp_path, capsys):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    assert cli(["convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
    assert cli(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
    assert_same_tensors(tmp_path / "hf", tmp_path / "back")
    # the Orbax checkpoint loads directly too
    np.testing.assert_allclose(np.asarray(forward(from_pretrained(tmp_path / "orbax"), IDS)),
                               hf_logits(hf, IDS), atol=LOGITS_ATOL)
    # a second conversion into the same place refuses instead of overwriting
    assert cli(["convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same random model as a Hugging Face folder, an Orbax params checkpoint and a GPT-NeoX checkpoint."""
    root = tmp_path_factory.mktemp("sources")
    make_hf_model().save_pretrained(root / "hf")
    for kind in ("orbax", "neox"):
        assert cli(["convert", f"hf-to-{kind}", str(root / "hf"), str(root / kind)]) == 0
    return root


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("direction", [f"{a}-to-{b}" for a in ("hf", "orbax", "neox") for b in ("hf", "orbax", "neox")
                                       if a != b])
def test_every_direction_with_and_without_dtype(sources, tmp_path, direction, dtype, capsys):
    """Each conversion runs with and without --dtype (hf-to-neox without it raised AttributeError) and its weights
    are the source's: exactly in fp32 (the sources' dtype, kept without --dtype; Orbax's default), rounded once in
    bf16."""
    src = sources / direction.split("-to-")[0]
    assert cli(["convert", direction, str(src), str(tmp_path / "out"), *(["--dtype", dtype] if dtype else [])]) == 0
    want = nnx.to_pure_dict(nnx.state(from_pretrained(sources / "hf"), nnx.Param))
    got = nnx.to_pure_dict(nnx.state(from_pretrained(tmp_path / "out"), nnx.Param))
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        w = np.asarray(w).astype(dtype or np.float32)
        assert np.array_equal(np.asarray(g).astype(np.float32), w.astype(np.float32))
