"""NeoXConfig (the model) and TrainConfig (how to train it): frozen dataclasses with named presets.

The foreign formats are read in neox_jax/convert/ (Hugging Face `config.json` in `hf_config.py`, GPT-NeoX's
YAML in `neox_yaml.py`), which build these; nothing here imports a converter.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from neox_jax.errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_fast")
INIT_METHODS = ("small_init", "wang_init", "normal", "scaled_normal")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "selective", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class NeoXConfig:
    vocab_size: int = 50304  # padded, as in the checkpoint
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    intermediate_size: int = 0  # 0 means 4 * hidden_size
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    activation: str = "gelu"  # "gelu" (exact, erf) or "gelu_fast" (tanh form NeoX trained with)
    init_method: str = "small_init"
    output_layer_init_method: str = "wang_init"
    init_std: float = 0.02  # for "normal" / "scaled_normal"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat_policy: str = "none"
    attention: str = "auto"  # auto (cuDNN's fused kernel on a GPU where it applies, else the einsum) | xla | cudnn
    # Megatron sequence parallelism: the residual stream between layers split along the sequence over the tensor
    # axis (neox_jax/sequence_parallel.py); no effect without tensor parallelism
    sequence_parallel: bool = False
    hidden_dropout: float = 0.0  # training only: the embedding's and each branch's output (GPT-NeoX's)
    attention_dropout: float = 0.0  # training only: the attention probabilities (the einsum attention then)
    # 0: the language-model head (embed_out); n: a score head of n outputs instead (`score`, Hugging Face's
    # GPTNeoXForSequenceClassification): a reward model has 1 (train_impl: rm)
    num_labels: int = 0
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        _check_types(self)
        if self.intermediate_size == 0:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}: "
                "change one so that head_dim = hidden_size / num_heads is a whole number")
        for name in ("rotary_base", "layer_norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be positive")
        if self.num_labels < 0:
            raise ConfigError(f"num_labels={self.num_labels}: 0 for a language model, or the score head's outputs")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: a dropout probability must be in [0, 1)")
        if self.attention_dropout > 0 and self.attention in ("xla", "cudnn"):
            raise ConfigError(f"attention={self.attention!r} with attention_dropout={self.attention_dropout}: JAX's "
                              "fused attention kernels cannot drop attention probabilities; use attention auto "
                              "(the einsum attention, which can), or attention_dropout 0")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct={self.rotary_pct}: must be in (0, 1]")
        if self.rotary_ndims % 2 or self.rotary_ndims == 0:
            raise ConfigError(
                f"rotary_pct={self.rotary_pct} with head_dim={self.head_dim} gives rotary_ndims="
                f"{self.rotary_ndims}: rotary needs an even, non-zero number of dimensions")
        for name, allowed in (("activation", ACTIVATIONS), ("init_method", INIT_METHODS),
                              ("output_layer_init_method", INIT_METHODS), ("dtype", DTYPES),
                              ("param_dtype", DTYPES), ("remat_policy", REMAT_POLICIES),
                              ("attention", ATTENTION)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def num_params(self) -> int:
        """Exact parameter count (weights and biases), as Hugging Face counts it."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
        return v * h + h * (self.num_labels or v) + self.num_layers * per_layer + 2 * h

    def replace(self, **changes: Any) -> "NeoXConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NeoXConfig":
        _check_keys(d, cls, "model setting")
        return cls(**d)

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "NeoXConfig":
        key = preset_key(name)
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})


# NeoXConfig fields that leave its function (dropout acts in training only)
HOW_IT_RUNS = ("dtype", "param_dtype", "remat_policy", "attention", "sequence_parallel", "hidden_dropout",
               "attention_dropout")


def model_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, ours, theirs) for each model setting (NeoXConfig dicts) that changes the function and differs."""
    return [(k, v, theirs[k]) for k, v in ours.items() if k not in HOW_IT_RUNS and k in theirs and v != theirs[k]]


def _check_keys(d: Mapping[str, Any], cls, what: str):
    """An unknown key is an error that names the nearest valid one."""
    import difflib

    fields = sorted(f.name for f in dataclasses.fields(cls))
    for key in d:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            raise ConfigError(f"unknown {what} {key!r}"
                              + (f"; did you mean {near[0]!r}?" if near else f"; valid settings: {', '.join(fields)}"))


_TYPES = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
          "bool": ((bool,), "true or false")}


def _check_types(cfg):
    """Each setting of a plain type has that type: a float `train_iters` or a string `seed` is refused here, not
    after a compile. A number written as a string where a float goes (YAML reads `6e-4` as a string) is read."""
    for f in dataclasses.fields(cfg):
        kinds, what = _TYPES.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""), (None, ""))
        value = getattr(cfg, f.name)
        if kinds and float in kinds and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
            else:
                object.__setattr__(cfg, f.name, value)
        if kinds and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise ConfigError(f"{f.name}={value!r}: expected {what}, got {type(value).__name__}")


def apply_overrides(cfg: "TrainConfig", pairs: list[str]) -> "TrainConfig":
    """`key=value` (YAML values) on a TrainConfig; `model.key=value` reaches into the model config."""
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"override {pair!r}: expected key=value, e.g. train_iters=100 or model.num_layers=4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {pair!r}: {raw!r} is not a YAML value ({getattr(e, 'problem', e)}): write "
                              "lists as [a, b] and mappings as {k: v}, and quote text with spaces") from None
        if key.startswith("model."):
            _check_keys({key[6:]: value}, NeoXConfig, "model setting")
            cfg = cfg.replace(model=cfg.model.replace(**{key[6:]: value}))
        else:
            _check_keys({key: value}, TrainConfig, "training setting")
            cfg = cfg.replace(**{key: value})
    return cfg


MESH_AXES = ("data", "pipe", "tensor")


def _mesh(value) -> dict[str, int]:
    """A mesh setting as {data, pipe, tensor} (a missing axis is 1), from a mapping or "data=2,tensor=4"."""
    form = ("expected the size of each axis, e.g. mesh: {data: 2, pipe: 1, tensor: 4} in YAML, or "
            "mesh=data=2,tensor=4 on the command line (-1: the rest of the devices)")
    if isinstance(value, str):
        pairs = [part.partition("=") for part in value.split(",") if part.strip()]
        if not pairs or any(not sep for _, sep, _ in pairs):
            raise ConfigError(f"mesh={value!r}: {form}")
        value = {k.strip(): yaml.safe_load(v) for k, _, v in pairs}
    if not isinstance(value, Mapping):
        raise ConfigError(f"mesh={value!r}: {form}")
    bad = [f"{k}={v!r}" for k, v in value.items() if k not in MESH_AXES or isinstance(v, bool)
           or not isinstance(v, int) or not (v == -1 or v >= 1)]
    if bad:
        raise ConfigError(f"mesh {', '.join(bad)}: the axes are {', '.join(MESH_AXES)}, each a size >= 1 or -1 "
                          "(the rest of the devices)")
    return {axis: value.get(axis, 1) for axis in MESH_AXES}


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated inside one mapping (plain YAML keeps the last)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        norm = key.replace("-", "_") if isinstance(key, str) else key
        if norm in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} set twice (first at line {seen[norm] + 1})", key_node.start_mark)
        seen[norm] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
# GPT-NeoX files write Python's True/False; YAML 1.1 already reads those as booleans.


def load_yaml(*paths: str | os.PathLike) -> dict:
    """Merge YAML files (ours or GPT-NeoX's) into one dict with `-` in keys replaced by `_`.

    As in GPT-NeoX, a key set in two files is an error; unlike GPT-NeoX the check also catches the
    hyphen/underscore spellings of one key, and a key set twice inside one file.
    """
    if not paths:
        raise ConfigError("no GPT-NeoX YAML file given")
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for path in paths:
        p = Path(path)
        if not p.is_file() and p.with_suffix(".yml").is_file():
            p = p.with_suffix(".yml")  # GPT-NeoX appends .yml to bare names
        if not p.is_file():
            raise FileNotFoundError(f"GPT-NeoX config {path} does not exist")
        try:
            data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            hint = ("; is a comma missing at the end of the setting before it?"
                    if "expected ',' or" in str(e.problem) else "")
            raise ConfigError(f"{p}:{line}: malformed YAML: {e.problem or e.context}"
                              + (f" ({e.context})" if e.context and e.problem else "") + hint) from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of settings at the top level, got {type(data).__name__}")
        for key, value in data.items():
            norm = str(key).replace("-", "_")
            if norm in merged:
                raise ConfigError(f"{p}: key {key!r} is already set in {origin[norm]}; "
                                  "GPT-NeoX forbids setting a key in two files")
            merged[norm], origin[norm] = value, str(p)
    return merged


def is_preset(name: str) -> bool:
    """Whether `name` names a preset rather than a file or folder of that name."""
    return preset_key(name) in PRESETS and not Path(name).exists()


def preset_key(name: str) -> str:
    """'EleutherAI/pythia-70m' -> 'pythia-70m': the key a preset name is looked up by."""
    return name.lower().removeprefix("eleutherai/")


def _pythia(layers, hidden, heads, vocab=50304):
    return dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                rotary_pct=0.25, max_position_embeddings=2048, activation="gelu")


# Real shapes of the released checkpoints (Hugging Face config.json of each).
PRESETS: dict[str, dict] = {
    "pythia-14m": _pythia(6, 128, 4),
    "pythia-31m": _pythia(6, 256, 8),
    "pythia-70m": _pythia(6, 512, 8),
    "pythia-160m": _pythia(12, 768, 12),
    "pythia-410m": _pythia(24, 1024, 16),
    "pythia-1b": _pythia(16, 2048, 8),
    "pythia-1.4b": _pythia(24, 2048, 16),
    "pythia-2.8b": _pythia(32, 2560, 32),
    "pythia-6.9b": _pythia(32, 4096, 32, vocab=50432),
    "pythia-12b": _pythia(36, 5120, 40, vocab=50688),
    "neox-20b": dict(vocab_size=50432, hidden_size=6144, num_layers=44, num_heads=64, rotary_pct=0.25,
                     max_position_embeddings=2048, activation="gelu_fast"),
}
PRESETS["gpt-neox-20b"] = PRESETS["neox-20b"]


# ---- training ----------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "fp16")
_WORKING_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


DECAY_STYLES = ("cosine", "linear", "exponential", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: layout, batch, precision, optimizer, data, checkpoints, logging.

    Every field is documented in configs/README.md. `model` is the NeoXConfig to train.
    """

    model: NeoXConfig = dataclasses.field(default_factory=NeoXConfig)
    # layout and batch
    mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": -1, "pipe": 1, "tensor": 1})
    seq_length: int = 2048
    micro_batch_size: int = 4  # sequences per data-parallel replica per microstep
    grad_accum_steps: int = 1
    precision: str = "fp32"  # fp32 | bf16 (bf16 working weights, fp32 master) | fp16 (same, loss-scaled)
    zero_stage: int = 1  # 0: optimizer state replicated over data; 1: split over data; 3: parameters too (FSDP)
    grad_accum_dtype: str = "float32"  # dtype microstep gradients are summed in before the reduction over data
    pipe_microbatches: int = 0  # microbatches per microstep in the pipeline when mesh pipe > 1 (0: 2 x pipe)
    # optimizer (AdamW, GPT-NeoX's recipe) and schedule
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup: float = 0.01  # fraction of lr_decay_iters (< 1) or a number of steps (>= 1)
    decay_style: str = "cosine"
    legacy_schedule: bool = False  # GPT-NeoX v1.0's formula, which Pythia and the 20B trained with
    train_iters: int = 1000
    lr_decay_iters: int = 0  # 0: train_iters
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # fp16 dynamic loss scaling, as DeepSpeed does it
    initial_scale_power: int = 12
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    max_skipped_in_a_row: int = 50
    max_nonfinite_steps: int = 1  # fp32/bf16: the run stops at this many non-finite steps in a row (skipped before)
    seed: int = 1234
    # data
    data_paths: tuple[str, ...] = ()
    data_weights: tuple[float, ...] = ()
    split: str = "969,30,1"  # of each of data_paths into train/valid/test documents (without valid_data_paths)
    valid_data_paths: tuple[str, ...] = ()  # set: GPT-NeoX's train/valid_data_paths, whole datasets, no split
    valid_data_weights: tuple[float, ...] = ()
    label_data_paths: tuple[str, ...] = ()  # GPT-NeoX's label files, one per data path: target ids, -100 = not trained
    valid_label_data_paths: tuple[str, ...] = ()  # one per valid_data_paths entry
    loss_mean: str = "tokens"  # tokens: every trained token of a step weighs the same; micro_batch: GPT-NeoX's
    eod_mask_loss: bool = False  # GPT-NeoX's: no loss where the input token ends a document (model.eos_token_id)
    # packed: documents concatenated and cut into samples; unpacked: a sample is one document, padded;
    # pack_until_overflow: whole documents while they fit (GPT-NeoX's pack_impl); "" is the objective's: packed for
    # normal, unpacked for dpo, kto and rm
    pack_impl: str = ""
    # the objective: normal (next-token loss) | dpo (pairs: data_paths chosen, rejected_data_paths rejected) |
    # kto (sequences with a reward each: reward_data_paths) | rm (a reward model on pairs as dpo's; model.num_labels 1)
    train_impl: str = "normal"
    rejected_data_paths: tuple[str, ...] = ()  # DPO, RM: the rejected sequences, document i paired with data_paths' i
    rejected_label_data_paths: tuple[str, ...] = ()
    valid_rejected_data_paths: tuple[str, ...] = ()
    valid_rejected_label_data_paths: tuple[str, ...] = ()
    dpo_beta: float = 0.1  # DPO's temperature (GPT-NeoX's default)
    dpo_reference_free: bool = False  # DPO without a reference model (its log-probabilities taken as 0)
    reward_data_paths: tuple[str, ...] = ()  # KTO: one integer per document (> 0 desirable, < 0 undesirable)
    valid_reward_data_paths: tuple[str, ...] = ()
    kto_beta: float = 0.1  # KTO's temperature (GPT-NeoX's default)
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    z_loss: float = 0.0  # RM: GPT-NeoX's penalty z x (score_chosen^2 + score_rejected^2), keeping scores near 0
    tokenizer: str = ""  # tokenizer.json, for samples printed during training
    data_cache_dir: str = ""  # where the index maps are cached ("" = beside the data, as GPT-NeoX does)
    # evaluation, checkpoints, logging
    eval_interval: int = 1000
    eval_iters: int = 10
    save: str = ""  # checkpoint folder ("" = no checkpoints)
    init_from: str = ""  # fine-tune: the weights a new run starts from (a model folder or checkpoint; "" = random)
    save_interval: int = 1000
    extra_save_iters: tuple[int, ...] = ()  # steps saved besides every save_interval-th (Pythia's 0, 1, 2, 4, ...)
    keep_last: int = 3  # checkpoints kept (0 = all, as GPT-NeoX keeps them)
    keep_every: int = 0  # also keep every N-th step's checkpoint forever (0 = off)
    log_interval: int = 10
    tensorboard_dir: str = ""  # "" = <save>/tensorboard, or none without `save`
    wandb_project: str = ""  # log to Weights & Biases when set and wandb is installed
    peak_tflops: float = 0.0  # device peak for MFU; 0 = from the device kind (A100 312, H100/H200 989 bf16)
    profile_steps: tuple[int, ...] = ()  # (first, last): a jax.profiler trace of those steps into the TensorBoard dir
    xla_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # over the backend's (xla_options.py)
    sample_prompt: str = ""  # printed with a sampled continuation at the end of training
    # several processes (neox_jax/distributed.py)
    init_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds without a heartbeat after which a process counts as dead

    def __post_init__(self):
        _check_types(self)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.grad_accum_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"grad_accum_dtype={self.grad_accum_dtype!r}: choose float32 or bfloat16")
        if self.zero_stage not in (0, 1, 3):
            raise ConfigError(f"zero_stage={self.zero_stage}: choose 0, 1 or 3 (FSDP)")
        self._check_objective()
        if self.loss_mean not in ("tokens", "micro_batch"):
            raise ConfigError(f"loss_mean={self.loss_mean!r}: choose tokens (every trained token of a step weighs the "
                              "same) or micro_batch (GPT-NeoX's: a token mean per data replica's microbatch)")
        if self.decay_style not in DECAY_STYLES:
            raise ConfigError(f"decay_style={self.decay_style!r}: choose one of {', '.join(DECAY_STYLES)}")
        for name in ("seq_length", "micro_batch_size", "grad_accum_steps", "train_iters", "eval_interval",
                     "save_interval", "log_interval", "loss_scale_window", "hysteresis",
                     "init_timeout", "heartbeat_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.seq_length > self.model.max_position_embeddings:
            raise ConfigError(f"seq_length={self.seq_length} exceeds the model's max_position_embeddings="
                              f"{self.model.max_position_embeddings}")
        for paths, weights in (("data_paths", "data_weights"), ("valid_data_paths", "valid_data_weights"),
                               ("data_paths", "label_data_paths"), ("valid_data_paths", "valid_label_data_paths"),
                               ("data_paths", "reward_data_paths"), ("valid_data_paths", "valid_reward_data_paths")):
            if getattr(self, weights) and len(getattr(self, weights)) != len(getattr(self, paths)):
                raise ConfigError(f"{weights} has {len(getattr(self, weights))} entries for "
                                  f"{len(getattr(self, paths))} {paths}")
        if self.valid_data_paths and bool(self.label_data_paths) != bool(self.valid_label_data_paths):
            raise ConfigError("label_data_paths and valid_label_data_paths go together when valid_data_paths is set: "
                              "give the validation data its label files too (or neither)")
        for name in ("betas", "data_paths", "data_weights", "valid_data_paths", "valid_data_weights",
                     "label_data_paths", "valid_label_data_paths", "rejected_data_paths", "rejected_label_data_paths",
                     "valid_rejected_data_paths", "valid_rejected_label_data_paths", "reward_data_paths",
                     "valid_reward_data_paths", "extra_save_iters",
                     "profile_steps"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(value) if isinstance(value, (list, tuple)) else (value,))
        object.__setattr__(self, "mesh", _mesh(self.mesh))
        if not isinstance(self.xla_options, Mapping) or not all(isinstance(k, str) for k in self.xla_options):
            raise ConfigError(f"xla_options={self.xla_options!r}: expected a mapping of XLA option names to values, "
                              "e.g. {xla_gpu_enable_latency_hiding_scheduler: false}")
        object.__setattr__(self, "xla_options", dict(self.xla_options))
        self._check_domains()
        for name in ("dtype", "param_dtype"):
            value = getattr(self.model, name)
            if value not in ("float32", self.working_dtype):
                raise ConfigError(f"model.{name}={value!r} conflicts with precision={self.precision!r}: training sets "
                                  f"both dtypes from `precision`; remove model.{name} or change precision")

    @property
    def pairs(self) -> bool:
        """Whether the data are pairs, chosen and rejected (DPO, reward models)."""
        return self.train_impl in ("dpo", "rm")

    @property
    def packing(self) -> str:
        """How samples are made of documents: `pack_impl`, or the objective's choice."""
        return self.pack_impl or ("packed" if self.train_impl == "normal" else "unpacked")

    def _check_objective(self):
        """The objective's settings: every problem at once."""
        problems = []
        if self.train_impl not in ("normal", "dpo", "kto", "rm"):
            problems.append(f"train_impl={self.train_impl!r}: choose normal, dpo, kto or rm (GPT-NeoX's reinforce "
                            "needs a generation server, which a training run does not have)")
        if self.train_impl == "rm" and self.model.num_labels in (0, 1):  # GPT-NeoX's: rm gives the model its head
            object.__setattr__(self, "model", self.model.replace(num_labels=1))
        elif self.model.num_labels and self.train_impl != "rm":
            problems.append(f"model.num_labels={self.model.num_labels} with train_impl={self.train_impl!r}: a score "
                            "head trains with train_impl: rm (a reward model, 1 label); use num_labels 0")
        elif self.train_impl == "rm":
            problems.append(f"model.num_labels={self.model.num_labels}: a reward model scores with one label")
        if self.z_loss and self.train_impl != "rm":
            problems.append(f"z_loss={self.z_loss} with train_impl={self.train_impl!r}: GPT-NeoX's z_loss is the "
                            "reward model's (train_impl: rm)")
        unpacked_only = self.train_impl in ("dpo", "kto", "rm")
        if self.pack_impl not in ("", "packed", "unpacked", "pack_until_overflow"):
            problems.append(f"pack_impl={self.pack_impl!r}: choose packed, unpacked or pack_until_overflow")
        elif unpacked_only and self.pack_impl not in ("", "unpacked"):
            problems.append(f"pack_impl={self.pack_impl} with train_impl={self.train_impl}: a "
                            f"{self.train_impl.upper()} sample is one document (GPT-NeoX requires pack_impl: unpacked "
                            "for KTO's rewards; pairs packed until overflow are not implemented): use unpacked")
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        if self.train_impl == "kto":
            if not number(self.kto_beta) or self.kto_beta <= 0:
                problems.append(f"kto_beta={self.kto_beta!r}: KTO's beta must be a positive number (GPT-NeoX's "
                                "default 0.1)")
            problems += [f"{name}={getattr(self, name)!r}: must be a number >= 0" for name in
                         ("kto_desirable_weight", "kto_undesirable_weight")
                         if not number(getattr(self, name)) or getattr(self, name) < 0]
            if self.micro_batch_size % 2:
                problems.append(f"micro_batch_size={self.micro_batch_size}: KTO takes each half of a micro batch's "
                                "KL estimate from the other half (GPT-NeoX's): use an even micro_batch_size")
            if not self.reward_data_paths:
                problems.append("train_impl=kto needs reward_data_paths (GPT-NeoX's train_reward_data_paths), one "
                                "per data path")
            if self.valid_data_paths and not self.valid_reward_data_paths:
                problems.append("valid_data_paths is set without valid_reward_data_paths: KTO's validation sequences "
                                "need their rewards too")
        else:
            problems += [f"{name} is set but train_impl={self.train_impl!r}: rewards are for train_impl: kto"
                         for name in ("reward_data_paths", "valid_reward_data_paths") if getattr(self, name)]
        pairs = (("data_paths", "rejected_data_paths"), ("label_data_paths", "rejected_label_data_paths"),
                 ("valid_data_paths", "valid_rejected_data_paths"),
                 ("valid_label_data_paths", "valid_rejected_label_data_paths"))
        if self.train_impl == "dpo" and (not number(self.dpo_beta) or self.dpo_beta <= 0):
            problems.append(f"dpo_beta={self.dpo_beta!r}: DPO's beta must be a positive number (GPT-NeoX's default "
                            "0.1)")
        if self.train_impl == "rm" and (not number(self.z_loss) or self.z_loss < 0):
            problems.append(f"z_loss={self.z_loss!r}: must be a number >= 0")
        if self.pairs:
            problems += [f"{rejected} has {len(getattr(self, rejected))} entries for {len(getattr(self, chosen))} "
                         f"{chosen}: {self.train_impl.upper()} pairs document i of each chosen file with document i "
                         "of its rejected one"
                         for chosen, rejected in pairs if len(getattr(self, rejected)) != len(getattr(self, chosen))]
        else:
            problems += [f"{rejected} is set but train_impl={self.train_impl!r}: rejected sequences are for "
                         "train_impl: dpo and rm" for _, rejected in pairs if getattr(self, rejected)]
        if problems:
            raise ConfigError("; ".join(problems))

    def _check_domains(self):
        """Numbers outside the range where they mean something, each named with the setting to change."""
        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {rule}")

        need(self.lr > 0, "lr", "the learning rate must be positive")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"must be between 0 and lr={self.lr}")
        need(self.warmup >= 0, "warmup", "a fraction of lr_decay_iters (< 1) or a number of steps (>= 1), not negative")
        need(self.lr_decay_iters >= 0, "lr_decay_iters", "0 (train_iters) or a number of steps")
        need(len(self.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                          for b in self.betas), "betas", "two numbers in [0, 1)")
        need(self.eps > 0, "eps", "Adam's epsilon must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be 0 or positive")
        need(self.grad_clip >= 0, "grad_clip", "a gradient-norm limit (0 turns clipping off), not negative")
        need(0 <= self.initial_scale_power <= 64, "initial_scale_power", "the fp16 loss scale is 2^this: 0 to 64")
        need(self.min_loss_scale > 0, "min_loss_scale", "must be positive")
        need(self.max_skipped_in_a_row >= 1, "max_skipped_in_a_row", "must be at least 1")
        need(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be at least 1 (1 stops at the first)")
        need(self.pipe_microbatches >= 0, "pipe_microbatches", "0 (automatic) or a number of microbatches")
        need(self.keep_every >= 0, "keep_every", "0 (off) or a number of steps")
        need(self.keep_last >= 0, "keep_last", "0 (keep all) or a number of checkpoints")
        need(all(isinstance(i, int) and i >= 0 for i in self.extra_save_iters), "extra_save_iters",
             "steps to save at, each 0 or more")
        need(self.eval_iters >= 0, "eval_iters", "0 (no validation) or a number of batches")
        need(self.peak_tflops >= 0, "peak_tflops", "0 (from the device kind) or the device's peak")
        need(not self.profile_steps or (len(self.profile_steps) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.profile_steps)
            and 1 <= self.profile_steps[0] <= self.profile_steps[1]), "profile_steps",
            "two steps [first, last], 1 <= first <= last (counted from 1, as the log counts them), or [] for none")
        need(not self.profile_steps or bool(self.tensorboard_dir or self.save), "profile_steps",
             "the trace is written into tensorboard_dir (or <save>/tensorboard): set one of them")
        for name in ("data_weights", "valid_data_weights"):
            need(all(isinstance(w, (int, float)) and w > 0 for w in getattr(self, name)), name,
                 "every weight must be a positive number")
        need(not self.lr_decay_iters or self.warmup_iters <= self.decay_iters, "warmup",
             f"gives {self.warmup_iters} warmup steps, more than the {self.decay_iters} decay steps")

    @property
    def working_dtype(self) -> str:
        """The dtype the train step stores its working weights in and computes with."""
        return _WORKING_DTYPE[self.precision]

    def working_model(self) -> NeoXConfig:
        """The model as the train step runs it: weights stored and computed in `working_dtype`; below fp32 an fp32
        master copy lives with the optimizer (neox_jax/train.py)."""
        return self.model.replace(dtype=self.working_dtype, param_dtype=self.working_dtype)

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def warmup_iters(self) -> int:
        return int(self.warmup * self.decay_iters) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    def global_batch_size(self, data: int) -> int:
        return self.micro_batch_size * self.grad_accum_steps * data

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        d = dict(d)
        _check_keys(d, cls, "training setting")
        model = d.pop("model", "pythia-70m")
        if isinstance(model, str):
            model = NeoXConfig.preset(model)
        elif isinstance(model, Mapping):
            model = dict(model)
            preset = model.pop("preset", None)
            model = NeoXConfig.preset(preset, **model) if preset else NeoXConfig.from_dict(model)
        return cls(model=model, **d)

    @classmethod
    def from_yaml(cls, *paths: str | os.PathLike, **overrides: Any) -> "TrainConfig":
        """Our YAML format (see configs/README.md); several files merge as GPT-NeoX merges them. GPT-NeoX's own
        files are read by neox_jax.convert.neox_yaml (`read_train_config` takes either)."""
        raw = load_yaml(*paths)
        if "num_layers" in raw:
            raise ConfigError(f"{', '.join(map(str, paths))}: a GPT-NeoX config; read it with "
                              "neox_jax.convert.neox_yaml.read_train_config (`neox-jax train` reads both)")
        return cls.from_dict({**raw, **overrides})
