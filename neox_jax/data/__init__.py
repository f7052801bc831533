"""Data: the tokenizer, NeoX's .bin/.idx format, preprocessing, GPT sampling and per-process loading."""
