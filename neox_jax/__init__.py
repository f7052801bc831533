"""neox_jax: GPT-NeoX (Pythia, GPT-NeoX-20B) in JAX/Flax NNX.

The public names are imported on first use, so `neox_jax.data` tools (and worker processes) start without
loading JAX.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "CheckpointError": "neox_jax.errors",
    "ConfigError": "neox_jax.errors",
    "GPTNeoX": "neox_jax.model",
    "NeoXConfig": "neox_jax.config",
    "TrainConfig": "neox_jax.config",
    "Generator": "neox_jax.generation",
    "Sampling": "neox_jax.generation",
    "TrainCheckpointer": "neox_jax.checkpoint",
    "from_pretrained": "neox_jax.pretrained",
    "generate": "neox_jax.generation",
    "generate_text": "neox_jax.generation",
    "load_tokenizer": "neox_jax.pretrained",
    "perplexity": "neox_jax.evaluate",
    "save_pretrained": "neox_jax.pretrained",
}
__all__ = sorted(_PUBLIC)


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'neox_jax' has no attribute {name!r}")
