"""Bad input a user can make: a clear error naming the value and the setting, before anything is compiled,
with nothing on disk touched. (The categories of issue 13; more of them to come.)"""

import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import yaml

from neox_jax.config import NeoXConfig, TrainConfig
from neox_jax.convert import neox_yaml
from neox_jax.errors import ConfigError
from neox_jax.loop import train

from .conftest import TINY_MODEL, require

# After a tensorstore read error (the corrupt-checkpoint case) Orbax's background threads find their event loop
# closed; Python reports that later, against whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")



@pytest.fixture(autouse=True)
def nothing_compiles():
    """Every bad input here is refused before XLA compiles a program of ours in this process (an eager single
    operation, which JAX compiles as `jit(<primitive>)`, is not a program; subprocess cases time it)."""
    import jax
    import jax.extend.core.primitives as primitives

    eager = {f"jit({p.name})" for p in vars(primitives).values() if isinstance(p, jax.extend.core.Primitive)}
    compiled = []

    def listener(event, _seconds, fun_name="", **_):
        if event == "/jax/core/compile/backend_compile_duration" and fun_name not in eager:
            compiled.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield
    jax.monitoring.unregister_event_duration_listener(listener)
    assert not compiled, f"compiled {compiled} before the bad input was refused"


# ---- settings outside their domain, or of the wrong type -----------------------------------------------------


@pytest.mark.parametrize("setting, value, says", [
    ("lr", -1e-4, "lr=-0.0001: the learning rate must be positive"),
    ("lr", "fast", "lr='fast': expected a number, got str"),
    ("min_lr", 1.0, "min_lr=1.0: must be between 0 and lr"),
    ("warmup", -0.5, "warmup=-0.5: a fraction of lr_decay_iters"),
    ("grad_clip", -1.0, "grad_clip=-1.0: a gradient-norm limit"),
    ("eps", 0.0, "eps=0.0: Adam's epsilon must be positive"),
    ("betas", [0.9, 1.5], "betas=(0.9, 1.5): two numbers in [0, 1)"),
    ("betas", [0.9], "betas=(0.9,): two numbers in [0, 1)"),
    ("betas", ["a", 0.9], "betas=('a', 0.9): two numbers in [0, 1)"),
    ("train_iters", 100.5, "train_iters=100.5: expected a whole number, got float"),
    ("seed", "abc", "seed='abc': expected a whole number, got str"),
    ("log_interval", True, "log_interval=True: expected a whole number, got bool"),
    ("weight_decay", -0.1, "weight_decay=-0.1: must be 0 or positive"),
    ("initial_scale_power", 99, "initial_scale_power=99: the fp16 loss scale is 2^this"),
    ("keep_every", -2, "keep_every=-2: 0 (off) or a number of steps"),
    ("data_weights", [1.0, -1.0], "data_weights=(1.0, -1.0): every weight must be a positive number"),
    ("precision", "fp8", "precision='fp8': choose one of fp32, bf16, fp16"),
    ("zero_stage", 2, "zero_stage=2: choose 0, 1 or 3"),
])
def test_settings_outside_their_domain_name_the_setting(setting, value, says):
    base = {"model": TINY_MODEL, "seq_length": 32, "data_paths": ["a", "b"]}
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**base, setting: value})
    assert says in str(e.value)


@pytest.mark.parametrize("setting, value", [("rotary_base", 0.0), ("layer_norm_eps", -1e-5), ("init_std", 0.0),
                                            ("num_layers", 2.0), ("activation", "relu")])
def test_model_settings_outside_their_domain(setting, value):
    with pytest.raises(ConfigError, match=f"{setting}="):
        NeoXConfig(**{**TINY_MODEL, setting: value})


def test_a_number_yaml_reads_as_a_string_is_read_as_the_number():
    assert TrainConfig(lr="6e-4").lr == 6e-4  # YAML 1.1 reads `lr: 6e-4` as a string


def _write(cfg: dict, path):
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_cli_refuses_a_bad_override_before_compiling_and_writes_nothing(corpus, tmp_path):
    cfg = {"model": TINY_MODEL, "mesh": {"data": 2, "pipe": 1, "tensor": 1}, "seq_length": 32, "train_iters": 3,
           "data_paths": [corpus], "save": str(tmp_path / "run")}
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "neox_jax.cli", "train", str(_write(cfg, tmp_path / "c.yml")),
                          "lr=-3"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "error: lr=-3: the learning rate must be positive" in out.stderr
    assert "compiled" not in out.stdout and time.perf_counter() - start < 30
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, says", [
    ("mesh=data:2", "mesh='data:2': expected the size of each axis, e.g. mesh: {data: 2, pipe: 1, tensor: 4} in YAML"),
    ("mesh=[2,1,1]", "or mesh=data=2,tensor=4 on the command line"),
    ("mesh={data: x, rows: 2}", "mesh data='x', rows=2: the axes are data, pipe, tensor, each a size >= 1 or -1"),
    ("betas=0.9", "betas=(0.9,): two numbers in [0, 1)"),
    ("lr=[1", "override 'lr=[1': '[1' is not a YAML value"),
])
def test_an_override_that_cannot_be_read_says_the_form_it_expects(override, says):
    from neox_jax.config import apply_overrides

    with pytest.raises(ConfigError, match=re.escape(says)):
        apply_overrides(TrainConfig.from_dict({"model": TINY_MODEL, "seq_length": 32}), [override])


def test_a_mesh_override_in_the_command_line_form():
    from neox_jax.config import apply_overrides

    cfg = apply_overrides(TrainConfig.from_dict({"model": TINY_MODEL, "seq_length": 32}), ["mesh=data=2,tensor=4"])
    assert cfg.mesh == {"data": 2, "pipe": 1, "tensor": 4}


# ---- vocabulary mismatches -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory):
    from neox_jax.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    texts = [f"word{i} other{i * 7} thing{i * 13}" for i in range(2000)]
    return train_tokenizer(texts, 1024, folder / "tokenizer.json")


def test_training_with_a_tokenizer_larger_than_the_vocabulary_is_refused_first(corpus, tmp_path, big_tokenizer):
    cfg = TrainConfig.from_dict({"model": TINY_MODEL, "mesh": {"data": 1}, "seq_length": 32, "train_iters": 2,
                                 "data_paths": [corpus], "tokenizer": str(big_tokenizer), "save": str(tmp_path / "r")})
    messages = []
    with pytest.raises(ConfigError, match=r"tokenizer=.* has 1024 tokens but the model's vocab_size is 128"):
        train(cfg, show_progress=False, print_fn=messages.append)
    assert messages == [] and not (tmp_path / "r").exists()  # nothing compiled, nothing written


def test_a_missing_tokenizer_is_found_before_training_not_after(corpus, tmp_path):
    cfg = TrainConfig.from_dict({"model": TINY_MODEL, "mesh": {"data": 1}, "seq_length": 32, "train_iters": 2,
                                 "data_paths": [corpus], "tokenizer": str(tmp_path / "nope.json"),
                                 "sample_prompt": "x"})
    with pytest.raises(FileNotFoundError, match="nope.json not found"):
        train(cfg, show_progress=False, print_fn=lambda _: pytest.fail("started training"))


def test_data_with_ids_past_the_vocabulary_is_refused_before_compiling(tmp_path):
    _documents(tmp_path / "d", seed=0)  # ids up to 500, the model's vocab_size is 128
    cfg = TrainConfig.from_dict({"model": TINY_MODEL, "mesh": {"data": 8}, "seq_length": 16, "train_iters": 2,
                                 "micro_batch_size": 1, "data_paths": [str(tmp_path / "d")], "split": "1",
                                 "save": str(tmp_path / "r")})
    messages = []
    with pytest.raises(ValueError, match=r"token id \d+ in .*/d \(train sample \d+\) \(step 1's batch\) is outside "
                                         r"the model's vocab_size=128"):
        train(cfg, show_progress=False, print_fn=messages.append)
    assert messages == [] and not list((tmp_path / "r").iterdir())  # nothing compiled, nothing written


def test_generate_refuses_a_tokenizer_larger_than_the_model(tmp_path, big_tokenizer):
    import jax
    import numpy as np

    from neox_jax.checkpoint import save_params_checkpoint
    from neox_jax.pretrained import abstract_params

    config = NeoXConfig(**TINY_MODEL)
    params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract_params(config))
    save_params_checkpoint(tmp_path / "m", params, config)
    out = subprocess.run([sys.executable, "-m", "neox_jax.cli", "generate", "--model", str(tmp_path / "m"),
                          "--tokenizer", str(big_tokenizer), "--prompt", "word1"], capture_output=True, text=True)
    assert out.returncode == 2 and "--tokenizer=" in out.stderr and "vocab_size is 128" in out.stderr


def test_a_corrupt_weights_checkpoint_is_one_line_naming_it(tmp_path):
    import jax
    import numpy as np

    import neox_jax
    from neox_jax.checkpoint import save_params_checkpoint
    from neox_jax.errors import CheckpointMismatchError
    from neox_jax.pretrained import abstract_params

    config = NeoXConfig(**TINY_MODEL)
    params = jax.tree.map(lambda x: np.ones(x.shape, np.float32), abstract_params(config))
    save_params_checkpoint(tmp_path / "m", params, config)
    for f in (tmp_path / "m" / "params").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:10])  # every data file truncated
    with pytest.raises(CheckpointMismatchError, match=f"checkpoint {tmp_path / 'm'} cannot be read .*; it is corrupt"):
        neox_jax.from_pretrained(tmp_path / "m")


# ---- index-map caches ------------------------------------------------------------------------------------------


def _documents(path, seed: int, n: int = 60):
    import numpy as np

    from neox_jax.data.indexed import IndexedDatasetWriter

    rng = np.random.RandomState(seed)
    with IndexedDatasetWriter(path, np.uint16) as w:
        for _ in range(n):
            w.add_document(rng.randint(0, 500, rng.randint(5, 40)))


def _samples(prefix, cache_dir):
    import numpy as np

    from neox_jax.data.dataset import GPTDataset
    from neox_jax.data.indexed import IndexedDataset

    ds = GPTDataset(IndexedDataset(prefix), np.arange(50), 100, 16, seed=3, cache_dir=cache_dir)
    return np.stack([ds[i] for i in range(100)])


def test_data_written_again_under_the_same_prefix_gets_fresh_index_maps(tmp_path):
    import numpy as np

    _documents(tmp_path / "d", seed=0)
    old = _samples(tmp_path / "d", None)  # maps cached beside the data
    time.sleep(0.01)
    _documents(tmp_path / "d", seed=1)  # other documents, same prefix: the cached maps no longer fit
    again = _samples(tmp_path / "d", None)
    fresh = _samples(tmp_path / "d", tmp_path / "empty-cache")
    np.testing.assert_array_equal(again, fresh)
    assert not np.array_equal(again, old)


def test_preprocessing_a_prefix_again_removes_its_maps(tmp_path):
    import json

    from neox_jax.data.preprocess import preprocess
    from neox_jax.data.tokenizer import train_tokenizer

    texts = [f"line {i} of some text with words {i * 3}" for i in range(200)]
    tok = train_tokenizer(texts, 300, tmp_path / "tok.json")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([tmp_path / "a.jsonl"], tok, str(tmp_path / "p"), show_progress=False)
    _samples(tmp_path / "p_text_document", None)
    assert list(tmp_path.glob("p_text_document_*_indexmap_*"))
    preprocess([tmp_path / "a.jsonl"], tok, str(tmp_path / "p"), show_progress=False)
    assert not list(tmp_path.glob("p_text_document_*_indexmap_*"))


def test_an_unwritable_cache_folder_names_data_cache_dir(tmp_path):
    _documents(tmp_path / "d", seed=0)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match="set data_cache_dir to a writable folder"):
        _samples(tmp_path / "d", tmp_path / "file" / "cache")


# ---- GPT-NeoX settings this model does not implement ------------------------------------------------------------

NEOX_BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "pos_emb": "rotary",
             "no_weight_tying": True, "hidden_dropout": 0, "attention_dropout": 0, "weight_decay": 0.01}


@pytest.mark.parametrize("changes, says", [
    ({"attention_config": [[["local"], 2]]}, "attention_config ['local'] is not supported"),
    ({"attention_config": [[["global", "sparse_fixed"], 2]]}, "attention_config ['global', 'sparse_fixed']"),
    ({"sparsity_config": {"block": 16}}, "sparsity_config={'block': 16}: sparse or sliding-window attention"),
    ({"use_mup": True}, "use_mup=True: not implemented in neox-jax's model"),
    ({"sliding_window_width": 512}, "sliding_window_width=512: sparse or sliding-window attention"),
    ({"pos_emb": "alibi"}, "pos_emb='alibi' is not supported: neox-jax implements pos_emb: 'rotary' only"),
    ({"data_impl": "cached"}, "data_impl='cached' is not supported: neox-jax implements data_impl: 'infer' or 'mmap'"),
    ({"tokenizer_type": "SPMTokenizer"}, "tokenizer_type='SPMTokenizer': neox-jax knows the vocabulary size of"),
    ({"moe_num_experts": 8}, "moe_num_experts=8 is not supported"),
    ({"use_bias_in_attn_linear": False}, "use_bias_in_attn_linear=False is not supported"),
    ({"use_bias_in_mlp": False}, "use_bias_in_mlp=False is not supported"),
    ({"mlp_type": "llama"}, "mlp_type='llama' is not supported"),
    ({"hidden_dropout": 1.5}, "hidden_dropout=1.5: a dropout probability must be in [0, 1)"),
    ({"attention_dropout": "high"}, "attention_dropout='high': expected a number"),
    ({"activation": "swiglu"}, "activation='swiglu' is not supported"),
    ({"norm": "rmsnorm"}, "norm='rmsnorm' is not supported"),
])
def test_neox_yaml_settings_we_do_not_implement_are_refused(tmp_path, changes, says):
    _refused(tmp_path, changes, says, neox_yaml.model_config)


def _refused(tmp_path, changes, says, read):
    f = tmp_path / "m.yml"
    f.write_text(yaml.safe_dump({**NEOX_BASE, **changes}))
    with pytest.raises(ConfigError, match=__import__("re").escape(says)):
        read(f)


def test_neox_yaml_keys_whose_default_changed_say_which_default_they_get(tmp_path):
    """Dropout and weight decay left unset: GPT-NeoX v2's defaults (Pythia's and the 20B's version), each named in
    a warning with v3's; set, they are read; a weights-only read (a conversion) says nothing."""
    from neox_jax.errors import ChangedDefaultWarning

    f = tmp_path / "m.yml"
    f.write_text(yaml.safe_dump({k: v for k, v in NEOX_BASE.items() if k not in ("hidden_dropout", "weight_decay")}))
    with pytest.warns(ChangedDefaultWarning) as caught:
        cfg = neox_yaml.train_config(f)
    said = " ".join(str(w.message) for w in caught)
    assert "hidden_dropout is not set: GPT-NeoX v2's default 0.1 applies" in said and "default to 0.0" in said
    assert "weight_decay is not set: GPT-NeoX v2's default 0.01 applies" in said and "attention_dropout" not in said
    assert (cfg.model.hidden_dropout, cfg.model.attention_dropout, cfg.weight_decay) == (0.1, 0.0, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert neox_yaml.model_config(f, weights_only=True).hidden_dropout == 0.1


@pytest.mark.parametrize("changes, says", [
    ({"finetune": True}, "finetune: true needs `load`, the checkpoint whose weights the run starts from"),
    ({"train_epochs": 2}, "train_epochs=2: neox-jax trains with train_iters"),
    ({"load": "elsewhere", "save": "here"}, "load='elsewhere' differs from save='here'"),
    ({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 8}, "train_batch_size=100 is not a multiple of"),
    ({"data_path": "a", "train_data_paths": ["b"], "valid_data_paths": ["b"]}, "set either data_path or train/"),
    ({"train_data_paths": ["b"]}, "train_data_paths and valid_data_paths go together"),
    ({"train_impl": "reinforce"}, "train_impl='reinforce' is not supported"),
    ({"train_impl": "rm"}, "dataset_impl='gpt2' (GPT-NeoX's default) is not supported: neox-jax implements "
                           "dataset_impl: 'pairwise' only"),
    ({"train_impl": "kto"}, "pack_impl='packed' (GPT-NeoX's default) is not supported: neox-jax implements "
                            "pack_impl: 'unpacked' only"),
    ({"fp16": {"enabled": True, "loss_scale": 128}}, "fp16 loss_scale=128: a static loss scale is not supported"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e-4, "momentum": 0.9}}}, "optimizer params ['momentum']"),
])
def test_neox_yaml_training_settings_we_do_not_implement_are_refused(tmp_path, changes, says):
    _refused(tmp_path, changes, says, neox_yaml.train_config)


def test_neox_yaml_numbers_that_are_not_numbers_are_named_at_once(tmp_path):
    changes = {"seed": "abc", "hidden_size": 64.5, "lr": "6e-4", "optimizer": {"params": {"eps": [1]}}}
    _refused(tmp_path, changes, "hidden_size=64.5: expected a whole number; optimizer.params.eps=[1]: expected a "
                                "number; seed='abc': expected a whole number", neox_yaml.train_config)


def test_a_llama_config_is_named_as_one(tmp_path):
    """GPT-NeoX's own DPO/KTO examples are Llama-3 models: the refusal says so before listing the settings."""
    f = tmp_path / "m.yml"
    f.write_text(yaml.safe_dump({**NEOX_BASE, "norm": "rmsnorm", "mlp_type": "llama", "activation": "silu",
                                 "train_impl": "dpo", "dataset_impl": "pairwise", "pack_impl": "unpacked"}))
    with pytest.raises(ConfigError, match=re.escape("a Llama model (norm: rmsnorm, mlp_type: llama, activation: "
                                                    "silu), not a GPT-NeoX one")) as e:
        neox_yaml.train_config(f)
    assert "norm='rmsnorm' is not supported" in str(e.value)


def test_neox_yaml_refuses_every_unsupported_setting_at_once_and_warns_of_unknown_keys(tmp_path):
    from neox_jax.errors import UnknownSettingWarning

    f = tmp_path / "m.yml"
    f.write_text(yaml.safe_dump({**NEOX_BASE, "use_qk_layernorm": True, "norm": "rmsnorm"}))
    with pytest.raises(ConfigError) as e:
        neox_yaml.model_config(f)
    assert "norm='rmsnorm'" in str(e.value) and "use_qk_layernorm=True" in str(e.value)
    f.write_text(yaml.safe_dump({**NEOX_BASE, "rotary_pcnt": 0.5, "layernorm_fusion": True}))
    with pytest.warns(UnknownSettingWarning, match="unknown GPT-NeoX setting 'rotary_pcnt' ignored; did you mean "
                                                   "'rotary_pct'"):
        cfg = neox_yaml.model_config(f)  # a fused kernel's switch is ignored on purpose, without a word
    assert cfg.rotary_pct == 1.0


def test_every_key_of_the_real_gpt_neox_configs_is_known(shared):
    from neox_jax.convert.neox_keys import KNOWN
    from neox_jax.config import load_yaml

    for f in sorted((shared / "neox-configs").rglob("*.yml")):
        try:
            keys = set(load_yaml(f))
        except ConfigError:  # pythia-12b.yml as released has a missing comma
            continue
        assert keys <= KNOWN, (f.name, keys - KNOWN)


def test_neox_yaml_keys_that_change_the_run_are_honoured(tmp_path):
    f = tmp_path / "m.yml"
    f.write_text(yaml.safe_dump({**NEOX_BASE, "expansion_factor": 3.02, "train_batch_size": 64,
                                 "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                                 "train_iters": 100, "lr_decay_fraction": 0.8, "clip_grad": 0.5,
                                 "extra_save_iters": [0, 1, 2, 4], "peak_theoretical_tflops": 312,
                                 "train_data_paths": ["t"], "valid_data_paths": ["v"], "valid_data_weights": [1.0],
                                 "save": "ckpt", "load": "ckpt", "zero_optimization": {"stage": 3},
                                 "profile": True, "profile_step_stop": 15}))
    cfg = neox_yaml.train_config(f)
    assert cfg.profile_steps == (10, 15)  # GPT-NeoX's nsys window, its default start
    assert cfg.model.intermediate_size == 194  # int(3.02 x 64) = 193, rounded up to a multiple of 2 as GPT-NeoX does
    assert cfg.mesh["data"] == 8 and cfg.lr_decay_iters == 80 and cfg.grad_clip == 0.5
    assert cfg.extra_save_iters == (0, 1, 2, 4) and cfg.keep_last == 0 and cfg.peak_tflops == 312
    assert cfg.data_paths == ("t",) and cfg.valid_data_paths == ("v",) and cfg.zero_stage == 3


def test_neox_yaml_sft_keys_are_honoured(tmp_path):
    f = tmp_path / "m.yml"
    f.write_text(yaml.safe_dump({**NEOX_BASE, "finetune": True, "load": "pythia-70m-step143000", "save": "ft",
                                 "train_data_paths": ["sft"], "train_label_data_paths": ["sft_label"],
                                 "valid_data_paths": ["v"], "valid_label_data_paths": ["v_label"]}))
    cfg = neox_yaml.train_config(f)
    assert cfg.init_from == "pythia-70m-step143000" and cfg.save == "ft"
    assert cfg.label_data_paths == ("sft_label",) and cfg.valid_label_data_paths == ("v_label",)
    assert cfg.loss_mean == "micro_batch"  # GPT-NeoX's normalisation, to reproduce its runs


def test_neox_yaml_dpo_keys_are_honoured(tmp_path):
    f = tmp_path / "m.yml"
    f.write_text(yaml.safe_dump({**NEOX_BASE, "train_impl": "dpo", "dataset_impl": "pairwise", "pack_impl": "unpacked",
                                 "dpo_beta": 0.2, "pos_train_data_paths": ["c"], "neg_train_data_paths": ["r"],
                                 "pos_train_label_data_paths": ["cl"], "neg_train_label_data_paths": ["rl"],
                                 "pos_valid_data_paths": ["vc"], "neg_valid_data_paths": ["vr"],
                                 "pos_valid_label_data_paths": ["vcl"], "neg_valid_label_data_paths": ["vrl"]}))
    cfg = neox_yaml.train_config(f)
    assert (cfg.train_impl, cfg.dpo_beta, cfg.data_paths, cfg.rejected_data_paths) == ("dpo", 0.2, ("c",), ("r",))
    assert (cfg.label_data_paths, cfg.rejected_label_data_paths) == (("cl",), ("rl",))
    assert (cfg.valid_data_paths, cfg.valid_rejected_data_paths, cfg.valid_rejected_label_data_paths) == (
        ("vc",), ("vr",), ("vrl",))


def test_neox_yaml_reward_model_keys_are_honoured(tmp_path):
    f = tmp_path / "m.yml"
    f.write_text(yaml.safe_dump({**NEOX_BASE, "train_impl": "rm", "dataset_impl": "pairwise", "pack_impl": "unpacked",
                                 "z_loss": 0.01, "pos_train_data_paths": ["c"], "neg_train_data_paths": ["r"],
                                 "pos_train_label_data_paths": ["cl"], "neg_train_label_data_paths": ["rl"],
                                 "pos_valid_data_paths": ["vc"], "neg_valid_data_paths": ["vr"],
                                 "pos_valid_label_data_paths": ["vcl"], "neg_valid_label_data_paths": ["vrl"]}))
    cfg = neox_yaml.train_config(f)
    assert (cfg.train_impl, cfg.z_loss, cfg.model.num_labels, cfg.pairs) == ("rm", 0.01, 1, True)
    assert (cfg.data_paths, cfg.rejected_data_paths, cfg.rejected_label_data_paths) == (("c",), ("r",), ("rl",))


def test_neox_yaml_kto_keys_are_honoured(tmp_path):
    f = tmp_path / "m.yml"
    f.write_text(yaml.safe_dump({**NEOX_BASE, "train_impl": "kto", "pack_impl": "unpacked", "kto_beta": 0.3,
                                 "kto_desirable_weight": 1.5, "kto_undesirable_weight": 0.5, "kto_fp32": True,
                                 "train_micro_batch_size_per_gpu": 2,
                                 "train_data_paths": ["t"], "train_label_data_paths": ["tl"],
                                 "train_reward_data_paths": ["tr"], "valid_data_paths": ["v"],
                                 "valid_label_data_paths": ["vl"], "valid_reward_data_paths": ["vr"]}))
    cfg = neox_yaml.train_config(f)
    assert (cfg.train_impl, cfg.pack_impl, cfg.packing) == ("kto", "unpacked", "unpacked")
    assert (cfg.kto_beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight) == (0.3, 1.5, 0.5)
    assert (cfg.reward_data_paths, cfg.valid_reward_data_paths) == (("tr",), ("vr",))


@pytest.mark.parametrize("changes, says", [
    ({"dpo_beta": 0}, "dpo_beta=0: DPO's beta must be a positive number"),
    ({"rejected_data_paths": []}, "rejected_data_paths has 0 entries for 1 data_paths: DPO pairs document i"),
    ({"train_impl": "reinforce"}, "train_impl='reinforce': choose normal, dpo, kto or rm (GPT-NeoX's reinforce needs "
                                  "a generation server"),
    ({"z_loss": 0.1}, "z_loss=0.1 with train_impl='dpo': GPT-NeoX's z_loss is the reward model's"),
    ({"train_impl": "normal", "rejected_data_paths": [], "model": {**TINY_MODEL, "num_labels": 1}},
     "model.num_labels=1 with train_impl='normal': a score head trains with train_impl: rm"),
    ({"train_impl": "rm", "model": {**TINY_MODEL, "num_labels": 2}}, "model.num_labels=2: a reward model scores "
                                                                     "with one label"),
    ({"train_impl": "normal"}, "rejected_data_paths is set but train_impl='normal'"),
    ({"pack_impl": "packed"}, "pack_impl=packed with train_impl=dpo: a DPO sample is one document"),
    ({"pack_impl": "pack_until_overflow"}, "pack_impl=pack_until_overflow with train_impl=dpo: a DPO sample is one"),
    ({"pack_impl": "fits"}, "pack_impl='fits': choose packed, unpacked or pack_until_overflow"),
])
def test_dpo_settings_are_checked_at_once(changes, says):
    base = {"model": TINY_MODEL, "seq_length": 16, "train_impl": "dpo", "data_paths": ["c"],
            "rejected_data_paths": ["r"]}
    with pytest.raises(ConfigError, match=re.escape(says)):
        TrainConfig.from_dict({**base, **changes})


def test_dpo_chosen_and_rejected_files_of_different_lengths_are_refused(tmp_path):
    from neox_jax.data.indexed import IndexedDatasetWriter

    for name, documents in (("chosen", 3), ("rejected", 2)):
        with IndexedDatasetWriter(tmp_path / name, np.int32) as w:
            for i in range(documents):
                w.add_document(np.arange(5 + i))
    cfg = TrainConfig.from_dict({"model": TINY_MODEL, "seq_length": 16, "mesh": {"data": 8, "pipe": 1, "tensor": 1},
                                 "micro_batch_size": 1, "train_impl": "dpo", "data_paths": [str(tmp_path / "chosen")],
                                 "rejected_data_paths": [str(tmp_path / "rejected")]})
    with pytest.raises(ValueError, match=f"{tmp_path / 'rejected'} has 2 documents but {tmp_path / 'chosen'} has 3"):
        train(cfg, show_progress=False)


def test_fine_tuning_from_missing_or_other_weights_is_refused_first(tmp_path, corpus):
    import json

    from neox_jax.convert.hf_config import config_to_hf

    (tmp_path / "other").mkdir()  # its config is all that is read before the refusal
    (tmp_path / "other" / "config.json").write_text(json.dumps(config_to_hf(
        NeoXConfig(**{**TINY_MODEL, "num_layers": 3, "rotary_pct": 1.0}))))
    base = TrainConfig.from_dict({"model": TINY_MODEL, "mesh": {"data": 2, "pipe": 1, "tensor": 1}, "seq_length": 32,
                                  "data_paths": [corpus], "save": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=re.escape(f"init_from={tmp_path / 'other'} holds another model than this "
                                                    "run's: model.num_layers=2 but 3 there; model.rotary_pct=0.5 but "
                                                    "1.0 there: give the model settings of those weights")):
        train(base.replace(init_from=str(tmp_path / "other")), show_progress=False)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} does not exist"):
        train(base.replace(init_from=str(tmp_path / "nowhere")), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_neox_yaml_another_optimizer_is_refused(tmp_path):
    f = tmp_path / "m.yml"
    f.write_text(yaml.safe_dump({**NEOX_BASE, "optimizer": {"type": "Lion", "params": {"lr": 1e-4}}}))
    with pytest.raises(ConfigError, match="optimizer type 'Lion' is not supported"):
        neox_yaml.read_train_config(f)
    f.write_text(yaml.safe_dump({**NEOX_BASE, "attention_config": [[["flash"], 2]],
                                 "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}}))
    assert neox_yaml.read_train_config(f).lr == 1e-4  # flash attention and Adam are what we run


# ---- edge inputs of eval, generate and preprocess ---------------------------------------------------------------


@pytest.mark.parametrize("flags, says", [
    (["--max-length", "-1"], "max_length=-1 (--max-length)"),
    (["--batch-size", "0"], "batch_size=0 (--batch-size)"),
])
def test_eval_refuses_impossible_windows_before_loading(tmp_path, capsys, flags, says, big_tokenizer):
    from neox_jax.cli import main as cli

    (tmp_path / "t.txt").write_text("some text")
    code = cli(["eval", "perplexity", "--model", str(tmp_path / "no-model"), "--tokenizer", str(big_tokenizer),
                "--data", str(tmp_path / "t.txt"), *flags])
    assert code == 2 and says in capsys.readouterr().err


def test_eval_of_an_empty_file_is_an_error_not_perplexity_one(tmp_path, capsys, big_tokenizer):
    from neox_jax.cli import main as cli

    (tmp_path / "empty.jsonl").write_text("")
    code = cli(["eval", "perplexity", "--model", str(tmp_path / "no-model"), "--tokenizer", str(big_tokenizer),
                "--data", str(tmp_path / "empty.jsonl")])
    assert code == 2 and "no text to score" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "train-tokenizer"])
def test_a_bad_record_is_named_by_file_and_line_in_every_reader(tmp_path, capsys, big_tokenizer, command):
    from neox_jax.cli import main as cli

    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "fine"}\n\n{"text": 5}\n')
    args = {"eval": ["eval", "perplexity", "--model", str(tmp_path / "no-model"), "--tokenizer", str(big_tokenizer),
                     "--data", str(data)],
            "train-tokenizer": ["train-tokenizer", "--input", str(data), "--vocab-size", "300", "--output",
                                str(tmp_path / "tok.json")]}[command]
    assert cli(args) == 2
    assert f"error: {data}:3: key 'text' is not a string: int: fix or remove that record" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--top-p", "inf")])
def test_generate_refuses_non_finite_sampling_settings(tmp_path, capsys, flag, value, big_tokenizer):
    from neox_jax.cli import main as cli

    code = cli(["generate", "--model", str(tmp_path / "no-model"), "--tokenizer", str(big_tokenizer), "--prompt", "x",
                flag, value])
    assert code == 2 and f"({flag}): must be a finite number" in capsys.readouterr().err


def test_preprocessing_where_every_record_is_bad_fails_and_writes_no_data(tmp_path, capsys, big_tokenizer):
    from neox_jax.cli import main as cli

    (tmp_path / "bad.jsonl").write_text('{"text": 1}\nnot json\n{"other": "x"}\n')
    code = cli(["preprocess", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer", str(big_tokenizer),
                "--output-prefix", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "all 3 records were rejected" in err
    assert not list(tmp_path.glob("out_text_document.*")) and (tmp_path / "out_rejects.tsv").is_file()



# ---- paths that exist as the wrong kind, and answers that were wrong without an error (issue 29: 3, 7) ----------


def test_convert_names_every_bad_destination_and_flag_at_once(tmp_path, capsys):
    from neox_jax.cli import main as cli

    (tmp_path / "afile").write_text("")
    (tmp_path / "bad.yml").write_text("a: 1\n")
    code = cli(["convert", "hf-to-neox", str(tmp_path / "no-model"), str(tmp_path / "afile"), "--tensor-parallel",
                "0", "--step", "-1", "--tokenizer", str(tmp_path / "bad.yml")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot convert:\n")
    for says in ("--tensor-parallel 0: must be at least 1", "--step -1: must be at least 0",
                 f"destination {tmp_path / 'afile'} is a file: give a folder",
                 f"--tokenizer {tmp_path / 'bad.yml'} is not a tokenizer.json the tokenizers library reads"):
        assert says in err, (says, err)
    assert (tmp_path / "afile").read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "bad.yml"]


@pytest.mark.parametrize("setting", ["save", "tensorboard_dir"])
def test_a_run_folder_that_is_a_file_is_refused_before_anything_is_built(tmp_path, corpus, setting):
    (tmp_path / "afile").write_text("mine")
    cfg = TrainConfig.from_dict({"model": TINY_MODEL, "seq_length": 16, "micro_batch_size": 2, "mesh": {"data": 1},
                                 "data_paths": [corpus], setting: str(tmp_path / "afile")})
    with pytest.raises(ConfigError, match=f"{setting}={tmp_path / 'afile'} is a file: give a folder for it"):
        train(cfg, show_progress=False)
    assert (tmp_path / "afile").read_text() == "mine"


def test_train_tokenizer_reports_the_size_it_wrote(tmp_path, capsys):
    from neox_jax.cli import main as cli

    (tmp_path / "small.txt").write_text("hello world\nthe cat sat on the mat\n")
    assert cli(["train-tokenizer", "--input", str(tmp_path / "small.txt"), "--vocab-size", "50000", "--output",
                str(tmp_path / "tok.json")]) == 0
    out = capsys.readouterr().out
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(tmp_path / "tok.json")).get_vocab_size()
    assert size < 50000 and f"({size} tokens); warning: --vocab-size 50000 asked for more than this text" in out


def test_preprocess_refuses_a_worker_count_below_one(tmp_path, capsys, big_tokenizer):
    from neox_jax.cli import main as cli

    (tmp_path / "t.txt").write_text("some text")
    code = cli(["preprocess", "--input", str(tmp_path / "t.txt"), "--tokenizer", str(big_tokenizer),
                "--output-prefix", str(tmp_path / "out"), "--workers", "-2"])
    assert code == 2 and "workers=-2 (--workers): a whole number of processes, at least 1" in capsys.readouterr().err
    assert not list(tmp_path.glob("out_*"))


# ---- the Python API's inputs (issue 29: 4) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    from flax import nnx

    from neox_jax import GPTNeoX

    return GPTNeoX(NeoXConfig(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=64),
                   rngs=nnx.Rngs(0))


@pytest.mark.parametrize("prompts, says", [
    ([[510, 99999, 12]], "prompt 0's ids hold 1 id(s) outside 0..511 (the model's vocab_size), the first 99999 at "
                         "position 1"),
    ([[3, 4], [-1, 5]], "prompt 1's ids hold 1 id(s) outside 0..511 (the model's vocab_size), the first -1 at "
                        "position 0"),
    ([[1.5, 2.0]], "prompt 0's ids are float64: give token ids as integers"),
    ("hello", "prompts are text: generate() takes token ids (lists of ints); tokenize them first, or call "
              "generate_text"),
])
def test_generate_checks_its_prompts_before_compiling(small_model, prompts, says):
    from neox_jax import generate

    with pytest.raises(ValueError, match=re.escape(says)):
        generate(small_model, prompts, 2)


@pytest.mark.parametrize("ids, mask, says", [
    (np.zeros((1, 4), np.float32), None, "input_ids are float32: give token ids as integers"),
    (np.zeros((4,), np.int32), None, "input_ids of shape (4,): expected [batch, tokens]"),
    (np.zeros((1, 4), np.int32), np.ones((1, 5)), "attention_mask of shape (1, 5): expected (1, 4)"),
    (np.full((2, 3), 512, np.int32), None, "input_ids hold 6 id(s) outside 0..511 (the model's vocab_size), the "
                                           "first 512 at row 0, position 0"),
])
def test_the_model_call_checks_ids_and_mask(small_model, ids, mask, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        small_model(ids, attention_mask=mask)


def test_the_scorer_checks_its_ids(small_model):
    from neox_jax.evaluate import Scorer

    with pytest.raises(ValueError, match=re.escape("pair 1's ids hold 1 id(s) outside 0..511 (the model's "
                                                   "vocab_size), the first 600 at position 2")):
        Scorer(small_model).loglikelihood([([0, 5], [6]), ([0, 5], [600])])


# ---- front ends (issue 29: 6) ---------------------------------------------------------------------------------------


def test_a_model_path_that_holds_no_model_says_what_it_is(tmp_path, capsys):
    from neox_jax.cli import main as cli

    (tmp_path / "t.txt").write_text("some text")
    (tmp_path / "data").mkdir()
    (tmp_path / "run" / "tensorboard").mkdir(parents=True)  # a training run before its first save
    cases = [("EleutherAI/pythia-70m", "is not a folder here: neox-jax reads models from local folders and downloads "
                                       "nothing; fetch it first (e.g. `huggingface-cli download EleutherAI/pythia-70m"),
             (str(tmp_path / "data"), "holds no model (no config.json, neox_jax checkpoint, training run or GPT-NeoX"),
             (str(tmp_path / "run"), "is a training run with no complete checkpoint yet: wait for its first save")]
    for model, says in cases:
        assert cli(["eval", "perplexity", "--model", model, "--data", str(tmp_path / "t.txt")]) == 2
        assert says in capsys.readouterr().err, model


def test_generate_refuses_a_tensor_size_the_model_cannot_split_before_loading(tmp_path, capsys, big_tokenizer):
    from neox_jax.cli import main as cli

    make = __import__("tests.conftest", fromlist=["make_hf_model"]).make_hf_model
    make().save_pretrained(tmp_path / "hf")  # 4 heads, intermediate 160
    code = cli(["generate", "--model", str(tmp_path / "hf"), "--tokenizer", str(big_tokenizer), "--prompt", "x",
                "--mesh", "tensor=3"])
    assert code == 2
    assert "--mesh tensor=3 does not divide the model's num_heads=4, intermediate_size=160" in capsys.readouterr().err


def test_launch_refuses_no_processes():
    from neox_jax.cli import main as cli

    with pytest.raises(SystemExit, match="--local 0: start at least 1 process"):
        cli(["launch", "--local", "0", "--", "neox-jax", "info", "pythia-14m"])


def test_train_takes_several_config_files_merged_the_gpt_neox_way(shared, tmp_path, capsys):
    from neox_jax.cli import main as cli

    model = str(shared / "neox-configs" / "pythia" / "pythia-14m.yml")
    setup = tmp_path / "setup.yml"  # a local_setup.yml of keys pythia-14m.yml leaves unset, one of them bad
    setup.write_text(yaml.safe_dump({"save": str(tmp_path / "run"), "seed": "abc"}))
    assert cli(["train", model, str(setup), "train_iters=2"]) == 2  # both files read: the second's seed is named
    assert "seed='abc': expected a whole number" in capsys.readouterr().err
    assert cli(["train", model, "train_iters=2", str(setup)]) == 2
    assert f"{str(setup)!r} comes after the key=value overrides: give every config file before them" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # lm-eval indexes its tasks on each call (5-10 s)
@pytest.mark.parametrize("args, says", [
    ("--tasks no_such_task --model_args path=MODEL", "Tasks not found: no_such_task"),
    ("--tasks lambada_openai --model_args pth=MODEL", "model_args: unknown key 'pth' (did you mean 'path'?)"),
    ("--tasks lambada_openai --model_args path=MODEL,dtype=fp32", "dtype='fp32': choose one of float32, bfloat16"),
])
def test_lm_eval_names_a_bad_task_model_argument_or_dtype(tmp_path, capsys, monkeypatch, args, says):
    require("lm_eval")
    from neox_jax.cli import main as cli

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    __import__("tests.conftest", fromlist=["make_hf_model"]).make_hf_model().save_pretrained(tmp_path)
    assert cli(["lm-eval", "--model", "neox-jax", *args.replace("MODEL", str(tmp_path)).split()]) == 2
    assert says in capsys.readouterr().err


def test_a_label_file_of_another_dataset_is_refused_naming_both(shared, tmp_path):
    out = shared / "neox-post-training" / "out"
    cfg = TrainConfig.from_dict({"model": {**TINY_MODEL, "vocab_size": 50304}, "seq_length": 16,
                                 "mesh": {"data": 8, "pipe": 1, "tensor": 1}, "micro_batch_size": 1,
                                 "data_paths": [str(out / "sft_messages_document")],
                                 "label_data_paths": [str(out / "pairs_chosen_label_document")],
                                 "data_cache_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="label file .*pairs_chosen_label_document does not match .*sft_messages"):
        train(cfg, show_progress=False)
    with pytest.raises(ConfigError, match="label_data_paths has 2 entries for 1 data_paths"):
        cfg.replace(label_data_paths=(str(out / "a"), str(out / "b")))
