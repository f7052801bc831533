"""The embedded default job: a small NeoX round-tripped through every format, with its logits checked.

Until the training loop lands this is what `neox-jax demo` runs: it needs no download and no data.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from neox_jax import checkpoint
from neox_jax.config import NeoXConfig
from neox_jax.convert import hf
from neox_jax.model import GPTNeoX
from neox_jax.pretrained import from_pretrained, save_pretrained


def _step(msg):
    print(f"==> {msg}", flush=True)


def run_demo(out: str | Path, preset: str = "pythia-14m", seq_len: int = 256) -> float:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    cfg = NeoXConfig.preset(preset)
    _step(f"building a random {preset} ({cfg.num_params:,} parameters) on {jax.devices()[0].platform}")
    model = GPTNeoX(cfg, rngs=nnx.Rngs(0))

    _step(f"saving it as a Hugging Face folder: {out / 'hf'}")
    save_pretrained(model, out / "hf", show_progress=True)
    _step(f"converting HF -> Orbax: {out / 'orbax'}")
    loaded = from_pretrained(out / "hf", show_progress=True)
    checkpoint.save_params_checkpoint(out / "orbax", nnx.to_pure_dict(nnx.state(loaded, nnx.Param)), loaded.config)
    _step(f"converting Orbax -> HF: {out / 'hf-roundtrip'}")
    params, config = checkpoint.load_params_checkpoint(out / "orbax")
    hf.save_params(params, config, out / "hf-roundtrip", show_progress=True)

    a, b = hf.TensorSource(out / "hf"), hf.TensorSource(out / "hf-roundtrip")
    differing = [n for n in a.names() if not np.array_equal(a.get(n), b.get(n))]
    print(f"    {len(a.names())} tensors, {len(differing)} differ after HF -> Orbax -> HF")
    if differing:
        raise SystemExit(f"round trip changed {differing[:5]}")

    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, seq_len))
    forward = nnx.jit(lambda m, x: m(x))
    t0 = time.perf_counter()
    logits = np.asarray(forward(model, ids))
    t1 = time.perf_counter()
    np.asarray(forward(model, ids))
    t2 = time.perf_counter()
    print(f"    forward [2, {seq_len}]: compile+run {t1 - t0:.2f}s, run {1e3 * (t2 - t1):.1f}ms")
    roundtrip = np.asarray(forward(from_pretrained(out / "hf-roundtrip"), ids))
    print(f"    max |logits - logits after round trip| = {np.abs(logits - roundtrip).max():.3g}")

    try:
        import torch
        from transformers import GPTNeoXForCausalLM
    except ImportError:
        print("    (install neox-jax[torch] to compare with transformers as well)")
        return float(np.abs(logits - roundtrip).max())
    _step("comparing with transformers' GPTNeoXForCausalLM on the exported folder")
    ref_model = GPTNeoXForCausalLM.from_pretrained(out / "hf-roundtrip").eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.float().numpy()
    diff = float(np.abs(logits - ref).max())
    print(f"    max |neox_jax - transformers| logits = {diff:.3g} (fp32, CPU)")
    if diff > 1e-4:
        raise SystemExit("logits differ from transformers by more than 1e-4")
    _step("done")
    return diff
