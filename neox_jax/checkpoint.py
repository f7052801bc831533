"""Orbax checkpoints of model parameters, with the NeoXConfig beside them.

Layout of a params checkpoint folder:
    neox_config.json   the NeoXConfig (what `from_pretrained` needs to rebuild the model)
    params/            an Orbax StandardCheckpointer tree of the nested parameter dict

Orbax writes into a temporary folder and renames it when complete, so an interrupted save never
looks finished. Restore takes abstract targets, so a checkpoint restores onto any mesh.

Training checkpoints (`TrainCheckpointer`) hold the whole train state as a flat dict of arrays keyed by
their tree paths, beside JSON metadata (config, step, data position, integrity probe).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from neox_jax.atomic import write_json
from neox_jax.config import NeoXConfig
from neox_jax.errors import CheckpointMismatchError, ConfigError

CONFIG_FILE = "neox_config.json"


def is_train_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any(c.name.isdigit() and (c / "meta").is_dir() for c in p.iterdir())


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
    write_json(out / CONFIG_FILE, config.to_dict())  # written last: its presence marks a complete checkpoint
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
        from neox_jax.model import abstract_model

        abstract_params = nnx.to_pure_dict(abstract_model(config)[1])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                          abstract_params)
    with readable(p), ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(p / "params", target)
    return params, config


# ---- training checkpoints -----------------------------------------------------------------------------------


@contextlib.contextmanager
def readable(where, advice: str = "it is corrupt or incomplete"):
    """Orbax, tensorstore and JSON read errors as one line naming the checkpoint and what to do."""
    try:
        yield
    except (CheckpointMismatchError, ConfigError):
        raise
    except (ValueError, OSError, KeyError) as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointMismatchError(f"checkpoint {where} cannot be read ({reason}); {advice}") from e


def flatten(tree) -> tuple[dict[str, Any], Any]:
    """{'params/layers/attention/dense/kernel': leaf, ...} and the treedef to rebuild the tree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key(k) for k in path): leaf for path, leaf in leaves}, treedef


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _fingerprint(x) -> jax.Array:
    """Two sums over a tensor's raw bits, mod 2^32: of the bits, and of the bits times a weight of each element's
    position. Integer sums do not depend on the order of addition, so the result is the same whatever the
    mesh, sharding or number of processes; a flipped bit changes the first, swapped elements the second."""
    import jax.numpy as jnp

    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    position, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for axis in reversed(range(x.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    weight = position * jnp.uint32(2654435761) + jnp.uint32(1)  # Knuth's multiplicative hash of the position
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


def make_fingerprinter(mesh):
    """A function: (sharded) state -> {tensor path: [two uint32 sums]}, computed on the devices (compiled once
    per state structure) and replicated to every process; see `_fingerprint`."""
    from jax.sharding import NamedSharding, PartitionSpec

    sums = jax.jit(lambda leaves: [_fingerprint(x) for x in leaves], out_shardings=NamedSharding(mesh, PartitionSpec()))

    def fingerprints(state) -> dict[str, list[int]]:
        flat, _ = flatten(state)
        names = [k for k, v in flat.items() if v is not None]
        return {k: [int(v) for v in jax.device_get(s)] for k, s in zip(names, sums([flat[k] for k in names]))}

    return fingerprints


class TrainCheckpointer:
    """Orbax CheckpointManager for train states: async saves, keep the last K (and every M-th step forever),
    JSON metadata beside the arrays. Orbax writes each step into a temporary folder and renames it once
    complete, so a crash mid-save leaves the previous checkpoint as the latest."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_last or None, keep_period=keep_every or None,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict):
        flat, _ = flatten(state)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(flat),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_shapes(self, step: int, abstract_state):
        """Name the first tensor whose shape differs between the checkpoint and the run (or that is missing)."""
        stored = self.manager.item_metadata(step)["state"]
        target, _ = flatten(abstract_state)
        for name, want in target.items():
            have = stored.get(name) if hasattr(stored, "get") else None
            if have is None:
                raise CheckpointMismatchError(f"checkpoint {self.directory}/{step} has no tensor {name}: it was "
                                              "written for another model or precision")
            if tuple(have.shape) != tuple(want.shape):
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory}/{step}: {name} has shape {tuple(have.shape)} but this run's model "
                    f"needs {tuple(want.shape)}; it was written for another model shape (use another `save` folder)")

    def restore(self, step: int, abstract_state):
        """The state at `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings) says."""
        self.check_shapes(step, abstract_state)
        target, treedef = flatten(abstract_state)
        flat = self._restore(step, target)
        return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in target])

    def _restore(self, step: int, target: dict, partial: bool = False) -> dict:
        """Each process reads only the shards its devices hold, laid out as the target's shardings say."""
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=partial)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]

    def restore_weights(self, step: int, abstract_params) -> dict:
        """Only the model weights of a train state (the fp32 master when there is one; the optimizer state is
        never read), laid out as `abstract_params` says: ShapeDtypeStructs with shardings to restore onto a
        mesh, without them onto this process's first device."""
        stored = self.manager.item_metadata(step)["state"]
        source = "master" if any(k.startswith("master/") for k in stored) else "params"
        flat, treedef = flatten(abstract_params)
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {}
        for k, v in flat.items():
            have = stored[f"{source}/{k}"]
            target[f"{source}/{k}"] = jax.ShapeDtypeStruct(have.shape, have.dtype,
                                                           sharding=getattr(v, "sharding", None) or local)
        with readable(f"{self.directory}/{step}"):
            restored = self._restore(step, target, partial=True)
        return jax.tree_util.tree_unflatten(treedef,
                                            [restored[f"{source}/{k}"].astype(v.dtype) for k, v in flat.items()])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
