"""The `neox-jax` command line: info and the embedded demo."""

import pytest

from neox_jax.cli import main as cli


def test_info_prints_shapes_and_count(capsys):
    assert cli(["info", "pythia-70m"]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 70,426,624" in out
    assert "layers.attention.query_key_value.kernel" in out and "(6, 512, 8, 3, 64)" in out


def test_info_unknown_name_is_an_error():
    with pytest.raises(SystemExit, match="neither a preset"):
        cli(["info", "pythia-7b"])


def test_demo_round_trips_and_matches_transformers(tmp_path, capsys):
    pytest.importorskip("transformers", reason="the demo compares with transformers: pip install -e '.[test]'")
    from neox_jax.demo import run_demo

    diff = run_demo(tmp_path / "demo", "pythia-14m", seq_len=64)
    assert diff <= 1e-4
    out = capsys.readouterr().out
    assert "0 differ after HF -> Orbax -> HF" in out
    assert (tmp_path / "demo" / "orbax" / "neox_config.json").is_file()
