"""Metrics and progress output: TensorBoard files read back by TensorBoard's own reader; progress in logs."""

import io

import pytest

from neox_jax.metrics import MetricsLogger
from neox_jax.progress import progress

from .conftest import read_scalars


def test_tensorboard_scalars_read_back_by_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path / "tb")
    logger.log(1, {"loss": 4.5, "lr": 1e-3})
    logger.log(2, {"loss": 4.25})
    logger.close()
    assert sorted(read_scalars(tmp_path / "tb")) == sorted(
        [(1, "loss", 4.5), (2, "loss", 4.25), (1, "lr", pytest.approx(1e-3))])


def test_a_disabled_logger_writes_nothing_and_missing_wandb_is_refused(tmp_path, monkeypatch):
    MetricsLogger(tmp_path / "tb", enabled=False).log(1, {"loss": 1.0})
    assert not (tmp_path / "tb").exists()  # processes other than 0
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="wandb_project='proj' is set but wandb is not installed"):
        MetricsLogger("", wandb_project="proj", enabled=False)


def test_progress_off_a_terminal_prints_whole_lines():
    out = io.StringIO()  # not a terminal: no carriage-return redraws
    assert list(progress(range(5), "work", stream=out, stats=lambda s: "fast")) == list(range(5))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and lines and "5/5" in lines[-1] and "fast" in lines[-1]
    assert len(lines) <= 3  # a start line and the end, not one per item
