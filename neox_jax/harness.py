"""lm-evaluation-harness backend `neox-jax`: loglikelihood, loglikelihood_rolling and generate_until.

lm-eval has no plugin discovery, so the model is registered when this module is imported; the CLI
`neox-jax lm-eval ...` imports it and hands its arguments to lm-eval's own command line:

    neox-jax lm-eval --model neox-jax --model_args path=PATH[,tokenizer=T,dtype=bfloat16] --tasks lambada_openai

Subclassing lm-eval's TemplateLM keeps its request handling (context/continuation splitting, EOD prefix
for empty contexts) identical to its `hf` backend; only the token scoring is ours.
"""

from __future__ import annotations

import difflib

import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily only while it is empty: fill it first)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from neox_jax.evaluate import Scorer, rolling_windows
from neox_jax.generation import Generator, Sampling
from neox_jax.pretrained import from_pretrained, load_tokenizer

MODEL_ARGS = ("path", "tokenizer", "dtype", "batch_size", "max_length", "max_gen_toks")
# What lm-eval's own command line adds to every model's arguments; JAX places the model itself.
LM_EVAL_ARGS = ("device", "max_batch_size")


@register_model("neox-jax")
class NeoXJaxLM(TemplateLM):
    def __init__(self, path: str | None = None, tokenizer: str | None = None, dtype: str | None = None,
                 batch_size: int = 16, max_length: int | None = None, max_gen_toks: int = 256, **extra):
        super().__init__()
        problems = []  # all at once, before anything is loaded
        for key in extra:
            if key not in LM_EVAL_ARGS:
                near = difflib.get_close_matches(key, MODEL_ARGS, n=1)
                problems.append(f"unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        if path is None:
            problems.append("path=MODEL is missing")
        if problems:
            raise ValueError(f"model_args: {'; '.join(problems)}; the neox-jax model takes {', '.join(MODEL_ARGS)}, "
                             "e.g. --model_args path=models/pythia-70m,dtype=bfloat16")
        self.model = from_pretrained(path, dtype=dtype)
        self.tok = load_tokenizer(path, tokenizer)
        self.batch_size = int(batch_size)
        self.scorer = Scorer(self.model, max_length=int(max_length) if max_length else None,
                             batch_size=self.batch_size)
        self.generator = Generator(self.model)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def _loglikelihood_tokens(self, requests, **kwargs):
        return self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            windows = rolling_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length)
            out.append(sum(lp for lp, _ in self.scorer.loglikelihood(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Requests with the same settings run in batches; each row stops at its first `until` string (or the
        end-of-text token), and the batch stops once every row has."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            _, kwargs = req.args
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            groups.setdefault((until, n, temperature), []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, n, temperature), rows in groups.items():
            for lo in range(0, len(rows), self.batch_size):
                batch = rows[lo:lo + self.batch_size]
                contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - n):] or [self.eot_token_id]
                            for i in batch]
                for i, text in zip(batch, self._generate(contexts, n, until, Sampling(temperature))):
                    out[i] = text
        return out

    def _generate(self, contexts, n: int, until: tuple[str, ...], sampling: Sampling) -> list[str]:
        produced: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)

        def cut(tokens):
            text = self.tok.decode(tokens)
            hits = [text.index(stop) for stop in until if stop in text]
            return (text[:min(hits)], True) if hits else (text, False)

        for tokens in self.generator.stream(contexts, n, sampling, stop_ids=[self.eot_token_id]):
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if token == self.eot_token_id:
                    done[row] = True
                else:
                    produced[row].append(token)
                    done[row] = bool(until) and cut(produced[row])[1]
            if all(done):
                break
        return [cut(tokens)[0] for tokens in produced]


def main(argv=None):
    """lm-eval's command line with the `neox-jax` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    return cli_evaluate()
