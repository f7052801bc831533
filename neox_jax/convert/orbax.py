"""Params checkpoints written and read one tensor at a time, so converting a model never holds it in RAM.

Orbax's public API saves whole arrays, and a stacked parameter of the 20B (`[44, 6144, 24576]` in fp32)
is 26.6 GB. `ParamsWriter` therefore lets Orbax write the tree's metadata from one-element placeholders,
then writes each array's zarr data itself with tensorstore, one layer's slice at a time (chunked per layer),
and records the true shapes in Orbax's metadata. The result is an ordinary Orbax (non-OCDBT) checkpoint:
`load_params_checkpoint` and `from_pretrained` restore it onto any mesh; a test restores it with Orbax.

`ParamsReader` reads one layer's slice of one parameter from any params checkpoint (ours, or Orbax's
default OCDBT layout) through tensorstore; `orbax_source` presents it under Hugging Face names, the common
currency of every converter in this package (`hf.TensorSource`, `hf.ParamsSource`, `neox.NeoXSource`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from neox_jax.atomic import partial, write_json
from neox_jax.checkpoint import CONFIG_FILE, is_params_checkpoint, load_config
from neox_jax.config import NeoXConfig
from neox_jax.convert.hf import ParamsSource, get_path, to_ours, check_tensors, hf_shapes, tensor_slots
from neox_jax.errors import CheckpointError

CHUNK_BYTES = 256 * 2**20  # split a layer's slice further when it is bigger than this


def _chunks(shape: tuple[int, ...], itemsize: int, stacked: bool) -> list[int]:
    """Chunk shape: one layer at a time for stacked parameters, halved along the largest axis while too big."""
    chunk = [1, *shape[1:]] if stacked else list(shape)
    while math.prod(chunk) * itemsize > CHUNK_BYTES:
        axis = max(range(len(chunk)), key=lambda a: chunk[a])
        if chunk[axis] < 2:
            break
        chunk[axis] = math.ceil(chunk[axis] / 2)
    return chunk


class ParamsWriter:
    """Write a params checkpoint (`neox_config.json` + `params/`) slice by slice.

    Everything goes into `DST/.partial/` and is moved to `DST/params` once every array is complete;
    `neox_config.json`, written last, marks the checkpoint finished.
    """

    def __init__(self, path: str | os.PathLike, config: NeoXConfig, abstract_params: dict):
        import orbax.checkpoint as ocp
        import tensorstore as ts
        from flax.traverse_util import flatten_dict, unflatten_dict

        self.out = Path(path).absolute()
        if (self.out / "params").exists():
            raise FileExistsError(f"{self.out / 'params'} already exists: choose a new destination or remove it")
        self.config = config
        leaves = flatten_dict(abstract_params)
        staging = partial(self.out / ".partial")
        shutil.rmtree(staging, ignore_errors=True)  # an earlier interrupted conversion
        staging.mkdir(parents=True)
        self.dir = staging / "params"
        placeholders = unflatten_dict({k: np.zeros((1,) * len(v.shape), v.dtype) for k, v in leaves.items()})
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # Orbax warns that it has no OCDBT files to merge: we asked for none
        try:
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as ckptr:
                ckptr.save(self.dir, args=ocp.args.PyTreeSave(placeholders))
        finally:
            absl.setLevel(level)
        self.arrays = {}
        for keys, leaf in leaves.items():
            self.arrays[".".join(keys)] = ts.open({
                "driver": "zarr", "kvstore": {"driver": "file", "path": str(self.dir / ".".join(keys))},
                # zarr has no bfloat16 of its own: tensorstore's name for it (numpy's `.str`, '<V2', made a void pair)
                "metadata": {"shape": list(leaf.shape), "dtype": ("bfloat16" if np.dtype(leaf.dtype).name == "bfloat16"
                                                                  else np.dtype(leaf.dtype).str),
                             "chunks": _chunks(leaf.shape, np.dtype(leaf.dtype).itemsize, keys[0] == "layers"),
                             "compressor": None},
            }, create=True, delete_existing=True).result()
        self.written: dict[str, set] = {name: set() for name in self.arrays}

    def write(self, path: str, value: np.ndarray, layer: int | None = None):
        """Write parameter `path` (dotted, e.g. `layers.mlp.dense_h_to_4h.kernel`), or its `layer`-th slice."""
        array = self.arrays[path]
        want = array.shape if layer is None else array.shape[1:]
        if tuple(value.shape) != tuple(want):
            raise CheckpointError(f"{path}{'' if layer is None else f' layer {layer}'}: shape {value.shape}, "
                                  f"the model needs {tuple(want)}")
        value = np.asarray(value, dtype=array.dtype.numpy_dtype)
        (array if layer is None else array[layer]).write(value).result()
        self.written[path].add(layer)

    def close(self) -> Path:
        """Check that every slice was written, record the true shapes, move the checkpoint into place."""
        missing = [p for p, done in self.written.items()
                   if done != (set(range(self.arrays[p].shape[0])) if p.startswith("layers.") else {None})]
        if missing:
            raise CheckpointError(f"conversion incomplete: {', '.join(missing[:5])} not fully written")
        self._record_shapes()
        os.replace(self.dir, self.out / "params")
        shutil.rmtree(self.dir.parent, ignore_errors=True)
        write_json(self.out / CONFIG_FILE, self.config.to_dict())
        return self.out

    def _record_shapes(self):
        """Orbax's metadata still names the placeholders' shapes: replace them with the real ones."""
        meta_file = self.dir / "_METADATA"
        meta = json.loads(meta_file.read_text())
        for entry in meta["tree_metadata"].values():
            name = ".".join(k["key"] for k in entry["key_metadata"])
            entry["value_metadata"]["write_shape"] = list(self.arrays[name].shape)
        meta_file.write_text(json.dumps(meta))
        for file in sorted((self.dir / "array_metadatas").glob("*")):  # present for some leaf types only
            data = json.loads(file.read_text())
            for item in data["array_metadatas"]:
                m = item["array_metadata"]
                m["write_shape"] = list(self.arrays[m["param_name"]].shape)
                m["chunk_shape"] = list(self.arrays[m["param_name"]].chunk_layout.read_chunk.shape)
            file.write_text(json.dumps(data))


class ParamsReader:
    """Read single parameters, or one layer's slice of one, from a params checkpoint, through tensorstore."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()
        if not is_params_checkpoint(self.path):
            raise FileNotFoundError(f"{self.path} is not a neox_jax params checkpoint (needs {CONFIG_FILE} and params/)")
        self.config = load_config(self.path)
        self.dir = self.path / "params"
        meta = json.loads((self.dir / "_METADATA").read_text())
        self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self._ocdbt = meta.get("use_ocdbt", False) or (self.dir / "manifest.ocdbt").is_file()
        self._open: dict[str, object] = {}

    def _array(self, path: str):
        import tensorstore as ts

        if path not in self._open:
            if self._ocdbt:
                kvstore = {"driver": "ocdbt", "base": f"file://{self.dir}", "path": path}
            else:
                kvstore = {"driver": "file", "path": str(self.dir / path)}
            try:
                self._open[path] = ts.open({"driver": self._driver, "kvstore": kvstore}, open=True).result()
            except ValueError as e:
                raise CheckpointError(f"{self.dir}: cannot read {path} ({e}); the checkpoint is incomplete or "
                                      "was written for another model") from None
        return self._open[path]

    def dtype(self, path: str) -> np.dtype:
        return self._array(path).dtype.numpy_dtype

    def read(self, path: str, layer: int | None = None) -> np.ndarray:
        array = self._array(path)
        return (array if layer is None else array[layer]).read().result()


def orbax_source(path: str | os.PathLike) -> ParamsSource:
    """A params checkpoint seen as Hugging Face tensors (names, torch layout), read one at a time."""
    reader = ParamsReader(path)
    return ParamsSource(reader.read, reader.config, reader.path)


def write_params(source, config: NeoXConfig, dst: str | os.PathLike, dtype: str = "float32",
                 show_progress: bool = False) -> Path:
    """Stream a tensor source (Hugging Face names, torch layout) into a params checkpoint at `dst`."""
    from flax import nnx

    from neox_jax.model import abstract_model
    from neox_jax.progress import bar as progress_bar

    config = config.replace(param_dtype=dtype)
    check_tensors(source, config)
    abstract = nnx.to_pure_dict(abstract_model(config)[1])
    writer = ParamsWriter(dst, config, abstract)
    nbytes = sum(math.prod(s) for s in hf_shapes(config).values()) * np.dtype(dtype).itemsize
    with progress_bar("converting", nbytes, show_progress, unit="B") as bar:
        for name, path, layer, transposed in tensor_slots(config):
            target = get_path(abstract, path)
            shape = target.shape if layer is None else target.shape[1:]
            value = to_ours(source.get(name), transposed, shape, target.dtype)
            writer.write(path, value, layer)
            bar.update(value.nbytes)
            del value
    return writer.close()
