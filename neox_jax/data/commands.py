"""`neox-jax preprocess | train-tokenizer | corpus`: the commands that prepare data (cli.py adds them)."""

from __future__ import annotations

import sys


def add_commands(sub):
    """The data commands' sub-parsers, on `neox-jax`'s."""
    p = sub.add_parser("preprocess", help="tokenize jsonl / jsonl.zst / txt into GPT-NeoX .bin/.idx")
    p.add_argument("--input", nargs="+", required=True, help="input files (.jsonl, .jsonl.zst, .txt)")
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json (e.g. GPT-NeoX's 20B_tokenizer.json)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true", help="end each document with <|endoftext|>")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of reporting it")
    p.add_argument("--chat", action="store_true",
                   help="the keys hold chats: also write PREFIX_{key}_label_document (-100 where the model does not "
                        "speak), as GPT-NeoX's preprocess_data_with_chat_template.py (docs/data.md)")
    p.add_argument("--chat-template", help="a Jinja chat template file (default: the tokenizer folder's own)")
    p.add_argument("--only-last", action="store_true", help="--chat: train on the model's last turn only (DPO pairs)")
    p.add_argument("--for-rm", action="store_true", help="--chat: label only the closing token (reward models)")
    p.add_argument("--reward-key", help="--chat: also write PREFIX_{key}_reward_document, each record's reward under "
                                        "this key, one integer per chat (KTO's reward_data_paths)")
    p.add_argument("--binary-reward", action="store_true", help="--reward-key: 1 where the reward is true, else -1")
    p.add_argument("--prompt-completion", action="store_true",
                   help="records hold a prompt and its completion (--jsonl-keys PROMPT COMPLETION): write "
                        "PREFIX_{COMPLETION}_document and _label_document, the prompt labelled -100")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train-tokenizer", help="train a NeoX-style byte-level BPE tokenizer on local text")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--vocab-size", type=int, default=50277)
    p.add_argument("--output", required=True, help="the tokenizer.json to write")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"])
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("corpus", help="build the embedded default corpus from Python's standard library")
    p.add_argument("--out", default="data/stdlib")
    p.add_argument("--max-mb", type=float, default=4.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_corpus)


def cmd_preprocess(args):
    from neox_jax.data.preprocess import preprocess
    from neox_jax.errors import BadRecordError

    chat_flags = [f for f, on in (("--chat-template", args.chat_template), ("--only-last", args.only_last),
                                  ("--for-rm", args.for_rm), ("--reward-key", args.reward_key),
                                  ("--binary-reward", args.binary_reward)) if on]
    if args.prompt_completion:
        if len(args.jsonl_keys) != 2:
            raise SystemExit(f"error: --prompt-completion reads two keys, the prompt's and the completion's: "
                             f"--jsonl-keys PROMPT COMPLETION (given: {' '.join(args.jsonl_keys)})")
        refused = [f for f in chat_flags if f not in ("--reward-key", "--binary-reward")] + (
            ["--chat"] if args.chat else [])
        if refused:
            raise SystemExit(f"error: {', '.join(refused)} shape chats; --prompt-completion records have none")
        args.chat = True  # the same writer: token and label files (and rewards)
    if chat_flags and not args.chat:
        raise SystemExit(f"error: {', '.join(chat_flags)} shape chat data: add --chat (or --prompt-completion)")
    if args.binary_reward and not args.reward_key:
        raise SystemExit("error: --binary-reward reads the reward under --reward-key: add --reward-key KEY")
    if args.chat:
        from neox_jax.data.chat import preprocess_chat

        refused = [f for f, on in (("--append-eod", args.append_eod), ("--strict", args.strict)) if on]
        if refused or args.workers != 1:
            raise SystemExit(f"error: {', '.join(refused + (['--workers'] if args.workers != 1 else []))} do not "
                             "apply to --chat (a chat ends with the end-of-text token; any bad record stops it)")
        try:
            counts = preprocess_chat(args.input, args.tokenizer, args.output_prefix, args.jsonl_keys,
                                     args.chat_template, args.only_last, args.for_rm, args.reward_key,
                                     args.binary_reward, tuple(args.jsonl_keys) if args.prompt_completion else None)
        except BadRecordError as e:
            print(f"error: {e}; nothing was written", file=sys.stderr)
            return 1
        for key, c in counts.items():
            rewards = f", {args.output_prefix}_{key}_reward_document" if args.reward_key else ""
            print(f"{args.output_prefix}_{key}_document, {args.output_prefix}_{key}_label_document{rewards}: "
                  f"{c['documents']} {'records' if args.prompt_completion else 'chats'}, {c['trained_tokens']} "
                  "tokens trained on")
        return 0
    try:
        summary = preprocess(args.input, args.tokenizer, args.output_prefix, jsonl_keys=args.jsonl_keys,
                             append_eod=args.append_eod, workers=args.workers, strict=args.strict)
    except BadRecordError as e:
        print(f"error: {e}; nothing was written", file=sys.stderr)
        return 1
    print(summary)
    return 0


def cmd_train_tokenizer(args):
    from neox_jax.data.preprocess import record_texts
    from neox_jax.data.tokenizer import train_tokenizer

    out = train_tokenizer(record_texts(args.input, args.jsonl_keys), args.vocab_size, args.output)
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(out)).get_vocab_size()  # BPE stops early when the text has no more pairs
    print(f"wrote {out} ({size} tokens)" + ("" if size == args.vocab_size else
          f"; warning: --vocab-size {args.vocab_size} asked for more than this text yields: train on more text, "
          "or ask for fewer (a model's vocab_size must cover the tokenizer's)"))


def cmd_corpus(args):
    from neox_jax.data.corpus import build_corpus

    prefix = build_corpus(args.out, args.max_mb, args.vocab_size, args.workers)
    print(f"data prefix: {prefix}")
