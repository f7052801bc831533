"""neox_jax: GPT-NeoX (Pythia, GPT-NeoX-20B) in JAX/Flax NNX."""

from neox_jax.config import ConfigError, NeoXConfig
from neox_jax.convert.hf import CheckpointError
from neox_jax.model import GPTNeoX
from neox_jax.pretrained import from_pretrained, save_pretrained

__all__ = ["CheckpointError", "ConfigError", "GPTNeoX", "NeoXConfig", "from_pretrained", "save_pretrained"]
__version__ = "0.1.0"
