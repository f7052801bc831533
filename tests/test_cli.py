"""The `neox-jax` command line: info, and the corpus the demo trains on."""

import importlib

import pytest

from neox_jax.cli import main as cli

from .conftest import require


def test_info_prints_shapes_and_count(capsys):
    assert cli(["info", "pythia-70m"]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 70,426,624" in out
    assert "layers.attention.query_key_value.kernel" in out and "(6, 512, 8, 3, 64)" in out


def test_info_unknown_name_is_an_error():
    with pytest.raises(SystemExit, match="neither a preset"):
        cli(["info", "pythia-7b"])


def test_corpus_builds_offline(tmp_path, capsys):
    from neox_jax.data.indexed import IndexedDataset
    from neox_jax.data.tokenizer import NeoXTokenizer

    assert cli(["corpus", "--out", str(tmp_path / "c"), "--max-mb", "0.3", "--vocab-size", "1024"]) == 0
    ds = IndexedDataset(tmp_path / "c" / "stdlib_text_document")
    tok = NeoXTokenizer(tmp_path / "c" / "tokenizer.json")
    assert tok.vocab_size == 1024 and len(ds) > 3 and ds[0][-1] == tok.eod_id
    assert "data prefix:" in capsys.readouterr().out


def test_lm_eval_command_hands_its_arguments_to_lm_eval(capsys):
    require("lm_eval")
    with pytest.raises(SystemExit) as exit_:
        cli(["lm-eval", "--help"])
    assert exit_.value.code == 0
    assert "Language Model Evaluation Harness" in capsys.readouterr().out
    from lm_eval.api.registry import get_model

    assert get_model("neox-jax").__name__ == "NeoXJaxLM" and get_model("hf") is not None


def test_public_api_resolves_and_lists_itself():
    import neox_jax

    for name, module in neox_jax._PUBLIC.items():  # each public name is the object its module defines
        assert getattr(neox_jax, name) is getattr(importlib.import_module(module), name), name
    assert set(neox_jax.__all__) <= set(dir(neox_jax))
    assert callable(neox_jax.generate) and neox_jax.generate.__module__ == "neox_jax.generation"


@pytest.mark.slow
def test_plan_fills_a_free_mesh_axis(shared):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # plan emulates its own devices
    out = subprocess.run([sys.executable, "-m", "neox_jax.cli", "plan", str(shared / "neox-configs" / "20B.yml")],
                         env=env, capture_output=True, text=True, check=True).stdout
    # GPT-NeoX's 20B.yml leaves data free (-1): the smallest mesh of its layout, data=1, does not fit 40 GiB
    assert "mesh {'data': 1, 'pipe': 4, 'tensor': 2} on 8 devices" in out and "does NOT fit" in out


def test_generate_prints_no_prompt_before_an_error(tmp_path, capsys):
    from neox_jax.cli import main
    from neox_jax.data.tokenizer import train_tokenizer
    from tests.conftest import make_hf_model

    make_hf_model().save_pretrained(tmp_path / "hf")  # vocab 384, 1024 positions
    tok = train_tokenizer([f"word{i} " * 3 for i in range(200)], 300, tmp_path / "hf" / "tokenizer.json")
    assert tok.is_file()
    code = main(["generate", "--model", str(tmp_path / "hf"), "--prompt", "word1 word2", "--max-new-tokens", "5000"])
    captured = capsys.readouterr()
    assert code == 2 and "exceeds the model's max_position_embeddings=1024" in captured.err
    assert captured.out == ""  # the prompt is printed with its continuation, never before an error
