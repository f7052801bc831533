"""Hugging Face GPT-NeoX checkpoints <-> neox_jax parameters, one tensor at a time.

Every converter in this package meets at Hugging Face names: a *tensor source* (`names()`, `shape(name)`,
`get(name)` -> a numpy array in torch layout) is read by every sink (`read_params` into a model, `write_hf`,
`orbax.write_params`, `neox.write_neox`). Sources here: `TensorSource` (a Hugging Face folder: safetensors,
single or sharded, or `pytorch_model.bin` through `torch.load(weights_only=True)`) and `ParamsSource` (our
params tree, or an Orbax checkpoint read a layer's slice at a time).

The mapping is a table: Hugging Face name <-> parameter path, and whether the matrix is transposed
(torch `[out, in]` vs our `[in, out]`); every other difference is a reshape to the shapes the model declares.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from neox_jax.atomic import temp_path, write_json
from neox_jax.config import NeoXConfig
from neox_jax.convert.hf_config import config_from_hf, config_to_hf
from neox_jax.errors import CheckpointError
from neox_jax.progress import bar, progress

# (Hugging Face name, parameter path, transposed)
LAYER_TABLE = (
    ("input_layernorm.weight", "input_layernorm.scale", False),
    ("input_layernorm.bias", "input_layernorm.bias", False),
    ("post_attention_layernorm.weight", "post_attention_layernorm.scale", False),
    ("post_attention_layernorm.bias", "post_attention_layernorm.bias", False),
    ("attention.query_key_value.weight", "attention.query_key_value.kernel", True),
    ("attention.query_key_value.bias", "attention.query_key_value.bias", False),
    ("attention.dense.weight", "attention.dense.kernel", True),
    ("attention.dense.bias", "attention.dense.bias", False),
    ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.kernel", True),
    ("mlp.dense_h_to_4h.bias", "mlp.dense_h_to_4h.bias", False),
    ("mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.kernel", True),
    ("mlp.dense_4h_to_h.bias", "mlp.dense_4h_to_h.bias", False),
)
TOP_TABLE = (
    ("gpt_neox.embed_in.weight", "embed_in.embedding", False),
    ("gpt_neox.final_layer_norm.weight", "final_layer_norm.scale", False),
    ("gpt_neox.final_layer_norm.bias", "final_layer_norm.bias", False),
    ("embed_out.weight", "embed_out.kernel", True),
)
SCORE = ("score.weight", "score.kernel", True)  # GPTNeoXForSequenceClassification's head, in embed_out's place
LAYER_PREFIX = "gpt_neox.layers.{}."
# Buffers that old checkpoints carry and that hold no learned value.
IGNORED = re.compile(r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
# transformers v5 names the output layer lm_head.
ALIASES = {"lm_head.weight": "embed_out.weight"}


def top_table(cfg: NeoXConfig) -> tuple:
    """TOP_TABLE, with the score head in the output layer's place for a score model (num_labels > 0)."""
    return TOP_TABLE[:-1] + ((SCORE,) if cfg.num_labels else TOP_TABLE[-1:])


def tensor_slots(cfg: NeoXConfig) -> list[tuple[str, str, int | None, bool]]:
    """(Hugging Face name, parameter path, layer or None, transposed) of every tensor, in Hugging Face's order:
    embedding, layers, final norm, output."""
    (embed, *rest) = top_table(cfg)
    layers = [(LAYER_PREFIX.format(i) + hf, "layers." + path, i, t) for i in range(cfg.num_layers)
              for hf, path, t in LAYER_TABLE]
    return [(embed[0], embed[1], None, embed[2]), *layers, *((hf, path, None, t) for hf, path, t in rest)]


def hf_shapes(cfg: NeoXConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of this config with its torch shape."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    layer = {
        "input_layernorm.weight": (d,), "input_layernorm.bias": (d,),
        "post_attention_layernorm.weight": (d,), "post_attention_layernorm.bias": (d,),
        "attention.query_key_value.weight": (3 * d, d), "attention.query_key_value.bias": (3 * d,),
        "attention.dense.weight": (d, d), "attention.dense.bias": (d,),
        "mlp.dense_h_to_4h.weight": (f, d), "mlp.dense_h_to_4h.bias": (f,),
        "mlp.dense_4h_to_h.weight": (d, f), "mlp.dense_4h_to_h.bias": (d,),
    }
    shapes = {"gpt_neox.embed_in.weight": (v, d), "gpt_neox.final_layer_norm.weight": (d,),
              "gpt_neox.final_layer_norm.bias": (d,),
              **({"score.weight": (cfg.num_labels, d)} if cfg.num_labels else {"embed_out.weight": (v, d)})}
    for i in range(cfg.num_layers):
        shapes.update({LAYER_PREFIX.format(i) + k: s for k, s in layer.items()})
    return shapes


# ---- reading -------------------------------------------------------------------------------------


def stored_dtype(source) -> np.dtype:
    """The dtype a tensor source stores its weights in (its final LayerNorm's): a conversion without `--dtype`
    keeps it."""
    return np.dtype(source.get("gpt_neox.final_layer_norm.weight").dtype)


class TensorSource:
    """Names, shapes and lazily read numpy tensors of a Hugging Face checkpoint folder or file: safetensors
    (single, or sharded with `model.safetensors.index.json`) or PyTorch `.bin` (single, or sharded with
    `pytorch_model.bin.index.json`). Each read maps its file and lets go of it, so host memory holds about
    one tensor however large the checkpoint (a mapping kept open would keep every page read resident)."""

    def __init__(self, path: str | os.PathLike, trust_pickle: bool = False):
        self.path = Path(path)
        self.trust_pickle = trust_pickle
        self._where: dict[str, tuple[Path, str, tuple[int, ...]]] = {}  # name -> (file, name in file, shape)
        folder = self.path if self.path.is_dir() else self.path.parent
        if not self.path.exists():
            raise FileNotFoundError(f"no checkpoint at {self.path}")
        if self.path.is_file():
            files = [self.path]
        else:
            for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
                if (folder / index).is_file():
                    weight_map = json.loads((folder / index).read_text())["weight_map"]
                    files = [folder / f for f in sorted(set(weight_map.values()))]
                    break
            else:
                files = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()][:1]
        if not files:
            raise FileNotFoundError(f"{self.path}: no model.safetensors, model.safetensors.index.json, "
                                    "pytorch_model.bin or pytorch_model.bin.index.json")
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{file}: listed in the checkpoint's index but missing")
            shapes = self._safetensors_shapes(file) if file.suffix == ".safetensors" else self._torch_shapes(file)
            for raw, shape in shapes.items():
                self._where[ALIASES.get(raw, raw)] = (file, raw, shape)

    @staticmethod
    def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="numpy") as handle:
                return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}); "
                                  "it may be truncated, re-download it") from None

    def _torch_shapes(self, file: Path) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in load_torch(file, self.trust_pickle).items()}

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        file, raw, _ = self._where[name]
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="numpy") as handle:
                return handle.get_tensor(raw)
        return torch_to_numpy(load_torch(file, self.trust_pickle)[raw])


def _numpy_rng_globals():
    """What DeepSpeed pickles besides tensors (numpy's RNG state, under numpy 1 and 2 names): safe to rebuild."""
    import numpy.dtypes

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [(reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, numpy.dtypes.UInt32DType]


def load_torch(file: Path, trust_pickle: bool = False) -> dict:
    """A `.pt`/`.bin` file memory-mapped and unpickled weights-only (tensors, containers, numbers, numpy's RNG
    state): nothing in it can run code. `trust_pickle` lifts that for a file the user vouches for."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"{file} is a PyTorch pickle: install torch (pip install 'neox-jax[torch]') "
                          "or convert it to safetensors") from None

    def load(mmap):
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(file, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return load(mmap=False)  # the pre-zip format of torch < 1.6 cannot be memory-mapped
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \S+", str(e))
        reason = (f"it holds {found.group(1)}" if found and found.group(1) else found.group(0) if found
                  else "an object that is not a tensor")
        raise CheckpointError(f"{file}: weights-only unpickling refused it ({reason}). Weights never need what "
                              "it refused; pass --trust-pickle only if you trust this file's origin, since "
                              "unpickling can run any code") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable PyTorch file ({str(e).splitlines()[0]}); "
                              "it may be truncated") from None


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as numpy, sharing its memory (bfloat16 through ml_dtypes)."""
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def check_tensors(source: TensorSource, cfg: NeoXConfig):
    """One error listing every missing, unexpected and mis-shaped tensor."""
    expected = hf_shapes(cfg)
    present = {n for n in source.names() if not IGNORED.match(n)}
    missing = sorted(set(expected) - present, key=_natural)
    unexpected = sorted(present - set(expected), key=_natural)
    misshaped = [f"{n}: checkpoint {source.shape(n)}, config expects {expected[n]}"
                 for n in sorted(present & set(expected), key=_natural) if source.shape(n) != expected[n]]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            problems.append(f"{len(items)} {title}:\n    " + "\n    ".join(shown))
    if problems:
        raise CheckpointError(f"checkpoint {source.path} does not match the config "
                              f"({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}):\n  "
                              + "\n  ".join(problems))


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def to_ours(x: np.ndarray, transposed: bool, shape, dtype) -> np.ndarray:
    """A Hugging Face tensor in our layout: transposed back from torch's [out, in] where the table says, cast,
    reshaped to our kernel's shape."""
    x = x.T if transposed else x
    return np.asarray(x, dtype=dtype).reshape(shape)


def to_hf(x: np.ndarray, transposed: bool, hf_shape) -> np.ndarray:
    """Our tensor in the Hugging Face layout (the inverse of `to_ours`)."""
    if transposed:  # our [in, ...] kernel flattened to [in, out], then torch's [out, in]
        return np.ascontiguousarray(x.reshape(hf_shape[::-1]).T)
    return np.ascontiguousarray(x.reshape(hf_shape))


def get_path(tree, path: str):
    """The entry of a nested dict at a dotted path ("layers.attn.qkv.kernel")."""
    for key in path.split("."):
        tree = tree[key]
    return tree


def read_params(source: TensorSource, cfg: NeoXConfig, abstract_params,
                place: Callable[[str, np.ndarray], jax.Array] = lambda path, x: jax.device_put(x),
                show_progress: bool = False) -> Iterator[tuple[str, jax.Array]]:
    """Yield (path, array) for every parameter; `abstract_params` gives shapes and dtypes."""
    check_tensors(source, cfg)
    jobs = [(path, hf, t, None) for hf, path, t in top_table(cfg)]
    jobs += [("layers." + path, hf, t, cfg.num_layers) for hf, path, t in LAYER_TABLE]
    for path, hf, transposed, layers in progress(jobs, "reading", enabled=show_progress):
        target = get_path(abstract_params, path)
        if layers is None:
            host = to_ours(source.get(hf), transposed, target.shape, target.dtype)
        else:
            host = np.empty(target.shape, target.dtype)
            for i in range(layers):
                host[i] = to_ours(source.get(LAYER_PREFIX.format(i) + hf), transposed, target.shape[1:],
                                   target.dtype)
        yield path, place(path, host)
        del host


# ---- the model ------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str = "float32",
               config: NeoXConfig | None = None, shardings=None, source=None, show_progress: bool = False):
    """A `GPTNeoX` with the weights of a Hugging Face checkpoint folder (or file, with `config`), or of any
    tensor `source` with its `config`; with `shardings` (a params tree of them) each tensor goes straight onto
    its place on the mesh."""
    from neox_jax.model import abstract_model, with_params

    path = Path(path)
    if config is None:
        config = config_from_hf(path if path.is_dir() else path.parent)
    overrides = {"param_dtype": param_dtype}
    if dtype is not None:
        overrides["dtype"] = dtype
    config = config.replace(**overrides)
    source = source or TensorSource(path)
    params = nnx.to_pure_dict(abstract_model(config)[1])
    def place(path, x):  # onto its shard of the mesh, or the default device
        return jax.device_put(x, get_path(shardings, path) if shardings else None)

    for p, array in read_params(source, config, params, place, show_progress=show_progress):
        keys = p.split(".")
        get_path(params, ".".join(keys[:-1]))[keys[-1]] = array
    return with_params(config, params)


class ParamsSource:
    """Our parameters seen as Hugging Face tensors (names, torch layout), one at a time: `read(path, layer)`
    returns a parameter of the params tree, or one layer's slice of a stacked one."""

    def __init__(self, read: Callable[[str, int | None], np.ndarray], config: NeoXConfig, path="parameters"):
        self.read, self.config, self.path = read, config, path
        self.shapes = hf_shapes(config)
        self._where = {hf: (p, layer, t) for hf, p, layer, t in tensor_slots(config)}

    @classmethod
    def from_tree(cls, params, config: NeoXConfig) -> "ParamsSource":
        def read(path, layer):
            x = get_path(params, path)
            return np.asarray(x if layer is None else x[layer])

        return cls(read, config)

    def names(self) -> list[str]:
        """In Hugging Face's order: embedding, layers, final norm, output."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get(self, name: str) -> np.ndarray:
        path, layer, transposed = self._where[name]
        return to_hf(self.read(path, layer), transposed, self.shapes[name])


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def write_safetensors(file: Path, names: list[str], shapes: dict, dtype: np.dtype, get: Callable[[str], np.ndarray]):
    """A safetensors file written tensor by tensor: the header (every name, shape and offset) first, then
    each tensor's bytes as `get(name)` returns it, so only one tensor is in memory at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        size = math.prod(shapes[name]) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype.name], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in names:
            x = np.ascontiguousarray(get(name), dtype=dtype)
            assert x.shape == tuple(shapes[name]), (name, x.shape)
            f.write(memoryview(x.reshape(-1).view(np.uint8)))


def write_hf(source, cfg: NeoXConfig, path: str | os.PathLike, *, dtype=None,
             max_shard_bytes: int = 5 * 2**30, show_progress: bool = False) -> Path:
    """Write a Hugging Face folder (config.json, safetensors shards, indexed when more than one) from a
    tensor source, one tensor in memory at a time.

    Files are written under temporary names and renamed when complete, so an interrupted export never
    leaves a file that looks finished.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype or stored_dtype(source))
    shapes = hf_shapes(cfg)
    names = [n for n in source.names() if n in shapes]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = math.prod(shapes[name]) * dtype.itemsize
        if size and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(math.prod(shapes[name]) for name in names) * dtype.itemsize
    with bar("writing", total, show_progress, unit="B") as progress_bar:
        def get(name):
            x = source.get(name)
            progress_bar.update(math.prod(shapes[name]) * dtype.itemsize)
            return x

        for shard, file in zip(shards, files):
            write_safetensors(temp_path(out / file), shard, shapes, dtype, get)
    for file in files:
        os.replace(temp_path(out / file), out / file)
    if n > 1:
        index = {"metadata": {"total_size": sum((out / f).stat().st_size for f in files)},
                 "weight_map": {name: file for shard, file in zip(shards, files) for name in shard}}
        write_json(out / "model.safetensors.index.json", index)
    hf_config = config_to_hf(cfg)
    hf_config["torch_dtype"] = hf_config["dtype"] = str(dtype)  # v4 and v5 spellings
    write_json(out / "config.json", hf_config)
    return out


def save_params(params, cfg: NeoXConfig, path: str | os.PathLike, *, dtype=None,
                max_shard_bytes: int = 5 * 2**30, show_progress: bool = False) -> Path:
    """Write a params tree as a Hugging Face folder (dtype: as stored by default)."""
    return write_hf(ParamsSource.from_tree(params, cfg), cfg, path, dtype=dtype, max_shard_bytes=max_shard_bytes,
                    show_progress=show_progress)


def save_model(model, path: str | os.PathLike, *, dtype=None, show_progress: bool = False) -> Path:
    """Write `model` as a Hugging Face folder that `transformers` loads (dtype: as stored by default)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return save_params(params, model.config, path, dtype=dtype, show_progress=show_progress)
