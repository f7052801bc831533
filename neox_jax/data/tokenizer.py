"""The GPT-NeoX tokenizer: any Hugging Face `tokenizer.json`, and training a NeoX-style one.

GPT-NeoX-20B's tokenizer is byte-level BPE with NFC normalisation, no prefix space, `<|endoftext|>` (the
end-of-document id, 0) and `<|padding|>` (1), and added tokens for runs of 2 to 24 spaces so that indented
code does not cost one token per space.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
SPACE_RUNS = range(24, 1, -1)  # the 20B tokenizer's order: 24 spaces first (id 50254) ... 2 spaces last


class NeoXTokenizer:
    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer {path} not found: give a tokenizer.json file "
                                    "(e.g. GPT-NeoX's 20B_tokenizer.json) or a folder holding one")
        try:
            self.tokenizer = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{p} is not a valid tokenizer.json: {e}") from None
        self.path = p
        self.eod_id = self.tokenizer.token_to_id(EOD_TOKEN)
        if self.eod_id is None:
            raise ValueError(f"{p} has no {EOD_TOKEN} token; NeoX data needs it as the end-of-document id")
        self.pad_id = self.tokenizer.token_to_id(PAD_TOKEN)

    @property
    def vocab_size(self) -> int:
        """Including added tokens (50277 for the 20B tokenizer); the model pads this to a multiple of 128."""
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self.tokenizer.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)


def train_tokenizer(texts: Iterable[str], vocab_size: int, output: str | os.PathLike,
                    min_frequency: int = 2) -> Path:
    """Train a NeoX-style byte-level BPE on `texts` and write `output` (a tokenizer.json).

    `vocab_size` counts everything: the two special tokens, the BPE vocabulary and the 23 space-run tokens.
    """
    reserved = 2 + len(SPACE_RUNS)
    if vocab_size <= reserved + 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: it needs the 256 bytes, 2 special tokens and "
                         f"{len(SPACE_RUNS)} space-run tokens, so more than {reserved + 256}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPACE_RUNS), min_frequency=min_frequency,
                                  special_tokens=[EOD_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(" " * n, normalized=True, special=False) for n in SPACE_RUNS])
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out
