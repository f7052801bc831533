"""GPT-NeoX's YAML configs: merged the way GPT-NeoX merges them, read into NeoXConfig and TrainConfig."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from neox_jax.config import ConfigError, NeoXConfig, TrainConfig

# The 20B tokenizer's vocabulary; GPT-NeoX pads it to a multiple of 128 x tensor-parallel size.
NEOX_TOKENIZER_VOCAB = 50277


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


# GPT-NeoX settings of which neox-jax implements one value: key -> (GPT-NeoX's default, that value). A config that
# asks for another value (or leaves a default we do not implement, like GPT-NeoX's 0.1 dropout) is refused.
ONLY = {
    "norm": ("layernorm", "layernorm"),
    "pos_emb": ("learned", "rotary"),
    "no_weight_tying": (False, True),
    "gpt_j_tied": (False, False),
    "activation": ("gelu", "gelu"),
    "mlp_type": ("regular", "regular"),
    "moe_num_experts": (1, 1),
    "use_bias_in_attn_linear": (True, True),
    "use_bias_in_mlp": (True, True),
    "use_bias_in_norms": (True, True),
    "hidden_dropout": (0.1, 0),
    "attention_dropout": (0.1, 0),
    "output_layer_parallelism": ("column", "column"),
}
TRAINING_ONLY = {"hidden_dropout", "attention_dropout"}
DENSE_ATTENTION = {"global", "flash"}  # "flash" is GPT-NeoX's kernel for the same dense causal attention
OPTIMIZERS = {"adam", "adamw", "cpu_adam", "cpu_torch_adam"}  # apex/DeepSpeed Adam runs decoupled decay (AdamW)


def _layers(attention_config, where: str):
    """GPT-NeoX's `[[types, repeats], ...]` attention_config, checked for shape."""
    try:
        return [(list(types), int(n)) for types, n in attention_config]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: attention_config={attention_config!r}: "
                          "expected [[[types], layers], ...]") from None


def model_config(*paths: str | os.PathLike, tokenizer_vocab_size: int = NEOX_TOKENIZER_VOCAB,
                 weights_only: bool = False, **overrides: Any) -> NeoXConfig:
    """Model config from GPT-NeoX YAML files, merged as GPT-NeoX merges them.

    The vocabulary is padded like GPT-NeoX does: to a multiple of
    `make_vocab_size_divisible_by` (128) x `model_parallel_size`. `weights_only` (reading a checkpoint's
    weights, not training) accepts settings that only change training, like dropout.
    """
    args = load_neox_yaml(*paths)
    where = ", ".join(str(p) for p in paths)

    def get(key, default=None):
        return args.get(key, default)

    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if get(key) is None:
            raise ConfigError(f"{where}: {key} is not set in any of these files")
    for key, (default, needed) in ONLY.items():
        if weights_only and key in TRAINING_ONLY:
            continue
        if get(key, default) != needed:
            raise ConfigError(f"{where}: {key}={get(key, default)!r}" + (" (GPT-NeoX's default)" if key not in args
                              else "") + f" is not supported: neox-jax implements {key}: {needed!r} only")
    for types, _ in _layers(get("attention_config") or [[["global"], 1]], where):
        if set(types) - DENSE_ATTENTION:
            raise ConfigError(f"{where}: attention_config {types} is not supported: neox-jax implements dense causal "
                              f"attention only ({', '.join(sorted(DENSE_ATTENTION))}, the same function)")
    if get("sparsity_config"):
        raise ConfigError(f"{where}: sparsity_config is set: sparse attention is not supported")
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
        return NeoXConfig(**{**kwargs, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def train_config(*paths: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """TrainConfig from GPT-NeoX YAML files: layout, batch, precision, optimizer, schedule, data, logging."""
    args = load_neox_yaml(*paths)
    model = model_config(*paths)
    optimizer = args.get("optimizer") or {}
    if str(optimizer.get("type", "adam")).lower() not in OPTIMIZERS:
        raise ConfigError(f"{paths[0]}: optimizer type {optimizer['type']!r} is not supported: neox-jax trains with "
                          "AdamW (GPT-NeoX's `Adam` with decoupled weight decay)")
    opt = optimizer.get("params", {})
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
    return TrainConfig(**d)
