"""The GPT-NeoX tokenizer: any Hugging Face `tokenizer.json`, and training a NeoX-style one.

GPT-NeoX-20B's tokenizer is byte-level BPE with NFC normalisation, no prefix space, `<|endoftext|>` (the
end-of-document id, 0) and `<|padding|>` (1), and added tokens for runs of 2 to 24 spaces so that indented
code does not cost one token per space.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from neox_jax.atomic import atomic_path
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
SPACE_RUNS = range(24, 1, -1)  # the 20B tokenizer's order: 24 spaces first (id 50254) ... 2 spaces last


PIECE_CHARS = 1 << 16  # a text longer than this is encoded piece by piece (see NeoXTokenizer.encode_array)


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` cut into pieces of at most about `size` characters, each cut just before a space that stands alone
    between two non-space characters: a byte-level BPE's pre-tokenizer splits there in every context (no
    pattern of GPT-2's reaches across such a space; it begins the next word), so encoding the pieces one by
    one gives the tokens of the whole. A stretch of `size` characters without such a space stays whole."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:  # none behind: the next one ahead
            cut = next((m.start() for m in _ALONE_SPACE.finditer(text, start + size)), len(text))
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


_ALONE_SPACE = re.compile(r"(?<=\S) (?=\S)")


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
        self.pieceable = _pieceable(json.loads(self.tokenizer.to_str()))

    @property
    def vocab_size(self) -> int:
        """Including added tokens (50277 for the 20B tokenizer); the model pads this to a multiple of 128."""
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode_array(self, text: str, dtype=np.int32) -> np.ndarray:
        """The ids of `text` as an array, a long text encoded piece by piece (`pieces`) where the tokenizer allows
        it: working memory about 200 bytes per character of one piece (64 Ki characters: 13 MB) besides the text and
        its ids, where encoding it whole takes about 200 bytes per character of all of it."""
        parts = pieces(text) if self.pieceable else [text]
        return np.concatenate([np.asarray(self.tokenizer.encode(p).ids, dtype) for p in parts] or
                              [np.zeros(0, dtype)])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self.tokenizer.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)


def _pieceable(spec: dict) -> bool:
    """Whether pieces cut at a lone space encode as the whole does: a byte-level pre-tokenizer without a prefix
    space (the piece after a cut begins with its own space), a normalizer that cannot join a space to what
    precedes it, no post-processor that adds tokens per encode, and no added token holding a lone space."""
    pre, norm, post = spec.get("pre_tokenizer") or {}, spec.get("normalizer"), spec.get("post_processor")
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return (len(pres) == 1 and pres[0].get("type") == "ByteLevel" and not pres[0].get("add_prefix_space")
            and pres[0].get("use_regex", True)
            and (norm is None or norm.get("type") in ("NFC", "NFKC", "NFD", "NFKD"))
            and (post is None or post.get("type") == "ByteLevel")
            and not any(" " in t["content"] and t["content"].strip(" ") for t in spec.get("added_tokens", [])))


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
    with atomic_path(out) as tmp:
        tok.save(str(tmp))
    return out
