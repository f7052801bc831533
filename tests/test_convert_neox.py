"""GPT-NeoX (DeepSpeed) checkpoints: import from both formats at any TP x PP, export, and the bias rule.

The fixtures are written here, from a transformers model's state dict, in the layout GPT-NeoX saves
(../shared/reference/gpt-neox-reference.md section 4): not by the code under test.
"""

import random

import numpy as np
import pytest
import yaml
from flax import nnx

from neox_jax import from_pretrained
from neox_jax.cli import main as cli
from neox_jax.convert import neox
from neox_jax.errors import CheckpointError, ConfigError

from .conftest import LOGITS_ATOL, hf_logits, make_hf_model, require

torch = require("torch")
require("transformers")

forward = nnx.jit(lambda m, ids: m(ids))
IDS = np.random.RandomState(0).randint(0, 384, (2, 32))
HEADS = 4  # divides by every tensor-parallel degree tested


def write_neox_fixture(folder, hf_model, tp=1, pp=1, current_names=False, divide_bias=True, step=3,
                       extra_files=True):
    """`hf_model` saved as GPT-NeoX would save it: pipeline format for pp >= 1, sequential for pp == 0."""
    cfg = hf_model.config
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    L = cfg.num_hidden_layers
    parallel = cfg.use_parallel_residual

    def rename(key):
        if current_names:
            key = key.replace("mlp.dense_h_to_4h.", "mlp.linear1.").replace("mlp.dense_4h_to_h.", "mlp.linear2.")
        return key

    def shards(key, t):
        if key.endswith(("word_embeddings.weight", "final_linear.weight", "query_key_value.weight",
                         "query_key_value.bias", "h_to_4h.weight", "h_to_4h.bias", "linear1.weight", "linear1.bias")):
            return list(torch.chunk(t, tp, dim=0))
        if key.endswith(("attention.dense.weight", "4h_to_h.weight", "linear2.weight")):
            return list(torch.chunk(t, tp, dim=1))
        if key.endswith(("attention.dense.bias", "4h_to_h.bias", "linear2.bias")) and parallel and divide_bias:
            return [t / tp] * tp  # GPT-NeoX adds the bias once per rank (PR #1220 divides on import)
        return [t] * tp

    layers = {0: {"word_embeddings.weight": sd["gpt_neox.embed_in.weight"]},
              L + 3: {"norm.weight": sd["gpt_neox.final_layer_norm.weight"],
                      "norm.bias": sd["gpt_neox.final_layer_norm.bias"]},
              L + 4: {"final_linear.weight": sd.get("embed_out.weight", sd.get("lm_head.weight"))}}
    for i in range(L):
        prefix = f"gpt_neox.layers.{i}."
        layers[i + 2] = {rename(k[len(prefix):]): v for k, v in sd.items()
                         if k.startswith(prefix) and not k.endswith(("attention.bias", "attention.masked_bias"))}
        layers[i + 2]["attention.rotary_emb.inv_freq"] = torch.ones(4)  # an old buffer, ignored
    step_dir = folder / f"global_step{step}"
    (step_dir / "configs").mkdir(parents=True)
    per_rank = [dict() for _ in range(tp)]
    for idx, state in layers.items():
        split = {k: shards(k, v) for k, v in state.items()}
        for r in range(tp):
            local = {k: s[r].clone().contiguous() for k, s in split.items()}
            if pp:
                torch.save(local, step_dir / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
            else:
                per_rank[r].update({f"sequential.{idx}.{k}": v for k, v in local.items()})
    client = {"iteration": step, "args": {"num_layers": L}, "np_rng_state": np.random.get_state(),
              "random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state()}
    for r in range(tp * max(pp, 1)):
        torch.save({**client, **({"module": per_rank[r]} if not pp else {})},
                   step_dir / f"mp_rank_{r:02d}_model_states.pt")
    config = {"pipe_parallel_size": pp, "model_parallel_size": tp, "num_layers": L,
              "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
              "intermediate_size": cfg.intermediate_size, "seq_length": 64, "max_position_embeddings": 1024,
              "norm": "layernorm", "pos_emb": "rotary", "rotary_pct": 0.25, "no_weight_tying": True,
              "gpt_j_residual": parallel, "bias_gelu_fusion": False, "hidden_dropout": 0.1,
              "attention_dropout": 0.1}
    (step_dir / "configs" / "model.yml").write_text(yaml.safe_dump(config))
    (folder / "latest").write_text(f"global_step{step}")
    return folder


@pytest.mark.parametrize("tp,pp,current", [(1, 1, False), (2, 2, True), (4, 4, False), (2, 0, False), (4, 0, True),
                                           (1, 0, True)])
def test_import_matches_transformers(tmp_path, tp, pp, current):
    hf = make_hf_model(num_attention_heads=HEADS)
    write_neox_fixture(tmp_path / "ckpt", hf, tp=tp, pp=pp, current_names=current)
    model = from_pretrained(tmp_path / "ckpt")
    assert model.config.vocab_size == 384 and model.config.num_layers == 2
    assert np.abs(np.asarray(forward(model, IDS)) - hf_logits(hf, IDS)).max() <= LOGITS_ATOL


def test_sequential_residual_adds_the_bias_once(tmp_path):
    hf = make_hf_model(use_parallel_residual=False)
    write_neox_fixture(tmp_path / "ckpt", hf, tp=2)
    model = from_pretrained(tmp_path / "ckpt")
    assert not model.config.use_parallel_residual
    assert np.abs(np.asarray(forward(model, IDS)) - hf_logits(hf, IDS)).max() <= LOGITS_ATOL


def test_counting_the_row_parallel_bias_once_is_wrong(tmp_path, monkeypatch):
    """The fixture's biases are split as GPT-NeoX splits them; an importer that took one rank's copy (as for
    a replicated LayerNorm) would be off, so the sum rule is what makes the logits match."""
    hf = make_hf_model()
    write_neox_fixture(tmp_path / "ckpt", hf, tp=2)
    merge = neox.merge
    monkeypatch.setattr(neox, "merge", lambda shards, how, parallel: merge(shards, how, parallel_residual=False))
    model = from_pretrained(tmp_path / "ckpt")
    assert np.abs(np.asarray(forward(model, IDS)) - hf_logits(hf, IDS)).max() > 1e-3


@pytest.mark.parametrize("src_kind", ["pipeline", "sequential"])
def test_cli_neox_to_hf_and_orbax(tmp_path, src_kind, capsys):
    transformers = require("transformers")
    hf = make_hf_model()
    write_neox_fixture(tmp_path / "ckpt", hf, tp=2, pp=1 if src_kind == "pipeline" else 0)
    assert cli(["convert", "neox-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(hf_logits(back, IDS) - hf_logits(hf, IDS)).max() <= LOGITS_ATOL
    assert cli(["convert", "neox-to-orbax", str(tmp_path / "ckpt" / "global_step3"), str(tmp_path / "orbax")]) == 0
    assert np.abs(np.asarray(forward(from_pretrained(tmp_path / "orbax"), IDS)) - hf_logits(hf, IDS)).max() <= LOGITS_ATOL


def test_export_roundtrip_is_bit_exact_and_in_gpt_neox_layout(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    assert cli(["convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
    assert cli(["convert", "orbax-to-neox", str(tmp_path / "orbax"), str(tmp_path / "neox"),
                "--tensor-parallel", "2", "--pipe-parallel", "2", "--step", "7"]) == 0
    assert cli(["convert", "neox-to-orbax", str(tmp_path / "neox"), str(tmp_path / "back")]) == 0
    a, b = from_pretrained(tmp_path / "orbax"), from_pretrained(tmp_path / "back")
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
    # everything but the token ids, which GPT-NeoX keeps in its tokenizer, not in the model's config
    assert a.config.replace(eos_token_id=0) == b.config
    # GPT-NeoX's layout, checked against the fixture writer's: file names, keys, shard shapes, the halved bias
    step = tmp_path / "neox" / "global_step7"
    assert (tmp_path / "neox" / "latest").read_text() == "global_step7"
    names = sorted(f.name for f in step.glob("layer_*"))
    assert names == sorted(f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in (0, 2, 3, 5, 6) for r in (0, 1))
    assert len(list(step.glob("mp_rank_*_model_states.pt"))) == 4
    layer = torch.load(step / "layer_02-model_01-model_states.pt", weights_only=True)
    sd = hf.state_dict()
    torch.testing.assert_close(layer["mlp.linear2.bias"] * 2, sd["gpt_neox.layers.0.mlp.dense_4h_to_h.bias"])
    torch.testing.assert_close(layer["attention.query_key_value.weight"],
                               sd["gpt_neox.layers.0.attention.query_key_value.weight"][96:])
    config = yaml.safe_load((step / "configs" / "neox_jax.yml").read_text())
    assert config["model_parallel_size"] == 2 and config["pipe_parallel_size"] == 2
    assert config["make_vocab_size_divisible_by"] * 2 == 384


def jax_leaves(model):
    import jax

    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_malicious_pickle_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    hf = make_hf_model()
    # pipeline format: the mp_rank files are not needed for weights and are never opened
    write_neox_fixture(tmp_path / "pipe", hf, tp=2, pp=1)
    for f in (tmp_path / "pipe" / "global_step3").glob("mp_rank_*"):
        torch.save({"optimizer": Evil()}, f)
    from_pretrained(tmp_path / "pipe")
    # sequential format: weights-only unpickling refuses the object, names the file and the way out
    write_neox_fixture(tmp_path / "seq", hf, tp=1, pp=0)
    f = tmp_path / "seq" / "global_step3" / "mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=False)
    torch.save({**state, "optimizer": Evil()}, f)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: weights-only unpickling refused it "
                                              r"\(it holds \S*open\).*--trust-pickle"):
        from_pretrained(tmp_path / "seq")
    assert not marker.exists()


def test_bad_checkpoints_name_the_file(tmp_path):
    hf = make_hf_model()
    ckpt = write_neox_fixture(tmp_path / "a", hf, tp=2)
    step = ckpt / "global_step3"
    (step / "layer_03-model_01-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="layer_03-model_01-model_states.pt is missing"):
        neox.NeoXSource(ckpt)

    ckpt = write_neox_fixture(tmp_path / "b", hf, tp=2)
    config = ckpt / "global_step3" / "configs" / "model.yml"
    config.write_text(config.read_text().replace("model_parallel_size: 2", "model_parallel_size: 4"))
    with pytest.raises(CheckpointError, match=r"2 tensor-parallel shards \(layer_\*-model_\*.*model_parallel_size=4"):
        neox.NeoXSource(ckpt)

    ckpt = write_neox_fixture(tmp_path / "c", hf, tp=1)
    file = ckpt / "global_step3" / "layer_02-model_00-model_states.pt"
    state = torch.load(file, weights_only=True)
    state["attention.dense.weight"] = state["attention.dense.weight"][:, :-1].clone()
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=r"mis-shaped:\n.*layers.0.attention.dense.weight: checkpoint \(64, 63\)"):
        from_pretrained(ckpt)

    ckpt = write_neox_fixture(tmp_path / "d", hf, tp=1)
    file = ckpt / "global_step3" / "layer_02-model_00-model_states.pt"
    file.write_bytes(file.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="layer_02-model_00-model_states.pt: not a readable PyTorch file"):
        from_pretrained(ckpt)

    ckpt = write_neox_fixture(tmp_path / "e", hf, tp=1)
    (ckpt / "global_step3" / "configs" / "model.yml").unlink()
    with pytest.raises(ConfigError, match="no configs/ folder.*--config"):
        from_pretrained(ckpt)

    from neox_jax.config import NeoXConfig

    config = NeoXConfig(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160)
    with pytest.raises(ConfigError, match="num_heads=4 is not divisible by --tensor-parallel 3"):
        neox.write_neox(None, config, tmp_path / "out", tensor_parallel=3)
