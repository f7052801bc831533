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
                                          "(data 2, pipe 4, tensor 2) lowered, head 64"]
    assert all(r["ok"] and r["fused_calls"] == [] for r in rows)
    assert abs(rows[0]["loss"] - rows[0]["xla_loss"]) <= 1e-3 and rows[0]["worst_grad_rel_diff"] <= 3e-2


@pytest.mark.slow
def test_bench_train_and_bench_decode_compare_with_transformers():
    require("transformers")
    (train,) = run("bench_train.py", "--preset", "pythia-14m", "--seq", "32", "--micro-batch", "2", "--steps", "1",
                   "--pairs", "1", "--precision", "bf16", "--compare", "transformers", "--xla-defaults", "off")
    assert train["xla_defaults"] == "off" and train["neox_jax"]["median"] > 0 and train["transformers"]["median"] > 0
    assert train["setup"]["host_malloc"] == ("reuse" if platform.libc_ver()[0] == "glibc" else "system")
    assert train["neox_jax/transformers"]["median"] == pytest.approx(
        train["neox_jax"]["median"] / train["transformers"]["median"], rel=1e-3)
    assert train["neox_jax"]["step_s"] > 0 and train["transformers"]["backward_over_forward"] > 0
    (decode,) = run("bench_decode.py", "--presets", "pythia-14m", "--batches", "2", "--prompt-len", "4",
                    "--new-tokens", "4", "--pairs", "1", "--calls", "1", "--dtype", "bfloat16", "--compare",
                    "transformers", "--weight-copies", "off")  # a GPU's layout (the CPU's is the other tests')
    assert decode["batch"] == 2 and decode["dtype"] == "bfloat16" and decode["weight_copies"] == "off"
    assert decode["neox_jax"]["median"] > 0 and decode["transformers"]["median"] > 0
