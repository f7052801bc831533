"""Scoring: log-likelihoods of (context, continuation) pairs and rolling-window perplexity.

Sequences are truncated and windowed exactly as lm-evaluation-harness does for causal models, so the
figures compare with its `hf` backend: a pair is scored on (context + continuation)[-(L+1):], and a long
document is cut into windows of at most L predicted tokens, the first one conditioned on the EOD token.
Batches are left-padded to bucketed widths so a few shapes compile once.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neox_jax.generation import round_up
from neox_jax.model import GPTNeoX, check_ids
from neox_jax.objectives import token_logprobs


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that together predict every token once, each at most `max_len` long:
    lm-evaluation-harness's `get_rolling_token_windows(context_len=1)` followed by `make_disjoint_window`."""
    tokens = list(tokens)
    out, predicted = [], 0
    first = min(max_len, len(tokens))
    if first:
        out.append(([prefix_token] + tokens[:first - 1], tokens[:first]))
        predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        out.append((tokens[max(end - max_len - 1, 0):end - 1], tokens[end - n:end]))
        predicted += n
    return [(ctx[:len(ctx) - (len(cont) - 1)], cont) for ctx, cont in out]


def check_window(max_length: int | None, batch_size: int):
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length={max_length} (--max-length): the window must hold at least one token")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} (--batch-size): must be at least 1")


class Scorer:
    """Batched, compiled log-likelihoods for one model."""

    def __init__(self, model: GPTNeoX, max_length: int | None = None, batch_size: int = 16, bucket: int = 64):
        self.graphdef, self.params = nnx.split(model)
        check_window(max_length, batch_size)
        self.max_length = max_length or model.config.max_position_embeddings
        if self.max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length={self.max_length} exceeds the model's max_position_embeddings="
                             f"{model.config.max_position_embeddings}")
        self.batch_size, self.bucket, self.vocab_size = batch_size, bucket, model.config.vocab_size
        self._score = jax.jit(self._score_fn)

    def _score_fn(self, params, inputs_bt, mask_bt, targets_bt, scored_bt):
        model = nnx.merge(self.graphdef, params)  # the log-probabilities training uses (never the whole logits)
        token_logp, greedy = token_logprobs(model, model(inputs_bt, attention_mask=mask_bt, hidden_only=True),
                                            targets_bt)
        return jnp.sum(jnp.where(scored_bt, token_logp, 0.0), axis=-1), jnp.all(greedy | ~scored_bt, axis=-1)

    def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding would produce it) per pair."""
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"pair {i} has an empty continuation")
            if not ctx:
                raise ValueError(f"pair {i} has an empty context: start it with the EOD token")
            check_ids(np.asarray([*ctx, *cont])[None], self.vocab_size, what=f"pair {i}'s ids")
        seqs = [(list(ctx) + list(cont))[-(self.max_length + 1):] for ctx, cont in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = round_up(max(len(seqs[i]) - 1 for i in rows), self.bucket)
            b = round_up(len(rows), self.batch_size) if len(order) > self.batch_size else len(rows)
            inputs, mask, targets, scored = (np.zeros((b, width), np.int32) for _ in range(4))
            for r, i in enumerate(rows):
                seq, n_cont = seqs[i], len(pairs[i][1])
                n = len(seq) - 1
                inputs[r, width - n:], targets[r, width - n:], mask[r, width - n:] = seq[:-1], seq[1:], 1
                scored[r, width - min(n_cont, n):] = 1
            logp, greedy = self._score(self.params, inputs, mask, targets, scored.astype(bool))
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for r, i in enumerate(rows):
                results[i] = (float(logp[r]), bool(greedy[r]))
        return results

    def rolling_loglikelihood(self, tokens: Sequence[int], prefix_token: int) -> float:
        """log p(tokens) over disjoint windows of at most max_length predicted tokens."""
        return sum(lp for lp, _ in self.loglikelihood(rolling_windows(tokens, prefix_token, self.max_length)))


def perplexity(scorer: Scorer, documents: Sequence[Sequence[int]], prefix_token: int,
               num_bytes: int | None = None) -> dict:
    """Token-level perplexity over documents (each scored on its own, rolling windows), and bits per byte
    when the text's byte count is given."""
    tokens = sum(len(d) for d in documents)
    if not tokens:
        raise ValueError(f"nothing to score: {len(documents)} documents and no tokens (an empty --data file?)")
    nll = -sum(scorer.rolling_loglikelihood(doc, prefix_token) for doc in documents)
    out = {"documents": len(documents), "tokens": tokens, "nll_per_token": nll / max(tokens, 1),
           "perplexity": math.exp(nll / max(tokens, 1))}
    if num_bytes:
        out["bits_per_byte"] = nll / num_bytes / math.log(2)
    return out
