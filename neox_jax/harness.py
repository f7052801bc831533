"""lm-evaluation-harness backend `neox-jax`: loglikelihood, loglikelihood_rolling and generate_until.

lm-eval has no plugin discovery, so the model is registered when this module is imported; the CLI
`neox-jax lm-eval ...` imports it and hands its arguments to lm-eval's own command line:

    neox-jax lm-eval --model neox-jax --model_args path=PATH[,tokenizer=T,dtype=bfloat16] --tasks lambada_openai

Subclassing lm-eval's TemplateLM keeps its request handling (context/continuation splitting, EOD prefix
for empty contexts) identical to its `hf` backend; only the token scoring is ours.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily only while it is empty: fill it first)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from neox_jax.data.tokenizer import NeoXTokenizer
from neox_jax.evaluate import Scorer, rolling_windows
from neox_jax.generation import Generator, Sampling
from neox_jax.pretrained import from_pretrained


@register_model("neox-jax")
class NeoXJaxLM(TemplateLM):
    def __init__(self, path: str, tokenizer: str | None = None, dtype: str | None = None, batch_size: int = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, **_ignored):
        super().__init__()
        self.model = from_pretrained(path, dtype=dtype)
        tok_path = Path(tokenizer) if tokenizer else Path(path) / "tokenizer.json"
        self.tok = NeoXTokenizer(tok_path)
        self.scorer = Scorer(self.model, max_length=int(max_length) if max_length else None,
                             batch_size=int(batch_size))
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
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ctx = self.tok_encode(context)[-(self.max_length - n):] or [self.eot_token_id]
            sampling = Sampling(temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0)
            tokens = self.generator([ctx], n, sampling, stop_ids=[self.eot_token_id])[0]
            text = self.tok.decode([t for t in tokens if t != self.eot_token_id])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main(argv=None):
    """lm-eval's command line with the `neox-jax` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    return cli_evaluate()
