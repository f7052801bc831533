"""Original GPT-NeoX (DeepSpeed) checkpoints, read and written directly, one tensor at a time.

Layout (GPT-NeoX's `megatron/checkpointing.py` through DeepSpeed; docs/model.md has the whole table):

    CKPT/latest                          the tag of the newest step, e.g. `global_step150000`
    CKPT/global_stepN/configs/*.yml      the YAML files the run was started with
  pipeline format (pipe_parallel_size >= 1):
    layer_XX-model_YY-model_states.pt    layer XX of GPT-NeoX's layer list on tensor-parallel rank YY: 0 the
                                         embedding, 2..L+1 the transformer layers, L+3 the final norm, L+4
                                         the output layer (1 and L+2 hold no weights, so have no file)
    mp_rank_ZZ_model_states.pt           DeepSpeed's client state (iteration, RNG states): not read
  sequential format (pipe_parallel_size 0):
    mp_rank_YY_model_states.pt           ["module"]["sequential.XX.<key>"], XX numbered as above

Tensor parallelism splits each weight its own way (Megatron's layers): vocabulary-parallel embeddings and
output, column-parallel QKV (whole heads per rank) and first MLP matrix along their output rows,
row-parallel attention output and second MLP matrix along their input columns, and replicates LayerNorms
and the row-parallel biases. With the parallel residual (`gpt_j_residual`) GPT-NeoX adds those biases on
every rank before the all-reduce, so the bias the model computes with is their sum (GPT-NeoX issue #962;
its converters sum on export and divide by the rank count on import, PR #1220); with the sequential
residual the bias is added once after the reduction, and the ranks' copies are one value.

Everything is presented under Hugging Face names (`NeoXSource`), so every sink in this package (Orbax,
Hugging Face, the in-memory model) reads it; `write_neox` writes any tensor source back.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from neox_jax.atomic import partial
from neox_jax.config import NeoXConfig
from neox_jax.convert.hf import LAYER_PREFIX, hf_shapes, load_torch, stored_dtype, torch_to_numpy
from neox_jax.errors import CheckpointError, ConfigError

COLUMN, ROW, ROW_BIAS, REPLICATED = "column", "row", "row bias", "replicated"
# Hugging Face name inside a layer -> how tensor parallelism splits it. GPT-NeoX's own key is the same name,
# except for the MLP in checkpoints written since GPT-NeoX PR #1212 (CURRENT_MLP_NAMES).
LAYER_SPLITS = {
    "input_layernorm.weight": REPLICATED, "input_layernorm.bias": REPLICATED,
    "post_attention_layernorm.weight": REPLICATED, "post_attention_layernorm.bias": REPLICATED,
    "attention.query_key_value.weight": COLUMN, "attention.query_key_value.bias": COLUMN,
    "attention.dense.weight": ROW, "attention.dense.bias": ROW_BIAS,
    "mlp.dense_h_to_4h.weight": COLUMN, "mlp.dense_h_to_4h.bias": COLUMN,
    "mlp.dense_4h_to_h.weight": ROW, "mlp.dense_4h_to_h.bias": ROW_BIAS,
}
CURRENT_MLP_NAMES = {"mlp.dense_h_to_4h.": "mlp.linear1.", "mlp.dense_4h_to_h.": "mlp.linear2."}
# Buffers of old checkpoints that hold no learned value (rotary frequencies are recomputed).
IGNORED_KEYS = {"attention.rotary_emb.inv_freq"}


def entries(num_layers: int, current_names: bool) -> dict[str, tuple[int, str, str]]:
    """{Hugging Face name: (GPT-NeoX layer index, GPT-NeoX key, split)} of every tensor, file by file."""
    L = num_layers
    out = {"gpt_neox.embed_in.weight": (0, "word_embeddings.weight", COLUMN)}
    for i in range(L):
        for name, how in LAYER_SPLITS.items():
            out[LAYER_PREFIX.format(i) + name] = (i + 2, neox_key(name, current_names), how)
    out.update({"gpt_neox.final_layer_norm.weight": (L + 3, "norm.weight", REPLICATED),
                "gpt_neox.final_layer_norm.bias": (L + 3, "norm.bias", REPLICATED),
                "embed_out.weight": (L + 4, "final_linear.weight", COLUMN)})
    return out


def neox_key(hf_name: str, current_names: bool) -> str:
    if current_names:
        for old, new in CURRENT_MLP_NAMES.items():
            hf_name = hf_name.replace(old, new)
    return hf_name


def layer_file(layer: int, rank: int) -> str:
    return f"layer_{layer:02d}-model_{rank:02d}-model_states.pt"


def rank_file(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


# ---- merging and splitting ---------------------------------------------------------------------------------


def merge(shards: list[np.ndarray], split: str, parallel_residual: bool) -> np.ndarray:
    """One tensor from its tensor-parallel shards (torch layout)."""
    if split == COLUMN:
        return np.concatenate(shards, axis=0)
    if split == ROW:
        return np.concatenate(shards, axis=1)
    if split == ROW_BIAS and parallel_residual:  # every rank adds its copy: the model's bias is the sum
        return np.sum(np.stack(shards).astype(np.float64), axis=0).astype(shards[0].dtype)
    if all(np.array_equal(s, shards[0]) for s in shards[1:]):
        return shards[0]
    return np.mean(np.stack(shards).astype(np.float64), axis=0).astype(shards[0].dtype)  # as GPT-NeoX's converters


def split(x: np.ndarray, how: str, ranks: int, parallel_residual: bool) -> list[np.ndarray]:
    """The tensor-parallel shards of one tensor; `merge` undoes it (bit for bit for 1, 2 and 4 ranks)."""
    if how == COLUMN:
        return np.split(x, ranks, axis=0)
    if how == ROW:
        return np.split(x, ranks, axis=1)
    if how == ROW_BIAS and parallel_residual:
        return [(x.astype(np.float64) / ranks).astype(x.dtype)] * ranks
    return [x] * ranks


# ---- reading -----------------------------------------------------------------------------------------------


def step_dir(path: Path) -> Path:
    """The `global_stepN` folder: `path` itself, or the one its `latest` file names."""
    if not path.exists():
        raise FileNotFoundError(f"no GPT-NeoX checkpoint at {path}")
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path / 'latest'} names {tag!r}, which is not a folder in {path}")
        return path / tag
    if any(path.glob("layer_*-model_*-model_states.pt")) or any(path.glob("mp_rank_*_model_states.pt")):
        return path
    steps = sorted(path.glob("global_step*"))
    raise CheckpointError(f"{path} is not a GPT-NeoX checkpoint: it has no `latest` file and no *_model_states.pt"
                          + (f"; give one of its step folders ({', '.join(s.name for s in steps[:3])})"
                             if steps else ""))


def is_neox_checkpoint(path) -> bool:
    try:
        step_dir(Path(path))
        return True
    except (FileNotFoundError, CheckpointError):
        return False


class NeoXSource:
    """A GPT-NeoX checkpoint seen as Hugging Face tensors (names, torch layout), merged over tensor-parallel
    ranks one tensor at a time. `config_files` are GPT-NeoX YAML files (default: the checkpoint's own
    `configs/`); the padded vocabulary is the checkpoint's."""

    def __init__(self, path, config_files=(), trust_pickle: bool = False):
        from neox_jax.config import load_yaml
        from neox_jax.convert.neox_yaml import model_config

        self.path = step_dir(Path(path))
        self.trust_pickle = trust_pickle
        files = tuple(config_files) or tuple(sorted((self.path / "configs").glob("*.y*ml")))
        if not files:
            raise ConfigError(f"{self.path} has no configs/ folder: give the run's GPT-NeoX YAML with --config")
        args = load_yaml(*files)
        where = ", ".join(str(f) for f in files)
        pipeline = sorted(self.path.glob("layer_*-model_*-model_states.pt"))
        self.sequential = not pipeline
        if self.sequential:
            ranks = sorted(int(m.group(1)) for f in self.path.glob("mp_rank_*_model_states.pt")
                           if (m := re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", f.name)))
        else:
            ranks = sorted({int(m.group(1)) for f in self.path.glob("layer_00-model_*-model_states.pt")
                            if (m := re.fullmatch(r"layer_00-model_(\d+)-model_states\.pt", f.name))})
        if ranks != list(range(len(ranks))) or not ranks:
            raise CheckpointError(f"{self.path}: tensor-parallel ranks {ranks} of the "
                                  f"{'sequential' if self.sequential else 'pipeline'} format are not 0..N-1")
        self.ranks = len(ranks)
        declared = int(args.get("model_parallel_size", 1) or 1)
        if declared != self.ranks:
            shown = (rank_file(0) if self.sequential else layer_file(0, 0)).replace("00", "*")
            raise CheckpointError(f"{self.path}: {self.ranks} tensor-parallel shards ({shown}) but {where} sets "
                                  f"model_parallel_size={declared}: give the config this checkpoint was saved with")
        self._keys: dict[tuple[int, int], dict[str, tuple]] = {}  # (layer, rank) -> {key: shape}
        self._ranks_read: set[int] = set()  # sequential format: ranks whose file was read for its keys
        vocab = sum(s[0] for s in self._shapes(0, "word_embeddings.weight"))
        self.config = model_config(*files, weights_only=True, vocab_size=vocab)
        self.parallel_residual = self.config.use_parallel_residual
        self.current_names = self._has(2, "mlp.linear1.weight")
        self._check_structure()

    # file access: each read opens (memory-maps) the file and lets go of it, so host memory holds one tensor
    def _file(self, layer: int, rank: int) -> Path:
        return self.path / (rank_file(rank) if self.sequential else layer_file(layer, rank))

    def _state(self, layer: int, rank: int) -> dict:
        file = self._file(layer, rank)
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete, or the config's num_layers is "
                                  "not the one it was saved with")
        if not self.sequential:
            return load_torch(file, self.trust_pickle)
        prefix = f"sequential.{layer}."
        return {k[len(prefix):]: v for k, v in self._module(rank).items() if k.startswith(prefix)}

    def _module(self, rank: int) -> dict:
        """The `sequential.*` tensors of a sequential-format rank file."""
        file = self._file(0, rank)
        state = load_torch(file, self.trust_pickle)
        if "module" not in state:
            raise CheckpointError(f"{file} has no 'module' entry: not a GPT-NeoX sequential checkpoint")
        return {k: v for k, v in state["module"].items() if k.startswith("sequential.")}

    def _keys_of(self, layer: int, rank: int) -> dict[str, tuple]:
        """{key: shape} of one layer on one rank (read once: a sequential file's layers all in one load)."""
        if self.sequential and rank not in self._ranks_read:
            self._ranks_read.add(rank)
            for k, v in self._module(rank).items():
                index, _, name = k.removeprefix("sequential.").partition(".")
                if hasattr(v, "shape"):
                    self._keys.setdefault((int(index), rank), {})[name] = tuple(v.shape)
        elif not self.sequential and (layer, rank) not in self._keys:
            self._keys[(layer, rank)] = {k: tuple(v.shape) for k, v in self._state(layer, rank).items()
                                         if hasattr(v, "shape")}
        return self._keys.get((layer, rank), {})

    def _has(self, layer: int, key: str) -> bool:
        return key in self._keys_of(layer, 0)

    def _shapes(self, layer: int, key: str) -> list[tuple]:
        out = []
        for rank in range(self.ranks):
            keys = self._keys_of(layer, rank)
            if key not in keys:
                raise CheckpointError(f"{self._file(layer, rank)} has no {key} (it has {', '.join(keys) or 'nothing'})")
            out.append(keys[key])
        return out

    def _check_structure(self):
        """Every file present, no key we would drop, no layer beyond the config's."""
        self.where = entries(self.config.num_layers, self.current_names)
        wanted: dict[int, set] = {}
        for layer, key, _ in self.where.values():
            wanted.setdefault(layer, set()).add(key)
        for layer, keys in wanted.items():
            for rank in range(self.ranks):
                extra = set(self._keys_of(layer, rank)) - keys - IGNORED_KEYS
                if extra:
                    raise CheckpointError(f"{self._file(layer, rank)}: unexpected {', '.join(sorted(extra))} in layer "
                                          f"{layer}: a model neox-jax does not implement, or another config")
        beyond = self.config.num_layers + 5
        extra = (sorted(self.path.glob(f"layer_{beyond:02d}-model_*")) if not self.sequential
                 else [f"sequential.{layer}" for layer, rank in self._keys if layer >= beyond])
        if extra:
            raise CheckpointError(f"{self.path}: has {extra[0]} beyond the last layer of a {self.config.num_layers}-"
                                  "layer model: the config's num_layers is not the checkpoint's")

    # the tensor-source protocol (hf.TensorSource)
    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        layer, key, how = self.where[name]
        shapes = self._shapes(layer, key)
        axis = {COLUMN: 0, ROW: 1}.get(how)
        if axis is None:
            return shapes[0]
        return tuple(sum(s[axis] for s in shapes) if a == axis else n for a, n in enumerate(shapes[0]))

    def get(self, name: str) -> np.ndarray:
        layer, key, how = self.where[name]
        shards = []
        for rank in range(self.ranks):
            state = self._state(layer, rank)
            shards.append(torch_to_numpy(state[key]))
            del state
        return merge(shards, how, self.parallel_residual)


# ---- writing -----------------------------------------------------------------------------------------------


def neox_yaml(cfg: NeoXConfig, tensor_parallel: int, pipe_parallel: int, dtype: np.dtype) -> dict:
    """A GPT-NeoX model config for these weights. The vocabulary padding is chosen so that GPT-NeoX pads any
    tokenizer up to exactly this checkpoint's vocab_size (as GPT-NeoX's merge20b.py does)."""
    precision = {"float16": {"precision": "fp16", "fp16": {"enabled": True}},
                 "bfloat16": {"precision": "bfloat16", "bf16": {"enabled": True}}}.get(np.dtype(dtype).name, {})
    d = {
        "pipe_parallel_size": pipe_parallel, "model_parallel_size": tensor_parallel,
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_heads,
        "seq_length": cfg.max_position_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "norm": "layernorm", "layernorm_epsilon": cfg.layer_norm_eps, "pos_emb": "rotary",
        "rotary_pct": cfg.rotary_pct, "rotary_emb_base": cfg.rotary_base, "no_weight_tying": True,
        "gpt_j_residual": cfg.use_parallel_residual, "output_layer_parallelism": "column",
        "attention_config": [[["global"], cfg.num_layers]],
        "activation": "gelu", "bias_gelu_fusion": cfg.activation == "gelu_fast",
        "make_vocab_size_divisible_by": cfg.vocab_size // tensor_parallel,
        "init_method": cfg.init_method, "output_layer_init_method": cfg.output_layer_init_method,
        "init_method_std": cfg.init_std, "hidden_dropout": cfg.hidden_dropout,
        "attention_dropout": cfg.attention_dropout,
        **precision,
    }
    if cfg.intermediate_size != 4 * cfg.hidden_size:
        d["intermediate_size"] = cfg.intermediate_size
    return d


def write_neox(source, cfg: NeoXConfig, dst, *, tensor_parallel: int = 1, pipe_parallel: int = 1,
               step: int = 0, dtype=None, current_names: bool = True, show_progress: bool = False) -> Path:
    """Write a GPT-NeoX checkpoint (pipeline format) from a tensor source, one layer file at a time.

    `DST/latest`, `DST/global_step{step}/layer_*-model_*-model_states.pt`, its `configs/neox_jax.yml`, and
    the `mp_rank_*` files DeepSpeed opens for client state. It holds weights only: GPT-NeoX continues from it
    with `finetune: true` (or `no_load_optim: true` and `no_load_rng: true`).
    """
    if cfg.num_labels:
        raise ConfigError(f"a score model (num_labels={cfg.num_labels}: a reward model) is written as a Hugging Face "
                          "GPTNeoXForSequenceClassification folder; GPT-NeoX's own format for it (rm_linear, split "
                          "over its tensor ranks) is not written yet: write it as a Hugging Face folder")
    import torch
    import yaml

    from neox_jax.progress import bar

    t = tensor_parallel
    problems = [f"{name}={value} is not divisible by --tensor-parallel {t}" for name, value in
                (("num_heads", cfg.num_heads), ("intermediate_size", cfg.intermediate_size),
                 ("vocab_size", cfg.vocab_size)) if value % t]
    if problems:
        raise ConfigError("; ".join(problems))
    if pipe_parallel < 1 or tensor_parallel < 1:
        raise ConfigError(f"--tensor-parallel {tensor_parallel} --pipe-parallel {pipe_parallel}: both must be >= 1")
    out = Path(dst)
    tag = f"global_step{step}"
    folder = out / tag
    if folder.exists():
        raise FileExistsError(f"{folder} already exists: choose a new destination or remove it")
    dtype = np.dtype(dtype or stored_dtype(source))
    staging = partial(out / f".{tag}.partial")
    (staging / "configs").mkdir(parents=True, exist_ok=True)
    by_file: dict[int, list] = {}
    for hf, (layer, key, how) in entries(cfg.num_layers, current_names).items():
        by_file.setdefault(layer, []).append((hf, key, how))
    shapes = hf_shapes(cfg)
    total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    with bar("writing", total, show_progress, unit="B") as progress_bar:
        for layer, tensors in by_file.items():
            states = [{} for _ in range(t)]
            for hf, key, how in tensors:
                x = np.ascontiguousarray(source.get(hf), dtype=dtype)
                for rank, shard in enumerate(split(x, how, t, cfg.use_parallel_residual)):
                    states[rank][key] = _to_torch(shard)
                progress_bar.update(x.nbytes)
            for rank, state in enumerate(states):
                torch.save(state, staging / layer_file(layer, rank))
            del states
    client = {"iteration": step, "global_steps": step, "skipped_steps": 0, "dp_world_size": 1,
              "mp_world_size": t, "module": None,
              "args": {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                       "num_attention_heads": cfg.num_heads, "max_position_embeddings": cfg.max_position_embeddings,
                       "make_vocab_size_divisible_by": cfg.vocab_size // t, "padded_vocab_size": cfg.vocab_size,
                       "model_parallel_size": t}}
    for rank in range(t * pipe_parallel):  # DeepSpeed numbers model-parallel ranks over pipe x tensor
        torch.save(client, staging / rank_file(rank))
    (staging / "configs" / "neox_jax.yml").write_text(
        yaml.safe_dump(neox_yaml(cfg, t, pipe_parallel, dtype), sort_keys=False))
    staging.rename(folder)
    (out / "latest").write_text(tag)
    return out


def _to_torch(x: np.ndarray):
    import torch

    if x.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16).clone()
    return torch.from_numpy(np.ascontiguousarray(x)).clone()
