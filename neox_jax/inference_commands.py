"""The commands that run a model: `neox-jax generate`, `serve` and `eval` (cli.py builds the parser and adds them;
the launch flags and model lookup they share with training are cli.py's)."""

from __future__ import annotations

import time

from neox_jax.cli import _add_launch_flags, _join, _model_config


def _inference_model(args):
    """The model of `--model`, laid out on `--mesh` (or, launched as several processes, on all their devices
    split over `data`), each process reading only its own shards."""
    from neox_jax.pretrained import from_pretrained
    from neox_jax.sharding import make_mesh, parse_mesh

    mesh_shape = parse_mesh(args.mesh) if args.mesh else None
    if mesh_shape and mesh_shape["tensor"] > 1:  # before loading: the weights could not be laid out
        config = _model_config(args.model)
        bad = [f"{what}={size}" for what, size in (("num_heads", config.num_heads), ("intermediate_size",
               config.intermediate_size), ("vocab_size", config.vocab_size)) if size % mesh_shape["tensor"]]
        if bad:
            raise ValueError(f"--mesh tensor={mesh_shape['tensor']} does not divide the model's {', '.join(bad)}: "
                             "choose a tensor size that divides them")
    launch = _join(args, mesh_shape)
    if mesh_shape is None and not launch:
        return from_pretrained(args.model, dtype=args.dtype)
    return from_pretrained(args.model, dtype=args.dtype, mesh=make_mesh(mesh_shape or {"data": -1}))


def cmd_generate(args):
    import jax

    from neox_jax.distributed import is_primary
    from neox_jax.generation import Generator, Sampling
    from neox_jax.pretrained import check_vocab, load_tokenizer

    tok = load_tokenizer(args.model, args.tokenizer)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # bad values fail before loading
    model = _inference_model(args)
    check_vocab(tok, model.config, "--tokenizer")
    generator = Generator(model)
    stop = [tok.eod_id] + [int(t) for t in args.stop_ids]

    def run(prompt: str):
        ids = tok.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give some text")
        if jax.process_count() > 1:  # every process runs the same generation; process 0 prints it
            new = generator([ids], args.max_new_tokens, sampling, stop)[0]
            if is_primary():
                print(prompt + tok.decode([t for t in new if t not in stop]), flush=True)
            return
        tokens = generator.stream([ids], args.max_new_tokens, sampling, stop)  # checks come before the prompt shows
        print(prompt, end="", flush=True)
        produced: list[int] = []
        for token in tokens:
            if int(token[0]) in stop:
                break
            produced.append(int(token[0]))
            text = tok.decode(produced)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(text[len(tok.decode(produced[:-1])):] if len(produced) > 1 else text, end="", flush=True)
        print()

    if args.interactive:
        if args.mesh or args.coordinator:
            raise SystemExit("error: --interactive runs in one process on one device: drop --mesh / the launch")
        print("interactive: type a prompt, empty line or Ctrl-D to quit")
        while True:
            try:
                prompt = input("> ")
            except EOFError:
                break
            if not prompt:
                break
            run(prompt)
    else:
        if args.prompt is None:
            raise SystemExit("error: give --prompt TEXT or --interactive")
        run(args.prompt)
    return 0


def cmd_serve(args):
    import logging
    import os

    import jax

    from neox_jax import access
    from neox_jax.pretrained import check_vocab, load_tokenizer

    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"error: `neox-jax serve` needs the serve extra ({e.name} is missing): "
                         "pip install 'neox-jax[serve]'")
    from neox_jax.batching import Engine
    from neox_jax.serve import Service, Settings, run

    log = logging.getLogger("neox_jax.serve")
    if not log.handlers:  # JAX's absl logging may already hold the root logger
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    problems = [f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least 1" for name in
                ("max_body_bytes", "max_prompt_tokens", "max_tokens_cap") if (getattr(args, name) or 1) < 1]
    if args.grace < 0:
        problems.append(f"--grace={args.grace}: must be >= 0")
    if args.mesh:
        from neox_jax.sharding import parse_mesh

        other = {axis: size for axis, size in parse_mesh(args.mesh).items() if axis != "tensor" and size != 1}
        if other:
            problems.append(f"--mesh {args.mesh}: the server splits a model over `tensor` only, on one host (give "
                            f"tensor=N; {', '.join(f'{a}={s}' for a, s in other.items())} is not supported)")
    if problems:  # all before the model loads
        raise ValueError("; ".join(problems))
    keys = access.load_keys(args.api_keys)
    limits = access.parse_limits(args.rate_limit)
    tok = load_tokenizer(args.model, args.tokenizer)
    chat = _chat_encoder(tok, args.chat_template)
    model = _inference_model(args)
    if jax.process_count() > 1:  # SLURM's or Open MPI's variables made it join a multi-process launch
        raise ValueError(f"`neox-jax serve` runs in one process on one host; it was started as one of "
                         f"{jax.process_count()}: start it outside the launcher")
    check_vocab(tok, model.config, "--tokenizer")
    engine = Engine(model, slots=args.max_batch, max_context=args.max_context, chunk=args.prefill_chunk,
                    max_queue=args.max_queue, prefill_budget=args.prefill_budget)
    cfg = model.config
    kv_bytes = 2 * cfg.num_layers * args.max_batch * engine.max_context * cfg.hidden_size * \
        jax.numpy.dtype(cfg.dtype).itemsize
    log.info("warming up: %d slots x %d positions (KV cache at most %.1f MB), cache lengths %s, prefill chunks %s",
             engine.slots, engine.max_context, kv_bytes / 1e6, engine.lengths, engine.chunk)
    started = time.monotonic()
    programs = engine.warmup()
    log.info("compiled %d programs in %.1f s", programs, time.monotonic() - started)
    engine.start()
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without API keys: anyone who can reach it can use it (--api-keys FILE)", args.host)
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    settings = Settings(name=name, keys=keys, limits=limits, max_body_bytes=args.max_body_bytes,
                        max_prompt_tokens=args.max_prompt_tokens, max_tokens_cap=args.max_tokens_cap,
                        log_prompts=args.log_prompts)
    service = Service(engine, tok, settings, chat)
    try:
        return run(service, args.host, args.port, args.grace,
                   ready=lambda: log.info("serving %s on http://%s:%d (%d API keys)", name, args.host, args.port,
                                          len(keys)))
    finally:
        engine.close(0)


def _chat_encoder(tok, template):
    """The tokenizer's chat template (or `--chat-template FILE`) as a ChatEncoder; None when there is none."""
    from neox_jax.data.chat import ChatEncoder, load_template

    try:
        text, special = load_template(tok.path, template)
    except ValueError:
        if template is not None:
            raise
        return None
    return ChatEncoder(tok, text, special)


def cmd_eval(args):
    import json

    from neox_jax.data.preprocess import record_texts
    from neox_jax.distributed import is_primary
    from neox_jax.evaluate import Scorer, check_window, perplexity
    from neox_jax.pretrained import check_vocab, load_tokenizer

    check_window(args.max_length, args.batch_size)  # everything about the input before the model loads
    tok = load_tokenizer(args.model, args.tokenizer)
    texts = list(record_texts([args.data]))
    documents = tok.encode_batch(texts)
    if not sum(map(len, documents)):
        raise ValueError(f"--data {args.data}: no text to score (the file is empty, or its records have no `text`)")
    model = _inference_model(args)
    check_vocab(tok, model.config, "--tokenizer")
    scorer = Scorer(model, max_length=args.max_length, batch_size=args.batch_size)
    result = perplexity(scorer, documents, tok.eod_id, sum(len(t.encode()) for t in texts))
    if is_primary():
        print(json.dumps(result, indent=2))
    return 0


def add_commands(sub):
    p = sub.add_parser("generate", help="generate text from a Hugging Face folder or neox_jax checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the model folder)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", nargs="*", default=[], help="extra token ids that end generation (EOD always does)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--interactive", action="store_true")
    p.add_argument("--mesh", help="lay the weights out on a mesh, e.g. data=2,tensor=2 (default: one device, or "
                                  "every process's devices on data when launched as several)")
    _add_launch_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (completions, chat, streaming) with continuous "
                                     "batching (docs/serving.md)")
    p.add_argument("--model", required=True, help="HF folder, neox_jax or GPT-NeoX checkpoint, or a training run")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the model folder)")
    p.add_argument("--model-name", help="the model's name in the API (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mesh", help="lay the weights out over devices, e.g. tensor=2 (a model larger than one device)")
    p.add_argument("--max-batch", type=int, default=16, help="KV-cache slots: sequences decoded together")
    p.add_argument("--max-context", type=int, help="positions per slot (default: the model's context)")
    p.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens prefilled per program call")
    p.add_argument("--prefill-budget", type=int, help="prompt tokens prefilled between two decode steps at most "
                                                      "(default 4 chunks)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503")
    p.add_argument("--api-keys", help="file of API keys, one per line (# comments); or NEOX_JAX_API_KEYS=k1,k2")
    p.add_argument("--rate-limit", help="per key, e.g. requests=60/m,tokens=40000/m (units s, m, h)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-prompt-tokens", type=int, help="default: the context")
    p.add_argument("--max-tokens-cap", type=int, help="the largest max_tokens accepted (default: the context)")
    p.add_argument("--chat-template", help="a Jinja chat template file (default: the tokenizer folder's, if any)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--log-prompts", action="store_true", help="log prompts and outputs (off: counts only)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="evaluation: `eval perplexity` over a text / jsonl file")
    p.add_argument("what", choices=["perplexity"])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help=".txt (one document) or .jsonl[.zst] with a text field")
    p.add_argument("--tokenizer")
    p.add_argument("--max-length", type=int, help="window length (default: the model's max positions)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mesh", help="lay the weights out on a mesh, e.g. data=2,tensor=2")
    _add_launch_flags(p)
    p.set_defaults(func=cmd_eval)
