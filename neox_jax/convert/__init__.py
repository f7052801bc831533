"""Converters between neox_jax parameters and other checkpoint formats."""
