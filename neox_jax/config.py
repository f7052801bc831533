"""NeoXConfig: everything the model needs, as a frozen dataclass with named presets.

Readers for the two foreign config formats live here too: Hugging Face `config.json` (both the old
`rotary_pct`/`rotary_emb_base` form and the transformers v5 `rope_parameters` form) and GPT-NeoX's own
YAML files (several merged the way GPT-NeoX merges them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

ACTIVATIONS = ("gelu", "gelu_fast")
INIT_METHODS = ("small_init", "wang_init", "normal", "scaled_normal")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")

# Hugging Face `hidden_act` spellings of the two GELUs; every tanh form computes the same formula.
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_fast": "gelu_fast",
    "gelu_new": "gelu_fast",
    "gelu_pytorch_tanh": "gelu_fast",
}

# The 20B tokenizer's vocabulary; GPT-NeoX pads it to a multiple of 128 x tensor-parallel size.
NEOX_TOKENIZER_VOCAB = 50277


class ConfigError(ValueError):
    """A config value that cannot work; the message names the value and the setting."""


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
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
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
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct={self.rotary_pct}: must be in (0, 1]")
        if self.rotary_ndims % 2 or self.rotary_ndims == 0:
            raise ConfigError(
                f"rotary_pct={self.rotary_pct} with head_dim={self.head_dim} gives rotary_ndims="
                f"{self.rotary_ndims}: rotary needs an even, non-zero number of dimensions")
        for name, allowed in (("activation", ACTIVATIONS), ("init_method", INIT_METHODS),
                              ("output_layer_init_method", INIT_METHODS), ("dtype", DTYPES),
                              ("param_dtype", DTYPES), ("remat_policy", REMAT_POLICIES)):
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
        return 2 * v * h + self.num_layers * per_layer + 2 * h

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

    # ---- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "NeoXConfig":
        if isinstance(path_or_dict, Mapping):
            hf, where = dict(path_or_dict), "config dict"
        else:
            p = Path(path_or_dict)
            p = p / "config.json" if p.is_dir() else p
            if not p.is_file():
                raise FileNotFoundError(f"no Hugging Face config at {p} (expected a folder with config.json)")
            try:
                hf = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
            where = str(p)
        if hf.get("model_type", "gpt_neox") != "gpt_neox":
            raise ConfigError(f"{where}: model_type={hf['model_type']!r}, expected 'gpt_neox'")
        act = hf.get("hidden_act", "gelu")
        if act not in _HF_ACTIVATIONS:
            raise ConfigError(f"{where}: hidden_act={act!r} is not a NeoX activation; "
                              f"supported: {', '.join(_HF_ACTIVATIONS)}")
        if hf.get("tie_word_embeddings", False):
            raise ConfigError(f"{where}: tie_word_embeddings=true; NeoX models have an untied embed_out")
        if not hf.get("attention_bias", True):
            raise ConfigError(f"{where}: attention_bias=false is not supported (NeoX and Pythia use biases)")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # v5 lets rope_scaling win
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{where}: rope type {rope.get('rope_type', rope.get('type'))!r} is not "
                              "supported; only the default NeoX rotary")
        try:
            kwargs = dict(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                intermediate_size=hf.get("intermediate_size") or 0,
                rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
                rotary_base=float(rope.get("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000)))),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
                use_parallel_residual=hf.get("use_parallel_residual", True),
                activation=_HF_ACTIVATIONS[act],
                bos_token_id=_first(hf.get("bos_token_id"), 0),
                eos_token_id=_first(hf.get("eos_token_id"), 0),
            )
        except KeyError as e:
            raise ConfigError(f"{where}: missing required key {e.args[0]!r}") from None
        try:
            return cls(**{**kwargs, **overrides})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """A `config.json` dict that transformers v4 and v5 both read (old and new rotary keys)."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.activation,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rotary_base,
                                "partial_rotary_factor": self.rotary_pct},
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "initializer_range": self.init_std,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }

    # ---- GPT-NeoX YAML --------------------------------------------------------------------------
    @classmethod
    def from_neox_yaml(cls, *paths: str | os.PathLike, tokenizer_vocab_size: int = NEOX_TOKENIZER_VOCAB,
                       **overrides: Any) -> "NeoXConfig":
        """Model config from GPT-NeoX YAML files, merged as GPT-NeoX merges them.

        The vocabulary is padded like GPT-NeoX does: to a multiple of
        `make_vocab_size_divisible_by` (128) x `model_parallel_size`.
        """
        args = load_neox_yaml(*paths)
        where = ", ".join(str(p) for p in paths)

        def get(key, default=None):
            return args.get(key, default)

        for key in ("num_layers", "hidden_size", "num_attention_heads"):
            if get(key) is None:
                raise ConfigError(f"{where}: {key} is not set in any of these files")
        # key: (GPT-NeoX default, the only value this model implements)
        for key, (default, needed) in {"norm": ("layernorm", "layernorm"), "pos_emb": ("learned", "rotary"),
                                       "no_weight_tying": (False, True), "gpt_j_tied": (False, False),
                                       "activation": ("gelu", "gelu")}.items():
            if get(key, default) != needed:
                raise ConfigError(f"{where}: {key}={get(key, default)!r} is not supported; set {key}: {needed!r}")
        if get("num_kv_heads") not in (None, get("num_attention_heads")):
            raise ConfigError(f"{where}: num_kv_heads={get('num_kv_heads')} (grouped-query attention) is not supported")
        multiple = int(get("make_vocab_size_divisible_by", 128)) * int(get("model_parallel_size", 1) or 1)
        vocab = math.ceil(tokenizer_vocab_size / multiple) * multiple
        dtype = "float32"
        if (get("bf16") or {}).get("enabled") or get("precision") == "bfloat16":
            dtype = "bfloat16"
        elif (get("fp16") or {}).get("enabled") or get("precision") == "fp16":
            dtype = "bfloat16" if (get("fp16") or {}).get("type") == "bfloat16" else "float16"
        kwargs = dict(
            vocab_size=vocab,
            hidden_size=get("hidden_size"),
            num_layers=get("num_layers"),
            num_heads=get("num_attention_heads"),
            intermediate_size=get("intermediate_size") or 0,
            rotary_pct=float(get("rotary_pct", 1.0)),
            rotary_base=float(get("rotary_emb_base", 10000)),
            max_position_embeddings=get("max_position_embeddings") or get("seq_length") or 2048,
            layer_norm_eps=float(get("layernorm_epsilon", 1e-5)),
            use_parallel_residual=bool(get("gpt_j_residual", False)),
            # bias_gelu_fusion runs the tanh approximation: that is the function NeoX trained.
            activation="gelu_fast" if get("bias_gelu_fusion", False) else "gelu",
            init_method=get("init_method", "normal"),
            output_layer_init_method=get("output_layer_init_method", "scaled_normal"),
            init_std=float(get("init_method_std", 0.02)),
            dtype=dtype,
            remat_policy="full" if get("checkpoint_activations", False) else "none",
        )
        try:
            return cls(**{**kwargs, **overrides})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _check_keys(d: Mapping[str, Any], cls, what: str):
    """An unknown key is an error that names the nearest valid one."""
    import difflib

    fields = sorted(f.name for f in dataclasses.fields(cls))
    for key in d:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            raise ConfigError(f"unknown {what} {key!r}"
                              + (f"; did you mean {near[0]!r}?" if near else f"; valid settings: {', '.join(fields)}"))


def apply_overrides(cfg: "TrainConfig", pairs: list[str]) -> "TrainConfig":
    """`key=value` (YAML values) on a TrainConfig; `model.key=value` reaches into the model config."""
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"override {pair!r}: expected key=value, e.g. train_iters=100 or model.num_layers=4")
        value = yaml.safe_load(raw)
        if key.startswith("model."):
            _check_keys({key[6:]: value}, NeoXConfig, "model setting")
            cfg = cfg.replace(model=cfg.model.replace(**{key[6:]: value}))
        else:
            _check_keys({key: value}, TrainConfig, "training setting")
            cfg = cfg.replace(**{key: value})
    return cfg


def preset_key(name: str) -> str:
    """'EleutherAI/pythia-70m' -> 'pythia-70m': the key a preset name is looked up by."""
    return name.lower().removeprefix("eleutherai/")


def _first(x, default):
    if isinstance(x, (list, tuple)):
        return x[0] if x else default
    return default if x is None else x


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


def load_neox_yaml(*paths: str | os.PathLike) -> dict:
    """Merge GPT-NeoX YAML files into one dict with `-` in keys replaced by `_`.

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
    seed: int = 1234
    # data
    data_paths: tuple[str, ...] = ()
    data_weights: tuple[float, ...] = ()
    split: str = "969,30,1"
    tokenizer: str = ""  # tokenizer.json, for samples printed during training
    # evaluation, checkpoints, logging
    eval_interval: int = 1000
    eval_iters: int = 10
    save: str = ""  # checkpoint folder ("" = no checkpoints)
    save_interval: int = 1000
    keep_last: int = 3
    keep_every: int = 0  # also keep every N-th step's checkpoint forever (0 = off)
    log_interval: int = 10
    tensorboard_dir: str = ""  # "" = <save>/tensorboard, or none without `save`
    wandb_project: str = ""  # log to Weights & Biases when set and wandb is installed
    peak_tflops: float = 0.0  # device peak for MFU; 0 = from the device kind (A100 312, H100/H200 989 bf16)
    sample_prompt: str = ""  # printed with a greedy continuation at the end of training

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.zero_stage not in (0, 1, 3):
            raise ConfigError(f"zero_stage={self.zero_stage}: choose 0, 1 or 3 (FSDP)")
        if self.decay_style not in DECAY_STYLES:
            raise ConfigError(f"decay_style={self.decay_style!r}: choose one of {', '.join(DECAY_STYLES)}")
        for name in ("seq_length", "micro_batch_size", "grad_accum_steps", "train_iters", "eval_interval",
                     "save_interval", "log_interval", "keep_last", "loss_scale_window", "hysteresis"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.seq_length > self.model.max_position_embeddings:
            raise ConfigError(f"seq_length={self.seq_length} exceeds the model's max_position_embeddings="
                              f"{self.model.max_position_embeddings}")
        if self.data_weights and len(self.data_weights) != len(self.data_paths):
            raise ConfigError(f"data_weights has {len(self.data_weights)} entries for "
                              f"{len(self.data_paths)} data_paths")
        for name in ("betas", "data_paths", "data_weights"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, "mesh", dict(self.mesh))
        # The working weights are stored in the precision's dtype; the fp32 master copy lives with the optimizer.
        working = _WORKING_DTYPE[self.precision]
        if self.model.param_dtype != working or self.model.dtype != working:
            object.__setattr__(self, "model", self.model.replace(param_dtype=working, dtype=working))

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
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "TrainConfig":
        """Our YAML format (see configs/README.md), or GPT-NeoX YAML files read directly."""
        p = Path(path)
        raw = load_neox_yaml(p)
        if "num_layers" in raw:  # a GPT-NeoX config
            return cls.from_neox_yaml(p, **overrides)
        return cls.from_dict({**raw, **overrides})

    @classmethod
    def from_neox_yaml(cls, *paths: str | os.PathLike, **overrides: Any) -> "TrainConfig":
        args = load_neox_yaml(*paths)
        model = NeoXConfig.from_neox_yaml(*paths)
        opt = (args.get("optimizer") or {}).get("params", {})
        precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[model.dtype]
        iters = int(args.get("train_iters", 1000))
        if "warmup" in args and float(args["warmup"]) >= 1:
            raise ConfigError(f"{paths[0]}: warmup={args['warmup']}: GPT-NeoX takes a fraction of the decay iterations")
        d = dict(
            model=model,
            mesh={"data": -1, "pipe": max(1, int(args.get("pipe_parallel_size", 1) or 1)),
                  "tensor": int(args.get("model_parallel_size", 1) or 1)},
            seq_length=int(args.get("seq_length", 2048)),
            micro_batch_size=int(args.get("train_micro_batch_size_per_gpu", 4)),
            grad_accum_steps=int(args.get("gradient_accumulation_steps", args.get("gas", 1))),
            precision=precision,
            zero_stage=min(int((args.get("zero_optimization") or {}).get("stage", 0)), 1),
            lr=float(opt.get("lr", 1e-3)),
            min_lr=float(args.get("min_lr", 0.0)),
            warmup=float(args.get("warmup", 0.01)),
            decay_style=str(args.get("lr_decay_style", "linear")),
            legacy_schedule=True,  # the formula GPT-NeoX v1.0 trained Pythia and the 20B with
            train_iters=iters,
            lr_decay_iters=int(args.get("lr_decay_iters") or 0),
            betas=tuple(opt.get("betas", (0.9, 0.999))),
            eps=float(opt.get("eps", 1e-8)),
            weight_decay=float(args.get("weight_decay", 0.01)),
            grad_clip=float(args.get("gradient_clipping", 1.0)),
            seed=int(args.get("seed", 1234)),
            initial_scale_power=int((args.get("fp16") or {}).get("initial_scale_power", 16)),
            loss_scale_window=int((args.get("fp16") or {}).get("loss_scale_window", 1000)),
            hysteresis=int((args.get("fp16") or {}).get("hysteresis", 2)),
            min_loss_scale=float((args.get("fp16") or {}).get("min_loss_scale", 1)),
            data_paths=tuple(args.get("train_data_paths") or ([args["data_path"]] if args.get("data_path") else [])),
            data_weights=tuple(args.get("train_data_weights") or ()),
            split=str(args.get("split", "969,30,1")),
            eval_interval=int(args.get("eval_interval", 1000)),
            eval_iters=int(args.get("eval_iters", 100)),
            save=str(args.get("save") or ""),
            save_interval=int(args.get("checkpoint_factor", args.get("save_interval", 1000)) or 1000),
            log_interval=int(args.get("log_interval", 100)),
            tensorboard_dir=str(args.get("tensorboard_dir") or ""),
        )
        d.update(overrides)
        return cls(**d)
