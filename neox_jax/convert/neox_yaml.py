"""GPT-NeoX's YAML configs: merged the way GPT-NeoX merges them, read into NeoXConfig and TrainConfig."""

from __future__ import annotations

import itertools
import math
import os
import warnings
from pathlib import Path
from typing import Any

from neox_jax.config import NeoXConfig, TrainConfig, apply_overrides, is_preset, load_yaml
from neox_jax.convert.neox_keys import V2_DEFAULTS, check
from neox_jax.errors import ChangedDefaultWarning, ConfigError, UnknownSettingWarning

# The 20B tokenizer's vocabulary; GPT-NeoX pads it to a multiple of 128 x tensor-parallel size.
NEOX_TOKENIZER_VOCAB = 50277


DENSE_ATTENTION = {"global", "flash"}  # "flash" is GPT-NeoX's kernel for the same dense causal attention
OPTIMIZERS = {"adam", "adamw", "cpu_adam", "cpu_torch_adam"}  # apex/DeepSpeed Adam runs decoupled decay (AdamW)
OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay"}
# vocabulary sizes of GPT-NeoX's tokenizers when no tokenizer file is at hand (HFTokenizer: the 20B's)
TOKENIZER_VOCAB = {"HFTokenizer": NEOX_TOKENIZER_VOCAB, "GPT2BPETokenizer": 50257, "HFGPT2Tokenizer": 50257,
                   "CharLevelTokenizer": 512}


def _read_checked(paths, weights_only: bool) -> tuple[dict, str]:
    """The merged settings, after refusing every one neox-jax does not implement; unknown keys are warned of."""
    args = load_yaml(*paths)
    where = ", ".join(str(p) for p in paths)
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if args.get(key) is None:
            raise ConfigError(f"{where}: {key} is not set in any of these files")
    for message in check(args, where, weights_only):
        warnings.warn(message, UnknownSettingWarning, stacklevel=3)
    bad = _not_numbers(args)
    if bad:  # before any int() or float() below meets them
        raise ConfigError(f"{where}: " + "; ".join(bad))
    return args, where


WHOLE = {  # GPT-NeoX settings that are whole numbers
    "num_layers", "hidden_size", "num_attention_heads", "intermediate_size", "mlp_multiple_of", "seq_length",
    "max_position_embeddings", "make_vocab_size_divisible_by", "padded_vocab_size", "num_kv_heads",
    "model_parallel_size", "pipe_parallel_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gas",
    "train_batch_size", "lr_decay_iters", "train_iters", "seed", "eval_interval", "eval_iters", "checkpoint_factor",
    "save_interval", "keep_last_n_checkpoints", "log_interval", "profile_step_start", "profile_step_stop",
    "fp16.initial_scale_power", "fp16.loss_scale_window", "fp16.hysteresis", "zero_optimization.stage"}
REAL = {  # and numbers
    "expansion_factor", "layernorm_epsilon", "rotary_pct", "rotary_emb_base", "init_method_std", "lr", "min_lr",
    "warmup", "lr_decay_fraction", "weight_decay", "gradient_clipping", "clip_grad", "peak_theoretical_tflops",
    "optimizer.params.lr", "optimizer.params.eps", "optimizer.params.weight_decay", "fp16.loss_scale", "dpo_beta",
    "hidden_dropout", "attention_dropout",
    "fp16.min_loss_scale", "kto_beta", "kto_desirable_weight", "kto_undesirable_weight", "z_loss"}


def _not_numbers(args: dict) -> list[str]:
    """Each numeric setting that is not a number, named with its value (a number YAML reads as text, like 6e-4,
    counts as the number)."""
    def value(dotted):
        d = args
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    bad = []
    for key in sorted(WHOLE | REAL):
        v = value(key)
        if v is None:
            continue
        try:
            number = float(v) if not isinstance(v, bool) else None
        except (TypeError, ValueError):
            number = None
        whole = key in WHOLE
        if number is None or (whole and not number.is_integer()):
            bad.append(f"{key}={v!r}: expected {'a whole number' if whole else 'a number'}")
    return bad


def _tokenizer_vocab(args: dict, where: str) -> int:
    """The tokenizer's vocabulary size, as GPT-NeoX gets it: from `vocab_file` when it is a readable tokenizer.json,
    else the size of the tokenizer `tokenizer_type` names."""
    kind, file = args.get("tokenizer_type", "GPT2BPETokenizer"), args.get("vocab_file")
    if kind == "HFTokenizer" and file and Path(file).is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(file)).get_vocab_size()
    if kind not in TOKENIZER_VOCAB:
        raise ConfigError(f"{where}: tokenizer_type={kind!r}: neox-jax knows the vocabulary size of "
                          f"{', '.join(TOKENIZER_VOCAB)}, or of a readable tokenizer.json in vocab_file; set "
                          "padded_vocab_size to the model's vocabulary")
    return TOKENIZER_VOCAB[kind]


def _layers(attention_config, where: str):
    """GPT-NeoX's `[[types, repeats], ...]` attention_config, checked for shape."""
    try:
        return [(list(types), int(n)) for types, n in attention_config]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: attention_config={attention_config!r}: "
                          "expected [[[types], layers], ...]") from None


def model_config(*paths: str | os.PathLike, tokenizer_vocab_size: int = 0,
                 weights_only: bool = False, **overrides: Any) -> NeoXConfig:
    """Model config from GPT-NeoX YAML files, merged as GPT-NeoX merges them.

    Every key is checked against neox_keys.py first. The vocabulary is `padded_vocab_size`, or the tokenizer's
    (`tokenizer_vocab_size`, else from `vocab_file` / `tokenizer_type`) padded as GPT-NeoX pads it: to a multiple
    of `make_vocab_size_divisible_by` (128) x `model_parallel_size`. `weights_only` (reading a checkpoint's
    weights, not training) accepts settings that only change training, like dropout.
    """
    args, where = _read_checked(paths, weights_only)

    def get(key, default=None):
        return args.get(key, default)

    for types, _ in _layers(get("attention_config") or [[["global"], 1]], where):
        if set(types) - DENSE_ATTENTION:
            raise ConfigError(f"{where}: attention_config {types} is not supported: neox-jax implements dense causal "
                              f"attention only ({', '.join(sorted(DENSE_ATTENTION))}, the same function)")
    if get("num_kv_heads") not in (None, get("num_attention_heads")):
        raise ConfigError(f"{where}: num_kv_heads={get('num_kv_heads')} (grouped-query attention) is not supported")
    if get("padded_vocab_size"):
        vocab = int(get("padded_vocab_size"))
    else:
        multiple = int(get("make_vocab_size_divisible_by", 128)) * int(get("model_parallel_size", 1) or 1)
        vocab = math.ceil((tokenizer_vocab_size or _tokenizer_vocab(args, where)) / multiple) * multiple
    # GPT-NeoX's MLP width: intermediate_size, else expansion_factor x hidden, else 4 x hidden, rounded up to a
    # multiple of 2 x mlp_multiple_of
    hidden = int(get("hidden_size"))
    ffn = int(get("intermediate_size") or int(float(get("expansion_factor") or 4) * hidden))
    multiple_of = 2 * int(get("mlp_multiple_of", 1) or 1)
    ffn = multiple_of * math.ceil(ffn / multiple_of)
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
        intermediate_size=ffn,
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
        sequence_parallel=bool(get("sequence_parallel", False)),
        hidden_dropout=changed_default(args, "hidden_dropout", where, weights_only),
        attention_dropout=changed_default(args, "attention_dropout", where, weights_only),
    )
    try:
        return NeoXConfig(**{**kwargs, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def changed_default(args: dict, key: str, where: str, quiet: bool = False) -> float:
    """A key whose GPT-NeoX default changed between versions: its value, else v2's default (neox_keys.V2_DEFAULTS),
    with a warning naming the default used (not for a weights-only read, where training keys do nothing)."""
    if args.get(key) is not None:
        return float(args[key])
    v2, v3 = V2_DEFAULTS[key]
    if not quiet:
        warnings.warn(f"{where}: {key} is not set: GPT-NeoX v2's default {v2} applies (the version that trained Pythia "
                      f"and the 20B; GPT-NeoX v3 and later default to {v3}): set {key} to choose",
                      ChangedDefaultWarning, stacklevel=3)
    return v2


def train_config(*paths: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """TrainConfig from GPT-NeoX YAML files: layout, batch, precision, optimizer, schedule, data, logging."""
    args = load_yaml(*paths)
    model = model_config(*paths)
    where = ", ".join(str(p) for p in paths)
    optimizer = args.get("optimizer") or {}
    kind = str(optimizer.get("type", args.get("optimizer_type", "adam")))
    if kind.lower() not in OPTIMIZERS:
        raise ConfigError(f"{where}: optimizer type {kind!r} is not supported: neox-jax trains with "
                          "AdamW (GPT-NeoX's `Adam` with decoupled weight decay)")
    opt = optimizer.get("params") or {}
    if set(opt) - OPTIMIZER_PARAMS:
        raise ConfigError(f"{where}: optimizer params {sorted(set(opt) - OPTIMIZER_PARAMS)} are not supported: "
                          f"neox-jax's AdamW takes {', '.join(sorted(OPTIMIZER_PARAMS))}")
    fp16 = args.get("fp16") or {}
    if fp16.get("enabled") and float(fp16.get("loss_scale", 0) or 0):
        raise ConfigError(f"{where}: fp16 loss_scale={fp16['loss_scale']}: a static loss scale is not supported; "
                          "set loss_scale: 0 (DeepSpeed's dynamic loss scale)")
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[model.dtype]
    iters = int(args.get("train_iters", 1000))
    if "warmup" in args and float(args["warmup"]) >= 1:
        raise ConfigError(f"{where}: warmup={args['warmup']}: GPT-NeoX takes a fraction of the decay iterations")
    micro = int(args.get("train_micro_batch_size_per_gpu", 4))
    accum = int(args.get("gradient_accumulation_steps", args.get("gas", 1)))
    data = -1
    if args.get("train_batch_size"):  # GPT-NeoX's global batch: it fixes the data-parallel size
        data, rest = divmod(int(args["train_batch_size"]), micro * accum)
        if rest or not data:
            raise ConfigError(f"{where}: train_batch_size={args['train_batch_size']} is not a multiple of "
                              f"train_micro_batch_size_per_gpu x gradient_accumulation_steps = {micro * accum}")
    if args.get("train_impl") in ("dpo", "rm"):  # pairwise data: pos_* the chosen sequences, neg_* the rejected
        args = {**args, **{f"{k}_data_paths": args.get(f"pos_{k}_data_paths") for k in ("train", "valid")},
                **{f"{k}_label_data_paths": args.get(f"pos_{k}_label_data_paths") for k in ("train", "valid")}}
    train_paths, valid_paths = args.get("train_data_paths") or [], args.get("valid_data_paths") or []
    if args.get("data_path") and (train_paths or valid_paths):
        raise ConfigError(f"{where}: set either data_path or train/valid/test_data_paths, as GPT-NeoX requires")
    if bool(train_paths) != bool(valid_paths):
        raise ConfigError(f"{where}: train_data_paths and valid_data_paths go together (GPT-NeoX requires both)")
    save, load, finetune = str(args.get("save") or ""), str(args.get("load") or ""), bool(args.get("finetune"))
    if finetune and not load:
        raise ConfigError(f"{where}: finetune: true needs `load`, the checkpoint whose weights the run starts from")
    if load and not finetune and Path(load).resolve() != Path(save or ".").resolve():
        raise ConfigError(f"{where}: load={load!r} differs from save={save!r}: a neox-jax run resumes from its `save` "
                          "folder; set load to save (or drop it), or add `finetune: true` to start from load's weights")
    decay_iters = args.get("lr_decay_iters") or (int(float(args["lr_decay_fraction"]) * iters)
                                                  if args.get("lr_decay_fraction") else 0)
    vocab_file = args.get("vocab_file")
    d = dict(
        model=model,
        mesh={"data": data, "pipe": max(1, int(args.get("pipe_parallel_size", 1) or 1)),
              "tensor": int(args.get("model_parallel_size", 1) or 1)},
        seq_length=int(args.get("seq_length", 2048)),
        micro_batch_size=micro,
        grad_accum_steps=accum,
        precision=precision,
        # ZeRO-2 splits the gradients as well: ZeRO-1 here reduce-scatters them the same way; 3 is FSDP
        zero_stage={0: 0, 1: 1, 2: 1, 3: 3}[int((args.get("zero_optimization") or {}).get("stage", 0))],
        lr=float(opt.get("lr", args.get("lr") or 1e-3)),
        min_lr=float(args.get("min_lr", 0.0)),
        warmup=float(args.get("warmup", 0.01)),
        decay_style=str(args.get("lr_decay_style", "linear")),
        legacy_schedule=True,  # the formula GPT-NeoX v1.0 trained Pythia and the 20B with
        train_iters=iters,
        lr_decay_iters=int(decay_iters),
        betas=tuple(opt.get("betas", (0.9, 0.999))),
        eps=float(opt.get("eps", 1e-8)),
        weight_decay=float(opt["weight_decay"]) if "weight_decay" in opt else changed_default(args, "weight_decay",
                                                                                              where),
        grad_clip=float(args.get("gradient_clipping", args.get("clip_grad", 1.0))),
        seed=int(args.get("seed", 1234)),
        initial_scale_power=int(fp16.get("initial_scale_power", 16)),
        loss_scale_window=int(fp16.get("loss_scale_window", 1000)),
        hysteresis=int(fp16.get("hysteresis", 2)),
        min_loss_scale=float(fp16.get("min_loss_scale", 1)),
        data_paths=tuple(train_paths or ([args["data_path"]] if args.get("data_path") else [])),
        data_weights=tuple(args.get("train_data_weights") or ()),
        valid_data_paths=tuple(valid_paths),
        valid_data_weights=tuple(args.get("valid_data_weights") or ()),
        label_data_paths=tuple(args.get("train_label_data_paths") or ()),
        valid_label_data_paths=tuple(args.get("valid_label_data_paths") or ()),
        loss_mean="micro_batch",  # GPT-NeoX's: a token mean per micro batch and rank, averaged
        eod_mask_loss=bool(args.get("eod_mask_loss", False)),
        pack_impl=str(args.get("pack_impl", "packed")),
        train_impl=str(args.get("train_impl", "normal")),
        rejected_data_paths=tuple(args.get("neg_train_data_paths") or ()),
        rejected_label_data_paths=tuple(args.get("neg_train_label_data_paths") or ()),
        valid_rejected_data_paths=tuple(args.get("neg_valid_data_paths") or ()),
        valid_rejected_label_data_paths=tuple(args.get("neg_valid_label_data_paths") or ()),
        dpo_beta=float(args.get("dpo_beta", 0.1)),
        dpo_reference_free=bool(args.get("dpo_reference_free", False)),
        reward_data_paths=tuple(args.get("train_reward_data_paths") or ()),
        valid_reward_data_paths=tuple(args.get("valid_reward_data_paths") or ()),
        kto_beta=float(args.get("kto_beta", 0.1)),
        kto_desirable_weight=float(args.get("kto_desirable_weight", 1.0)),
        kto_undesirable_weight=float(args.get("kto_undesirable_weight", 1.0)),
        z_loss=float(args.get("z_loss", 0.0)),
        split=str(args.get("split", "969,30,1")),
        tokenizer=str(vocab_file) if vocab_file and Path(vocab_file).is_file() else "",
        eval_interval=int(args.get("eval_interval", 1000)),
        eval_iters=int(args.get("eval_iters", 100)),
        save=save,
        init_from=load if finetune else "",  # GPT-NeoX's finetune: load's weights, a fresh optimizer, iteration 0
        save_interval=int(args.get("checkpoint_factor", args.get("save_interval", 1000)) or 1000),
        extra_save_iters=tuple(int(i) for i in args.get("extra_save_iters") or ()),
        keep_last=int(args.get("keep_last_n_checkpoints") or 0),  # GPT-NeoX keeps every checkpoint by default
        log_interval=int(args.get("log_interval", 100)),
        tensorboard_dir=str(args.get("tensorboard_dir") or ""),
        peak_tflops=float(args.get("peak_theoretical_tflops") or 0),
        # GPT-NeoX's nsys window (defaults 10 to 12) becomes a jax.profiler trace of the same steps
        profile_steps=(int(args.get("profile_step_start", 10)), int(args.get("profile_step_stop", 12)))
        if args.get("profile") else (),
    )
    d.update(overrides)
    return TrainConfig(**d)


def read_train_config(*paths: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """Training YAML files, ours (configs/README.md) or GPT-NeoX's, merged as GPT-NeoX merges them."""
    if "num_layers" in load_yaml(*paths):  # a GPT-NeoX config
        return train_config(*paths, **overrides)
    return TrainConfig.from_yaml(*paths, **overrides)


def train_config_from_args(items: list[str]) -> "TrainConfig":
    """A training command's `CONFIG [CONFIG ...] [key=value ...]`: a preset name, or YAML files merged the GPT-NeoX
    way (ours or GPT-NeoX's; a key set in two files is an error), then the overrides in order."""
    files = list(itertools.takewhile(lambda a: "=" not in a, items))
    overrides = items[len(files):]
    if not files:
        raise ConfigError("give a training config first (a YAML file or a preset name), then key=value overrides")
    stray = [a for a in overrides if "=" not in a]
    if stray:
        raise ConfigError(f"{stray[0]!r} comes after the key=value overrides: give every config file before them")
    if len(files) == 1 and is_preset(files[0]):
        return apply_overrides(TrainConfig.from_dict({"model": files[0]}), overrides)
    return apply_overrides(read_train_config(*files), overrides)
