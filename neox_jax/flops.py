"""FLOPs per step and model FLOPs utilisation, in the conventions people quote (always labelled).

    6n      PaLM's: 6 x the matmul parameters + the attention's 12 x layers x hidden x seq, per token
    neox    GPT-NeoX's (Megatron's) 24 f B s L h^2 (1 + s/6h + V/16Lh), with f = 4 when layers are recomputed
    paper   the GPT-NeoX-20B paper's: 6 N + 60 s h L per token (N all parameters), which its 117 TFLOP/s per GPU used
"""

from __future__ import annotations

from neox_jax.config import NeoXConfig

# bf16 dense peak per device, TFLOP/s (fp16 is the same on these parts), by family: for kinds not in
# neox_jax/gpus.py's table of cards (PCIe and other variants, newer parts)
PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0, "h800": 989.0, "gh200": 989.0, "b200": 2250.0}


def matmul_params(cfg: NeoXConfig) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding (a lookup)."""
    return cfg.num_params - cfg.vocab_size * cfg.hidden_size


def flops_6n(cfg: NeoXConfig, seq_length: int, tokens: int) -> float:
    """Training FLOPs as 6N + attention (PaLM's convention): 6 * N_matmul + 12 * layers * hidden * seq per token."""
    return tokens * (6 * matmul_params(cfg) + 12 * cfg.num_layers * cfg.hidden_size * seq_length)


def flops_neox(cfg: NeoXConfig, seq_length: int, sequences: int, recompute: bool = False) -> float:
    """GPT-NeoX's (Megatron's) formula: 24 f B s L h^2 (1 + s/6h + V/16Lh), f = 3 (4 with recomputation)."""
    s, h, layers, v = seq_length, cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    f = 4 if recompute else 3
    return 24 * f * sequences * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """The device's bf16 peak from its kind string ('NVIDIA H100 80GB HBM3' -> 989), or None (e.g. CPU)."""
    from neox_jax import gpus

    if override:
        return override
    card = gpus.card_of(device_kind)
    if card:
        return card.peak_tflops
    kind = device_kind.lower()
    for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return peak
    return None


def flops_paper(cfg: NeoXConfig, seq_length: int, tokens: int) -> float:
    """The GPT-NeoX-20B paper's convention: (6 N + 60 s h L) FLOPs per token, N counting every parameter. For the 20B
    at s = 2048: 156.6 GFLOP per token; 117 TFLOP/s x 96 GPUs / 156.6e9 = 71.7k tokens/s, the paper's 1,830 hours
    for 150k steps of 1536 x 2048 tokens."""
    return tokens * (6 * cfg.num_params + 60 * seq_length * cfg.hidden_size * cfg.num_layers)
