"""Hugging Face `config.json` <-> NeoXConfig: the old `rotary_pct`/`rotary_emb_base` form and the
transformers v5 `rope_parameters` form are both read, and both are written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from neox_jax.config import NeoXConfig
from neox_jax.errors import ConfigError

# Hugging Face `hidden_act` spellings of the two GELUs; every tanh form computes the same formula.
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_fast": "gelu_fast",
    "gelu_new": "gelu_fast",
    "gelu_pytorch_tanh": "gelu_fast",
}


def config_from_hf(path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> NeoXConfig:
    """NeoXConfig from a Hugging Face `config.json` (a folder, the file, or its dict)."""
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
            hidden_dropout=float(hf.get("hidden_dropout") or 0.0),
            attention_dropout=float(hf.get("attention_dropout") or 0.0),
            num_labels=_num_labels(hf),
            bos_token_id=_first(hf.get("bos_token_id"), 0),
            eos_token_id=_first(hf.get("eos_token_id"), 0),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: missing required key {e.args[0]!r}") from None
    try:
        return NeoXConfig(**{**kwargs, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None

def _num_labels(hf: dict) -> int:
    """0 for a causal LM; a sequence classifier's (a reward model's) label count."""
    if not any("ForSequenceClassification" in a for a in hf.get("architectures") or []):
        return 0
    return len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))  # transformers' default: 2 labels


def config_to_hf(cfg: NeoXConfig) -> dict:
    """A `config.json` dict that transformers v4 and v5 both read (old and new rotary keys). A score model is a
    GPTNeoXForSequenceClassification whose padding token is the end-of-text one, so that it scores the last token
    before any padding (or the closing end-of-text token), where it was trained to."""
    head = {"architectures": ["GPTNeoXForCausalLM"]}
    if cfg.num_labels:
        labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        head = {"architectures": ["GPTNeoXForSequenceClassification"], "id2label": labels,
                "label2id": {v: int(k) for k, v in labels.items()}, "pad_token_id": cfg.eos_token_id}
    return {
        **head,
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.activation,
        "rotary_pct": cfg.rotary_pct,
        "rotary_emb_base": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base,
                            "partial_rotary_factor": cfg.rotary_pct},
        "max_position_embeddings": cfg.max_position_embeddings,
        "layer_norm_eps": cfg.layer_norm_eps,
        "use_parallel_residual": cfg.use_parallel_residual,
        "initializer_range": cfg.init_std,
        "attention_bias": True,
        "attention_dropout": cfg.attention_dropout,
        "hidden_dropout": cfg.hidden_dropout,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }


def _first(x, default):
    if isinstance(x, (list, tuple)):
        return x[0] if x else default
    return default if x is None else x
