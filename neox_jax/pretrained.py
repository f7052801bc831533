"""`from_pretrained` / `save_pretrained`: one entry point for every place a model's weights live."""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from neox_jax import checkpoint
from neox_jax.config import NeoXConfig
from neox_jax.convert import hf
from neox_jax.model import GPTNeoX, abstract_model, with_params


def from_pretrained(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str = "float32",
                    show_progress: bool = False) -> GPTNeoX:
    """Load a GPTNeoX from a Hugging Face folder (safetensors, sharded or not, or pytorch_model.bin), a
    neox_jax Orbax params checkpoint, or a `neox-jax train` checkpoint folder (its latest step).
    `dtype` is the compute dtype (default: the config's; fp32 for a training checkpoint)."""
    p = Path(path)
    if checkpoint.is_train_checkpoint(p):  # a `neox-jax train` folder: the latest step's weights
        ckpt = checkpoint.TrainCheckpointer(p)
        step = ckpt.latest_step()
        config = NeoXConfig.from_dict(ckpt.read_meta(step)["config"]["model"])
        config = config.replace(param_dtype=param_dtype, dtype=dtype or "float32")
        params = ckpt.restore_weights(step, nnx.to_pure_dict(abstract_model(config)[1]))
        ckpt.close()
        return with_params(config, params)
    if checkpoint.is_params_checkpoint(p):
        config = checkpoint.load_config(p)
        config = config.replace(param_dtype=param_dtype, **({"dtype": dtype} if dtype else {}))
        params, _ = checkpoint.load_params_checkpoint(p, nnx.to_pure_dict(abstract_model(config)[1]))
        return with_params(config, params)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: give a Hugging Face model folder or a neox_jax checkpoint")
    return hf.load_model(p, dtype=dtype, param_dtype=param_dtype, show_progress=show_progress)


def save_pretrained(model: GPTNeoX, path: str | os.PathLike, *, dtype=None, show_progress: bool = False) -> Path:
    """Write a Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    return hf.save_model(model, path, dtype=dtype, show_progress=show_progress)
