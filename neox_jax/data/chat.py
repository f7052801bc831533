"""Chat data for SFT, DPO and reward models: GPT-NeoX's `preprocess_data_with_chat_template.py`, its bytes.

A record's key holds a chat (a list of `{"role", "content"}` messages). It is rendered with a Jinja chat template
as transformers' `apply_chat_template` renders it (a sandboxed environment, `trim_blocks` and `lstrip_blocks`, the
tokenizer's special tokens as variables) and tokenised turn by turn: turn i's tokens are the rendering of the first
i + 1 messages (with the generation prompt when the next message is the model's) less what came before. Labels are
the tokens where the model speaks and -100 elsewhere (`only_last`: its last turn only); the end-of-text token closes
the chat. `for_rm`: the whole chat is masked but for a final end-of-text token, the position a reward model scores.
The template is the tokenizer folder's own (`tokenizer_config.json`'s `chat_template`) or a file given for it
(Pythia's tokenizer has none).

Prompt/completion records (`completion_keys`: a prompt's and a completion's text, TRL's SFT and KTO form) need no
template: the prompt's tokens (labels -100), then the completion's, each text tokenised on its own so the boundary
is exact, then the end-of-text token, trained on with the completion.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from neox_jax.data.tokenizer import EOD_TOKEN, NeoXTokenizer

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def load_template(tokenizer: str | os.PathLike, template: str | os.PathLike | None = None) -> tuple[str, dict]:
    """(the chat template's text, the special tokens it may name) for a tokenizer.json or its folder."""
    folder = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in config.items() if k in SPECIAL_TOKENS}
    if template is not None:
        return Path(template).read_text(), special
    if not config.get("chat_template"):
        raise ValueError(f"{folder} has no chat template (tokenizer_config.json's chat_template): give one with "
                         "--chat-template FILE (Pythia's tokenizer has none)")
    return config["chat_template"], special


class ChatEncoder:
    def __init__(self, tokenizer: NeoXTokenizer, template: str, special: dict, generation_role: str = "assistant"):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"the chat template refused a chat: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template, self.special, self.tok = env.from_string(template), special, tokenizer
        self.generation_role = generation_role
        self.eos = tokenizer.tokenizer.token_to_id(special.get("eos_token", EOD_TOKEN))

    def render(self, chat: list[dict], add_generation_prompt: bool = False) -> list[int]:
        text = self.template.render(messages=chat, add_generation_prompt=add_generation_prompt, **self.special)
        return self.tok.encode(text)

    def encode(self, chat: list[dict], only_last: bool = False, for_rm: bool = False) -> tuple[list[int], list[int]]:
        """(tokens, labels) of one chat, as GPT-NeoX's `build_chat` makes them."""
        if for_rm:
            tokens = self.render(chat)
            return tokens + [self.eos, self.eos], [-100] * len(tokens) + [-100, self.eos]
        tokens: list[int] = []
        labels: list[int] = []
        for i, turn in enumerate(chat):
            next_is_model = i + 1 < len(chat) and chat[i + 1]["role"] == self.generation_role
            new = self.render(chat[:i + 1], add_generation_prompt=next_is_model)[len(tokens):]
            tokens += new
            trained = turn["role"] == self.generation_role and not (only_last and i != len(chat) - 1)
            labels += new if trained else [-100] * len(new)
        labels.append(self.eos if labels[-1] != -100 else -100)
        return tokens + [self.eos], labels


def preprocess_chat(inputs, tokenizer: str | os.PathLike, output_prefix: str, keys=("messages",),
                    template: str | os.PathLike | None = None, only_last: bool = False, for_rm: bool = False,
                    reward_key: str | None = None, binary_reward: bool = False,
                    completion_keys: tuple[str, str] | None = None) -> dict:
    """Write `{prefix}_{key}_document` and `{prefix}_{key}_label_document` (.bin/.idx, int32, GPT-NeoX's bytes) for
    each key of the JSONL records, and with `reward_key` `{prefix}_{key}_reward_document`: the record's reward, one
    int32 per chat (`binary_reward`: 1 where it is true, -1 where not), KTO's data; a bad record stops it naming file
    and line, and nothing is written. With `completion_keys` (prompt, completion) each record is a prompt and its
    completion instead, written under the completion's key. -> the documents and trained tokens per key."""
    import numpy as np

    from neox_jax.data.indexed import IndexedDatasetWriter
    from neox_jax.data.preprocess import read_records
    from neox_jax.errors import BadRecordError

    if completion_keys:
        tok = NeoXTokenizer(tokenizer)
        keys, eos = completion_keys[1:], tok.tokenizer.token_to_id(EOD_TOKEN)
    else:
        text, special = load_template(tokenizer, template)
        encoder = ChatEncoder(NeoXTokenizer(tokenizer), text, special)
    chats = {key: [] for key in keys}
    for path in inputs:
        for line, raw in read_records(path):
            try:
                record = json.loads(raw)
                reward = None if reward_key is None else _reward(record, reward_key, binary_reward)
                if completion_keys:
                    prompt, completion = (tok.encode(_text(record, key)) for key in completion_keys)
                    chats[keys[0]].append((prompt + completion + [eos], [-100] * len(prompt) + completion + [eos],
                                           reward))
                    continue
                for key in keys:
                    chats[key].append((*encoder.encode(_chat(record, key), only_last, for_rm), reward))
            except (ValueError, KeyError, TypeError) as e:
                raise BadRecordError(f"{path}:{line}: {e}") from None
    counts = {}
    for key, encoded in chats.items():
        names = ["", "_label"] + (["_reward"] if reward_key is not None else [])
        writers = [IndexedDatasetWriter(f"{output_prefix}_{key}{name}_document", np.int32) for name in names]
        with contextlib.ExitStack() as stack:
            for w in writers:
                stack.enter_context(w)
            for chat in encoded:
                for w, values in zip(writers, chat):
                    w.add_document(np.asarray(values, np.int32).reshape(-1))
        counts[key] = {"documents": len(encoded),
                       "trained_tokens": sum(sum(x >= 0 for x in lab) for _, lab, _ in encoded)}
    return counts


def _reward(record, key: str, binary: bool) -> int:
    """The record's reward as GPT-NeoX stores it (int32); a fraction, which int32 would truncate, is refused."""
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"no key {key!r} (--reward-key names the key holding the reward)")
    value = record[key]
    if binary:
        return 1 if value else -1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"reward {value!r} under {key!r} is not a whole number: GPT-NeoX stores rewards as int32 "
                         "(a fraction would be cut to its integer part); use whole numbers, or --binary-reward for "
                         "true/false")
    return int(value)


def _text(record, key: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        raise ValueError(f"no text under {key!r} (--jsonl-keys names the prompt's key, then the completion's)")
    return record[key]


def _chat(record, key: str) -> list[dict]:
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"no key {key!r} (--jsonl-keys names the keys holding chats)")
    chat = record[key]
    if not isinstance(chat, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in chat):
        raise ValueError(f"key {key!r} is not a chat: expected a list of {{'role': ..., 'content': ...}} messages")
    return chat
