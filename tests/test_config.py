"""NeoXConfig: presets with real parameter counts, HF config forms, GPT-NeoX YAML import."""

import json

import jax
import pytest
from flax import nnx

from neox_jax import GPTNeoX, NeoXConfig
from neox_jax.config import PRESETS, load_yaml
from neox_jax.convert.hf_config import config_from_hf, config_to_hf
from neox_jax.convert.neox_yaml import model_config
from neox_jax.errors import ConfigError

from .conftest import require


def hf_param_count(cfg: NeoXConfig) -> int:
    """Parameters of transformers' model with this config, built on the meta device (nothing allocated)."""
    torch = require("torch")
    transformers = require("transformers")
    with torch.device("meta"):
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config_to_hf(cfg)))
    return sum(p.numel() for p in model.parameters())


# Parameter counts of the released checkpoints (transformers' count of each model, as
# test_preset_counts_equal_transformers recomputes for three of them).
RELEASED_PARAMS = {
    "pythia-14m": 14_067_712, "pythia-31m": 30_494_720, "pythia-70m": 70_426_624, "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016, "pythia-1b": 1_011_781_632, "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960, "pythia-6.9b": 6_857_302_016, "pythia-12b": 11_846_072_320,
    "neox-20b": 20_554_567_680,
}


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "gpt-neox-20b"])
def test_every_preset_builds_abstractly_with_the_real_parameter_count(name):
    cfg = NeoXConfig.preset(name)
    abstract = nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == cfg.num_params == RELEASED_PARAMS[name]  # JAX alone: no torch needed


@pytest.mark.parametrize("name", ["pythia-70m", "pythia-1.4b", "neox-20b"])
def test_preset_counts_equal_transformers(name):
    cfg = NeoXConfig.preset(name)
    assert cfg.num_params == hf_param_count(cfg)


def test_known_sizes():
    assert NeoXConfig.preset("pythia-70m").num_params == 70_426_624
    assert NeoXConfig.preset("pythia-12b").vocab_size == 50688
    assert NeoXConfig.preset("EleutherAI/pythia-6.9b").vocab_size == 50432
    neox = NeoXConfig.preset("neox-20b")
    assert (neox.head_dim, neox.rotary_ndims, neox.activation) == (96, 24, "gelu_fast")
    assert 20.5e9 < neox.num_params < 20.6e9


def test_from_hf_reads_old_and_v5_rotary_forms():
    base = config_to_hf(NeoXConfig.preset("pythia-70m"))
    old = {k: v for k, v in base.items() if k != "rope_parameters"}
    old.update(rotary_pct=0.5, rotary_emb_base=25000)
    v5 = {k: v for k, v in base.items() if k not in ("rotary_pct", "rotary_emb_base")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5}
    for form in (old, v5):
        cfg = config_from_hf(form)
        assert (cfg.rotary_pct, cfg.rotary_base, cfg.rotary_ndims) == (0.5, 25000.0, 32)


def test_to_hf_roundtrips_through_transformers(tmp_path):
    transformers = require("transformers")
    cfg = NeoXConfig.preset("pythia-160m", rotary_base=5000.0, use_parallel_residual=False, activation="gelu_fast")
    transformers.GPTNeoXConfig(**config_to_hf(cfg)).save_pretrained(tmp_path)
    back = config_from_hf(tmp_path)
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "rotary_pct",
                  "rotary_base", "use_parallel_residual", "activation", "layer_norm_eps"):
        assert getattr(back, field) == getattr(cfg, field), field


@pytest.mark.parametrize("bad,match", [
    (dict(num_attention_heads=5), "hidden_size=512 is not divisible by num_heads=5"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope type 'linear'"),
])
def test_from_hf_rejects_what_it_cannot_run(bad, match):
    with pytest.raises(ConfigError, match=match):
        config_from_hf({**config_to_hf(NeoXConfig.preset("pythia-70m")), **bad})


def test_from_hf_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Hugging Face config"):
        config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 64,\n "oops" }')
    with pytest.raises(ConfigError, match="invalid JSON at line 2"):
        config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="missing required key 'vocab_size'"):
        config_from_hf(tmp_path)


def test_config_validation_names_the_setting():
    with pytest.raises(ConfigError, match="activation='relu'"):
        NeoXConfig(activation="relu")
    with pytest.raises(ConfigError, match="rotary_pct=0.01"):
        NeoXConfig(rotary_pct=0.01)
    with pytest.raises(ConfigError, match="unknown preset 'pythia-7b'"):
        NeoXConfig.preset("pythia-7b")
    with pytest.raises(ConfigError, match="unknown model setting 'hidden'; did you mean 'hidden_size'"):
        NeoXConfig.from_dict({"hidden": 3})


# ---- GPT-NeoX YAML -----------------------------------------------------------------------------------

# file: (layers, hidden, heads, padded vocab)
NEOX_FILES = {
    "20B.yml": (44, 6144, 64, 50432),
    "pythia/pythia-14m.yml": (6, 128, 4, 50304),
    "pythia/pythia-31m.yml": (6, 256, 8, 50304),
    "pythia/pythia-70m.yml": (6, 512, 8, 50304),
    "pythia/pythia-160m.yml": (12, 768, 12, 50304),
    "pythia/pythia-410m.yml": (24, 1024, 16, 50304),
    "pythia/pythia-1b.yml": (16, 2048, 8, 50304),
    "pythia/pythia-1.4b.yml": (24, 2048, 16, 50304),
    "pythia/pythia-2.8b.yml": (32, 2560, 32, 50304),
    "pythia/pythia-6.9b.yml": (32, 4096, 32, 50432),
}


@pytest.mark.parametrize("file", NEOX_FILES)
def test_real_neox_yaml_loads_with_the_right_shapes(shared, file):
    cfg = model_config(shared / "neox-configs" / file)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size) == NEOX_FILES[file]
    assert (cfg.rotary_pct, cfg.use_parallel_residual, cfg.activation) == (0.25, True, "gelu_fast")
    # the 6.9B file sets no init methods, so GPT-NeoX's defaults apply
    expected_init = ("normal", "scaled_normal") if "6.9b" in file else ("small_init", "wang_init")
    assert (cfg.init_method, cfg.output_layer_init_method) == expected_init
    preset = NeoXConfig.preset("neox-20b" if file == "20B.yml" else file.split("/")[1][:-4])
    assert cfg.num_params == preset.num_params


def test_pythia_12b_yaml_missing_comma_is_reported_with_file_and_line(shared):
    path = shared / "neox-configs" / "pythia" / "pythia-12b.yml"
    with pytest.raises(ConfigError, match=r"pythia-12b\.yml: line 21, column \d+: malformed YAML.*comma missing"):
        model_config(path)


def test_local_setup_merges_with_a_model_file(shared, tmp_path):
    setup = shared / "neox-configs" / "local_setup.yml"
    assert load_yaml(setup)["checkpoint_validation_with_forward_pass"] is False
    model = tmp_path / "model.yml"
    model.write_text('{"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "pos-emb": "rotary",\n'
                     ' "rotary-pct": 0.5, "no-weight-tying": true, "gpt_j_residual": false,\n'
                     ' "hidden-dropout": 0, "attention-dropout": 0}\n')
    cfg = model_config(model, setup)
    assert (cfg.num_layers, cfg.rotary_ndims, cfg.use_parallel_residual, cfg.activation) == (2, 8, False, "gelu")
    with pytest.raises(ConfigError, match="num_layers is not set"):
        model_config(setup)


def test_yaml_key_set_twice_is_an_error(tmp_path):
    a, b = tmp_path / "a.yml", tmp_path / "b.yml"
    a.write_text('{"num-layers": 2, "hidden-size": 64}\n')
    b.write_text('{"num_layers": 4}\n')
    with pytest.raises(ConfigError, match=r"b\.yml: key 'num_layers' is already set in .*a\.yml"):
        load_yaml(a, b)
    a.write_text('{"num-layers": 2,\n "num_layers": 3}\n')
    with pytest.raises(ConfigError, match=r"a\.yml: line 2.*'num_layers' set twice \(first at line 1\)"):
        load_yaml(a)


def test_yaml_unsupported_architecture_named(tmp_path):
    f = tmp_path / "m.yml"
    f.write_text('{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "pos_emb": "rotary",'
                 ' "no_weight_tying": true, "norm": "rmsnorm"}')
    with pytest.raises(ConfigError, match="norm='rmsnorm' is not supported"):
        model_config(f)


def test_every_shipped_config_reads():
    from pathlib import Path

    from neox_jax.convert.neox_yaml import read_train_config

    files = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yml"))
    assert len(files) >= 6
    for f in files:
        cfg = read_train_config(f)
        assert cfg.train_iters >= 1, f
