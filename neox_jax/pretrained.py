"""`from_pretrained` / `save_pretrained`: one entry point for every place a model's weights live."""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from neox_jax import checkpoint
from neox_jax import sharding as shd
from neox_jax.config import NeoXConfig, model_differences
from neox_jax.convert import hf, neox
from neox_jax.convert.hf_config import config_from_hf
from neox_jax.errors import ConfigError
from neox_jax.model import GPTNeoX, abstract_model, with_params


def from_pretrained(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str = "float32",
                    mesh: Mesh | None = None, show_progress: bool = False) -> GPTNeoX:
    """Load a GPTNeoX from a Hugging Face folder (safetensors, sharded or not, or pytorch_model.bin), a
    neox_jax Orbax params checkpoint, a `neox-jax train` checkpoint folder (its latest step), or a GPT-NeoX
    (DeepSpeed) checkpoint folder, pipeline or sequential format, any tensor-parallel degree.
    `dtype` is the compute dtype (default: the config's; fp32 for a training checkpoint). With `mesh` the
    weights are laid out on it by the rules table, each process reading only its own shards (Orbax sources)."""
    p = Path(path)
    if checkpoint.is_train_checkpoint(p):  # a `neox-jax train` folder: the latest step's weights
        ckpt = checkpoint.TrainCheckpointer(p)
        step = ckpt.latest_step()
        config = NeoXConfig.from_dict(ckpt.read_meta(step)["config"]["model"])
        config = config.replace(param_dtype=param_dtype, dtype=dtype or "float32")
        params = ckpt.restore_weights(step, abstract_params(config, mesh))
        ckpt.close()
        return with_params(config, params)
    if checkpoint.is_params_checkpoint(p):
        config = checkpoint.load_config(p)
        config = config.replace(param_dtype=param_dtype, **({"dtype": dtype} if dtype else {}))
        params, _ = checkpoint.load_params_checkpoint(p, abstract_params(config, mesh))
        return with_params(config, params)
    check_model_path(p)
    source = None
    if neox.is_neox_checkpoint(p):  # GPT-NeoX's own checkpoint: its tensor-parallel shards merged as read
        source = neox.NeoXSource(p)
        config = source.config
    else:
        config = config_from_hf(p if p.is_dir() else p.parent)
    shardings = None
    if mesh is not None:
        shardings = jax.tree.map(lambda x: x.sharding, abstract_params(config.replace(param_dtype=param_dtype), mesh))
    return hf.load_model(p, dtype=dtype, param_dtype=param_dtype, config=config, shardings=shardings, source=source,
                         show_progress=show_progress)


def model_config(path: str | os.PathLike) -> NeoXConfig:
    """The NeoXConfig of a model `from_pretrained` reads, without reading its weights."""
    p = Path(path)
    if checkpoint.is_params_checkpoint(p):
        return checkpoint.load_config(p)
    if checkpoint.is_train_checkpoint(p):
        ckpt = checkpoint.TrainCheckpointer(p)
        try:
            return NeoXConfig.from_dict(ckpt.read_meta(ckpt.latest_step())["config"]["model"])
        finally:
            ckpt.close()
    check_model_path(p)
    if neox.is_neox_checkpoint(p):
        return neox.NeoXSource(p).config
    return config_from_hf(p if p.is_dir() else p.parent)


def check_same_model(config: NeoXConfig, weights: NeoXConfig, where: str):
    """That `config` computes the function of the weights `weights` describes (how it runs may differ), else a
    ConfigError naming every field that differs."""
    differ = [f"model.{k}={v!r} but {w!r} there" for k, v, w in model_differences(config.to_dict(),
                                                                                   weights.to_dict())]
    if differ:
        raise ConfigError(f"{where} holds another model than this run's: " + "; ".join(differ)
                          + ": give the model settings of those weights")


def abstract_params(config: NeoXConfig, mesh: Mesh | None = None) -> dict:
    """The params tree as ShapeDtypeStructs; with `mesh`, carrying the rules table's shardings on it."""
    _, state = abstract_model(config)
    params = nnx.to_pure_dict(state)
    if mesh is None:
        return params
    specs = shd.param_specs(params, nnx.to_pure_dict(nnx.get_partition_spec(state)), mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                        params, specs, is_leaf=lambda x: isinstance(x, P))


def save_pretrained(model: GPTNeoX, path: str | os.PathLike, *, dtype=None, show_progress: bool = False) -> Path:
    """Write a Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    return hf.save_model(model, path, dtype=dtype, show_progress=show_progress)


def tokenizer_path(model_path: str | os.PathLike) -> Path | None:
    """The tokenizer.json that goes with a model: in its folder (Hugging Face folders, converted checkpoints and
    training runs all keep one there), else the one a training run's config names; None when there is none."""
    p = Path(model_path)
    if (p / "tokenizer.json").is_file():
        return p / "tokenizer.json"
    if checkpoint.is_train_checkpoint(p):
        ckpt = checkpoint.TrainCheckpointer(p)
        try:
            named = ckpt.read_meta(ckpt.latest_step())["config"].get("tokenizer")
        finally:
            ckpt.close()
        if named and Path(named).is_file():
            return Path(named)
    return None


def check_model_path(path: str | os.PathLike):
    """That `path` holds a model `from_pretrained` reads, else a FileNotFoundError saying what it is instead: a
    Hugging Face Hub name (models are read from local folders), a folder without a model (data, say), a training
    run with no checkpoint yet."""
    p = Path(path)
    if not p.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith("."):
            raise FileNotFoundError(f"{path} is not a folder here: neox-jax reads models from local folders and "
                                    f"downloads nothing; fetch it first (e.g. `huggingface-cli download {path} "
                                    f"--local-dir {p.name}`) and give that folder")
        raise FileNotFoundError(f"{p} does not exist: give a Hugging Face model folder, a neox_jax checkpoint, a "
                                "training run or a GPT-NeoX checkpoint")
    folder = p if p.is_dir() else p.parent
    if (folder / "config.json").is_file() or checkpoint.is_params_checkpoint(p) or checkpoint.is_train_checkpoint(p) \
            or neox.is_neox_checkpoint(p):
        return
    if p.is_dir() and any(c.name.isdigit() for c in p.iterdir()) or (p / "tensorboard").is_dir():
        raise FileNotFoundError(f"{p} is a training run with no complete checkpoint yet: wait for its first save "
                                "(save_interval), or give another model")
    raise FileNotFoundError(f"{p} holds no model (no config.json, neox_jax checkpoint, training run or GPT-NeoX "
                            "checkpoint): give the folder the model's weights are in")


def load_tokenizer(model_path: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    """A NeoXTokenizer: `tokenizer` when given, else the model's own (see `tokenizer_path`)."""
    from neox_jax.data.tokenizer import NeoXTokenizer

    if tokenizer is None:  # the model's own: say first when there is no model
        check_model_path(model_path)
    found = tokenizer or tokenizer_path(model_path)
    if not found:
        raise FileNotFoundError(f"{model_path} has no tokenizer.json beside its weights and names none: give "
                                "--tokenizer with the tokenizer.json the model was trained with")
    return NeoXTokenizer(found)


def check_vocab(tokenizer, config: NeoXConfig, setting: str):
    """A tokenizer whose ids reach past the model's embedding would index garbage (NaN losses, empty text):
    refuse it before anything is compiled, naming the setting that chose it."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"{setting}={tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{config.vocab_size}: its ids would fall outside the embedding; use the model's own "
                          "tokenizer or a model with a larger vocab_size")
