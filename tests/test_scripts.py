"""The benchmark and GPU-check scripts run end to end on this CPU at toy sizes (each side its own process), so the
ones a lent GPU runs (scripts/gpu_checks.sh) are known to work before the device time is spent."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(ROOT)}


def run(script: str, *args: str) -> list[dict]:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_fused_attention_check_on_cpu_finds_no_fused_call_and_xla_equal_to_the_einsum():
    rows = run("check_fused_attention.py", "--heads", "64")
    assert [r["check"] for r in rows] == ["train step, head 64", "pipeline stage program, head 64",
                                          "(data 2, pipe 4, tensor 2) on 2 x 8 h100-80gb, compiled without devices, "
                                          "head 64"]
    assert all(r["ok"] for r in rows) and rows[0]["fused_calls"] == rows[1]["fused_calls"] == []
    assert rows[2]["fused_calls"] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]  # the GPU's program
    assert abs(rows[0]["loss"] - rows[0]["xla_loss"]) <= 1e-3 and rows[0]["worst_grad_rel_diff"] <= 3e-2


@pytest.mark.slow
def test_bench_train_and_bench_decode_compare_with_transformers():
    require("transformers")
    (train,) = run("bench_train.py", "--preset", "pythia-14m", "--seq", "32", "--micro-batch", "2", "--steps", "1",
                   "--pairs", "1", "--precision", "bf16", "--compare", "transformers", "--xla-defaults", "off")
    assert train["xla_defaults"] == "off" and train["neox_jax"]["median"] > 0 and train["transformers"]["median"] > 0
    assert train["setup"]["host_malloc"] == ("reuse" if platform.libc_ver()[0] == "glibc" else "system")
    # both sides time the same work: the folder's weights on the same tokens give the same loss (bf16 rounding)
    assert train["neox_jax"]["loss_at_start"] == pytest.approx(train["transformers"]["loss_at_start"], abs=0.05)
    assert train["neox_jax"]["step_s"] > 0 and train["transformers"]["backward_over_forward"] > 0
    (decode,) = run("bench_decode.py", "--presets", "pythia-14m", "--batches", "2", "--prompt-len", "4",
                    "--new-tokens", "4", "--pairs", "1", "--calls", "1", "--dtype", "bfloat16", "--compare",
                    "transformers", "--weight-copies", "off")  # a GPU's layout (the CPU's is the other tests')
    assert decode["batch"] == 2 and decode["dtype"] == "bfloat16" and decode["weight_copies"] == "off"
    assert decode["neox_jax"]["median"] > 0 and decode["transformers"]["median"] > 0


def test_gpu_checks_table_applies_each_criterion(tmp_path):
    """`gpu_checks.sh report` runs no part and tabulates what $OUT holds: here a train ratio under 1 fails."""
    (tmp_path / "memory.jsonl").write_text(json.dumps({"check": "train step memory", "real_gb": 30.0,
                                                       "deviceless_gb": 28.0, "difference": 0.071, "ok": True}) + "\n")
    (tmp_path / "train.jsonl").write_text(json.dumps({"neox_jax": {"median": 900.0, "mfu_6n": 0.3},
                                                      "transformers": {"median": 1000.0},
                                                      "neox_jax/transformers": {"median": 0.9}}) + "\n")
    (tmp_path / "decode.jsonl").write_text(json.dumps({"neox_jax": {"median": 40.0}, "fraction_of_bound":
                                                       {"median": 0.61}, "neox_jax/transformers": {"median": 1.4}}))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh"), "report"], capture_output=True, text=True,
                          env=ENV | {"OUT": str(tmp_path)}, cwd=ROOT, timeout=300)
    lines = done.stdout.splitlines()
    assert done.returncode == 1 and lines[-1] == "2 passed, 1 failed"
    assert any("real 30.00 GB, deviceless 28.00 GB (7.1%)" in line and line.endswith("pass") for line in lines)
    assert any("900 vs 1,000 tokens/s (ratio 0.90)" in line and line.endswith("FAIL") for line in lines)
    assert any("61% of the bound" in line and line.endswith("pass") for line in lines)
