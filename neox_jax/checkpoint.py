"""Orbax checkpoints of model parameters, with the NeoXConfig beside them.

Layout of a params checkpoint folder:
    neox_config.json   the NeoXConfig (what `from_pretrained` needs to rebuild the model)
    params/            an Orbax StandardCheckpointer tree of the nested parameter dict

Orbax writes into a temporary folder and renames it when complete, so an interrupted save never
looks finished. Restore takes abstract targets, so a future mesh can restore onto any sharding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from neox_jax.config import NeoXConfig

CONFIG_FILE = "neox_config.json"


def is_params_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / "params").is_dir()


def save_params_checkpoint(path: str | os.PathLike, params: dict, config: NeoXConfig) -> Path:
    out = Path(path).absolute()
    if (out / "params").exists():
        raise FileExistsError(f"{out / 'params'} already exists: choose a new destination or remove it")
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params)
        ckptr.wait_until_finished()
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)  # written last: its presence marks a complete checkpoint
    return out


def load_config(path: str | os.PathLike) -> NeoXConfig:
    return NeoXConfig.from_dict(json.loads((Path(path) / CONFIG_FILE).read_text()))


def load_params_checkpoint(path: str | os.PathLike, abstract_params=None):
    """(params, config); `abstract_params` (ShapeDtypeStructs, optionally with shardings) sets the target."""
    p = Path(path).absolute()
    if not is_params_checkpoint(p):
        raise FileNotFoundError(f"{p} is not a neox_jax params checkpoint (needs {CONFIG_FILE} and params/)")
    config = load_config(p)
    if abstract_params is None:
        from neox_jax.model import GPTNeoX

        abstract = nnx.eval_shape(lambda: GPTNeoX(config, rngs=nnx.Rngs(0)))
        abstract_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                          abstract_params)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(p / "params", target)
    return params, config
