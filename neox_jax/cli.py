"""`neox-jax`: train | demo | launch | plan | convert | info, and the parser of every command (generate, serve and
eval live in inference_commands.py, the data commands in data/commands.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _model_config(name_or_path: str):
    """NeoXConfig from a preset name, a Hugging Face folder/config.json, a neox_jax checkpoint (params or a training
    run's), a GPT-NeoX checkpoint or NeoX YAML, without reading weights."""
    from neox_jax.config import PRESETS, NeoXConfig, is_preset
    from neox_jax.convert import neox_yaml

    p = Path(name_or_path)
    if is_preset(name_or_path):
        return NeoXConfig.preset(name_or_path)
    if p.suffix in (".yml", ".yaml") and p.is_file():
        return neox_yaml.model_config(p)
    if not p.exists():
        raise SystemExit(f"error: {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    from neox_jax.pretrained import model_config

    return model_config(p)


def _join(args, mesh: dict | None = None, init_timeout: int = 300, heartbeat_timeout: int = 100):
    """Join a multi-process launch when one is asked for (flags, NEOX_* variables, SLURM, Open MPI), and on a
    CPU-only machine give each process its share of a fully given mesh as emulated devices. Must run before
    anything touches a JAX backend."""
    import math

    from neox_jax import distributed

    launch = distributed.detect(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                getattr(args, "process_id", None))
    processes = launch.num_processes if launch else 1
    if mesh and all(v > 0 for v in mesh.values()):
        total = math.prod(mesh.values())
        if total % processes:
            raise SystemExit(f"error: mesh {dict(mesh)} has {total} devices, not divisible among {processes} "
                             "processes: change `mesh` or the number of processes")
        distributed.emulate_cpu_devices(total // processes)
    return distributed.initialize(launch, init_timeout, heartbeat_timeout)


def _add_launch_flags(p):
    g = p.add_argument_group("multi-process launch (or NEOX_COORDINATOR / NEOX_NUM_PROCESSES / NEOX_PROCESS_ID, "
                             "SLURM, Open MPI; see docs/multihost.md)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def cmd_info(args):
    import jax
    from flax import nnx

    from neox_jax.model import GPTNeoX

    cfg = _model_config(args.model)
    print(f"{args.model}")
    for field, value in cfg.to_dict().items():
        print(f"  {field:26s} {value}")
    print(f"  {'head_dim':26s} {cfg.head_dim}\n  {'rotary_ndims':26s} {cfg.rotary_ndims}")
    abstract = nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(0)))
    print("\nparameters (shape, logical axes):")
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = ".".join(str(k) for k in path)
        print(f"  {name:42s} {str(tuple(var.shape)):26s} {var.get_metadata().get('out_sharding')}")
    total = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    print(f"\ntotal parameters: {total:,} ({total / 1e6:.1f}M)")


def _convert_source(kind: str, args):
    """(tensor source under Hugging Face names, NeoXConfig) for `convert`'s SRC."""
    from neox_jax.convert import hf, neox
    from neox_jax.convert.hf_config import config_from_hf
    from neox_jax.convert.orbax import orbax_source

    if kind == "hf":
        src = Path(args.src)
        return hf.TensorSource(src, args.trust_pickle), config_from_hf(src if src.is_dir() else src.parent)
    if kind == "neox":
        source = neox.NeoXSource(args.src, args.config or (), trust_pickle=args.trust_pickle)
        return source, source.config
    source = orbax_source(args.src)
    return source, source.config


def _tokenizer_problems(path: str) -> list[str]:
    """Why `path` is not a tokenizer.json the tokenizers library reads (none: it is one)."""
    p = Path(path)
    if not p.is_file():
        return [f"--tokenizer {p}: no such file"]
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(p))
    except Exception as e:  # the library's own parse error
        return [f"--tokenizer {p} is not a tokenizer.json the tokenizers library reads ({str(e).splitlines()[0]})"]
    return []


def cmd_convert(args):
    import shutil

    from neox_jax import checkpoint
    from neox_jax.atomic import write_json
    from neox_jax.convert import hf, neox
    from neox_jax.convert.orbax import write_params
    from neox_jax.pretrained import tokenizer_path

    t0 = time.perf_counter()
    kind_in, kind_out = args.direction.split("-to-")
    misplaced = [flag for flag, value, wanted in (
        ("--config", args.config, kind_in == "neox"), ("--trust-pickle", args.trust_pickle, kind_in != "orbax"),
        ("--tensor-parallel", args.tensor_parallel, kind_out == "neox"),
        ("--pipe-parallel", args.pipe_parallel, kind_out == "neox"), ("--step", args.step, kind_out == "neox"),
        ("--legacy-names", args.legacy_names, kind_out == "neox")) if value and not wanted]
    problems = [f"{', '.join(misplaced)} does not apply to {args.direction}"] if misplaced else []
    problems += [f"{flag} {value}: must be at least {least}" for flag, value, least in (
        ("--tensor-parallel", args.tensor_parallel, 1), ("--pipe-parallel", args.pipe_parallel, 1),
        ("--step", args.step, 0)) if value is not None and value < least]
    dst = Path(args.dst)
    if dst.exists() and not dst.is_dir():
        problems.append(f"destination {dst} is a file: give a folder (new, or one without a model)")
    if args.tokenizer:
        problems += _tokenizer_problems(args.tokenizer)
    if problems:  # every one at once, before reading a single tensor
        raise ValueError("cannot convert:\n  " + "\n  ".join(problems))
    taken = [dst / n for n in ("params", checkpoint.CONFIG_FILE, "config.json", "model.safetensors",
                                "model.safetensors.index.json", "latest") if (dst / n).exists()]
    if taken:
        raise FileExistsError(f"{taken[0]} already exists: choose a new destination or remove it")
    tokenizer = args.tokenizer or tokenizer_path(args.src)
    source, config = _convert_source(kind_in, args)
    if kind_out == "orbax":
        out = write_params(source, config, dst, dtype=args.dtype or "float32", show_progress=True)
    elif kind_out == "hf":
        out = hf.write_hf(source, config, dst, dtype=args.dtype, show_progress=True)
        write_json(out / "generation_config.json", {"bos_token_id": config.bos_token_id,
                                                    "eos_token_id": config.eos_token_id})
    else:
        out = neox.write_neox(source, config, dst, tensor_parallel=args.tensor_parallel or 1,
                              pipe_parallel=args.pipe_parallel or 1, step=args.step or 0, dtype=args.dtype,
                              current_names=not args.legacy_names, show_progress=True)
    if tokenizer:  # the folder carries its tokenizer: generate, eval and from_pretrained find it there
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s" + (" (with tokenizer.json)" if tokenizer else ""))


def _train_config(name_or_path: str, overrides: dict):
    from neox_jax.config import TrainConfig, is_preset
    from neox_jax.convert.neox_yaml import read_train_config

    if is_preset(name_or_path):
        return TrainConfig.from_dict({"model": name_or_path, **overrides})
    return read_train_config(name_or_path, **overrides)


def cmd_plan(args):
    import math
    import os

    from neox_jax.sharding import parse_mesh

    if args.generate:
        return _plan_generate(args)
    if not args.config:
        raise SystemExit("error: give a training config to plan, or --generate MODEL")
    given = [f"--{k}" for k in ("batch", "context", "dtype") if getattr(args, k) is not None]
    if given:
        raise SystemExit(f"error: {', '.join(given)} plan a generation: add --generate MODEL, or drop them")

    overrides = {}
    if args.mesh:
        overrides["mesh"] = parse_mesh(args.mesh)
    if args.micro_batch:
        overrides["micro_batch_size"] = args.micro_batch
    if args.seq_length:
        overrides["seq_length"] = args.seq_length
    cfg = _train_config(args.config, overrides)
    if args.sequence_parallel:
        cfg = cfg.replace(model=cfg.model.replace(sequence_parallel=args.sequence_parallel == "on"))
    if any(v == -1 for v in cfg.mesh.values()):  # fill it from --devices, or the smallest mesh of this layout
        fixed = math.prod(v for v in cfg.mesh.values() if v > 0)
        devices = args.devices or fixed
        if devices % fixed:
            raise SystemExit(f"error: --devices {devices} is not a multiple of the mesh's fixed axes ({fixed})")
        cfg = cfg.replace(mesh={k: devices // fixed if v == -1 else v for k, v in cfg.mesh.items()})
    n = math.prod(cfg.mesh.values())
    os.environ["JAX_PLATFORMS"] = "cpu"  # compile-only GPUs, or the mesh emulated on CPU devices: no device is used
    if args.device:
        raise SystemExit(f"error: --device is now --target (one flag for the card): --target {args.device}")
    from neox_jax import gpus
    from neox_jax.predict import Cluster

    cluster = Cluster.get(args.cluster) if args.cluster else None
    target = args.target or (cluster.card if cluster else "a100-40gb")
    gpus.card(target)
    if cluster and target != cluster.card:
        raise SystemExit(f"error: --target {target} but --cluster {cluster.name} has {cluster.card}: give one of them")
    from neox_jax.plan import default_hosts, plan

    hosts = args.hosts or default_hosts(dict(cfg.mesh), cluster.devices_per_node if cluster else 8)
    compiler = "cpu" if gpus.missing() else "gpu"
    if compiler == "cpu":
        _join(args, cfg.mesh)
    elif any(getattr(args, k, None) is not None for k in ("coordinator", "num_processes", "process_id")):
        raise SystemExit("error: --coordinator/--num-processes/--process-id: with the gpu-plan extra one process "
                         f"compiles for all {hosts} hosts' devices; launch flags serve the CPU fallback only")
    from neox_jax.distributed import is_primary

    primary = compiler == "gpu" or is_primary()
    if primary:
        split = ", sequence parallel" if cfg.model.sequence_parallel and cfg.mesh["tensor"] > 1 else ""
        where = (f"{hosts} x {n // hosts} {target} with XLA's GPU compiler" if compiler == "gpu" else
                 f"{n} emulated CPU devices (XLA's GPU compiler needs the gpu-plan extra: {gpus.GPU_PLAN})")
        print(f"planning {args.config} on mesh {dict(cfg.mesh)}: {cfg.model.num_params / 1e9:.2f}B parameters, "
              f"seq {cfg.seq_length}, micro batch {cfg.micro_batch_size} x {cfg.grad_accum_steps} accumulation, "
              f"{cfg.precision}, ZeRO stage {cfg.zero_stage}, remat {cfg.model.remat_policy}{split}; compiling "
              f"for {where}...", flush=True)
    p = plan(cfg, target, hosts, compiler)
    if primary:
        print(p.report())
        if cluster:
            from neox_jax.plan import prediction

            print("\n" + prediction(p, cfg, cluster).report(cluster))


def _plan_generate(args):
    import os

    os.environ["JAX_PLATFORMS"] = "cpu"  # compile-only GPUs: no device is used
    from neox_jax import gpus
    from neox_jax.plan_generate import plan_generate
    from neox_jax.sharding import parse_mesh

    given = [flag for flag, value in (("a training config", args.config), ("--cluster", args.cluster),
                                      ("--micro-batch", args.micro_batch), ("--seq-length", args.seq_length),
                                      ("--devices", args.devices), ("--hosts", args.hosts)) if value]
    if given:
        raise SystemExit(f"error: --generate plans a model's inference on one host: {', '.join(given)} apply to "
                         "training plans; drop them (--context is its sequence length, --batch its rows)")
    if args.device:
        raise SystemExit(f"error: --device is now --target (one flag for the card): --target {args.device}")
    mesh = parse_mesh(args.mesh or "")
    if mesh["data"] != 1 or mesh["pipe"] != 1:
        raise SystemExit(f"error: --mesh {args.mesh}: --generate splits a model over tensor only (e.g. tensor=2)")
    lacking = gpus.missing()
    if lacking:
        raise SystemExit(f"error: --generate compiles with XLA's GPU compiler, which needs the gpu-plan extra "
                         f"({', '.join(lacking)} missing): {gpus.GPU_PLAN}")
    config = _model_config(args.generate)
    print(f"compiling {args.generate}'s prefill and decode step for {mesh['tensor']} x {args.target or 'a100-40gb'}"
          "...", flush=True)
    batch, context = (1 if args.batch is None else args.batch), (2048 if args.context is None else args.context)
    print(plan_generate(config, args.generate, args.target or "a100-40gb", mesh["tensor"], batch, context,
                        args.dtype or "bfloat16").report())


def cmd_train(args):
    from neox_jax.convert.neox_yaml import train_config_from_args

    cfg = train_config_from_args(args.config)
    _join(args, cfg.mesh, cfg.init_timeout, cfg.heartbeat_timeout)
    from neox_jax.distributed import is_primary
    from neox_jax.loop import train

    result = train(cfg)
    status = 130 if result.stopped_by == "SIGINT" else 0  # saved either way; SIGTERM is routine preemption
    if not is_primary():
        return status
    if result.losses:
        first, last = min(result.losses), max(result.losses)
        print(f"training loss {result.losses[first]:.2f} at step {first + 1} -> {result.losses[last]:.2f} at step "
              f"{last + 1}" + (f", validation loss {result.eval_losses[max(result.eval_losses)]:.2f}"
                               if result.eval_losses else ""))
    if result.checkpoint_dir:
        print(f"checkpoints: {result.checkpoint_dir}")
    if result.tensorboard_dir:
        from importlib.util import find_spec

        view = (f"tensorboard --logdir {result.tensorboard_dir}" if find_spec("tensorboard")
                else "pip install tensorboard, then tensorboard --logdir " + result.tensorboard_dir)
        print(f"TensorBoard logs: {result.tensorboard_dir}  (view with: {view})")
    return status


def cmd_lm_eval(args):
    from neox_jax.harness import main as harness_main

    return harness_main(args.lm_eval_args) or 0


def cmd_launch(args):
    from neox_jax import launch

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise SystemExit("error: give the command to launch after --, e.g. "
                         "neox-jax launch --local 2 -- neox-jax train configs/tiny-cpu.yml")
    if args.local is not None and args.local < 1:
        raise SystemExit(f"error: --local {args.local}: start at least 1 process")
    if args.local:
        if command[0] == "neox-jax":  # this interpreter's neox-jax, whatever PATH says
            command = [sys.executable, "-m", "neox_jax.cli", *command[1:]]
        procs = launch.start_local(args.local, command, args.port, args.log_dir)
    else:
        procs = launch.start_hostfile(args.hostfile, command, args.port, args.ssh, log_dir=args.log_dir)
    return launch.supervise(procs, command, args.grace)


def cmd_demo(args):
    import contextlib
    import io

    from neox_jax.data.corpus import build_corpus
    from neox_jax.distributed import detect

    corpus = Path(args.corpus)
    if not (corpus / "stdlib_text_document.idx").is_file():
        # every host builds its own copy (hosts need not share a disk); process 0 alone says so
        launch = detect()
        quiet = io.StringIO() if launch and launch.process_id else None
        with contextlib.redirect_stdout(quiet or sys.stdout), contextlib.redirect_stderr(quiet or sys.stderr):
            print(f"building the embedded corpus in {corpus} (once)")
            build_corpus(corpus)
    return cmd_train(argparse.Namespace(config=[args.config, *args.overrides]))


def _print_setting_warnings(args):
    """Unknown GPT-NeoX keys as one line each on stderr, from the launch's process 0 only."""
    import warnings

    from neox_jax import distributed
    from neox_jax.errors import UnknownSettingWarning

    show = warnings.showwarning

    def shown(message, category, *rest, **kwargs):
        if not issubclass(category, UnknownSettingWarning):
            return show(message, category, *rest, **kwargs)
        launch = distributed.detect(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                    getattr(args, "process_id", None))
        if not launch or launch.process_id == 0:
            print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = shown


def main(argv=None):
    """The `neox-jax` command; `argv=None` is this process's own command line, which then also takes SIGINT and
    SIGTERM (neox_jax/interrupts.py: exit status 130 / 143 at any moment, the training loop saving first)."""
    from neox_jax import interrupts

    if argv is None:
        argv = sys.argv[1:]
        interrupts.install(" ".join(["neox-jax"] + argv[:1]))
    argv = list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it belongs to lm-eval's own parser
        return _run(argparse.Namespace(func=cmd_lm_eval, lm_eval_args=argv[1:]))
    parser = argparse.ArgumentParser(prog="neox-jax", description="GPT-NeoX / Pythia in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print a model's config, parameter shapes and count")
    p.add_argument("model", help="preset name (pythia-70m, neox-20b, ...), HF folder, neox_jax checkpoint or NeoX .yml")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert weights between Hugging Face, Orbax and GPT-NeoX checkpoints",
                       description="Streams one tensor at a time: host memory stays near one tensor's size.")
    p.add_argument("direction", choices=[f"{a}-to-{b}" for a in ("hf", "orbax", "neox") for b in ("hf", "orbax", "neox")
                                         if a != b])
    p.add_argument("src", help="Hugging Face folder, neox_jax params checkpoint, or GPT-NeoX checkpoint (the folder "
                               "with `latest`, or a global_stepN folder)")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the written weights (default: float32 into Orbax, else as stored)")
    p.add_argument("--tokenizer", help="tokenizer.json to put beside the weights (default: the source's own)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle .bin/.pt files that weights-only loading refuses; only for a checkpoint you trust")
    g = p.add_argument_group("GPT-NeoX source (neox-to-*)")
    g.add_argument("--config", nargs="+", help="the run's GPT-NeoX YAML files (default: the checkpoint's configs/)")
    g = p.add_argument_group("GPT-NeoX destination (*-to-neox)")
    g.add_argument("--tensor-parallel", type=int, help="tensor-parallel ranks to split into (default 1)")
    g.add_argument("--pipe-parallel", type=int, help="pipe_parallel_size of the written config (default 1)")
    g.add_argument("--step", type=int, help="the global_stepN tag (default 0)")
    g.add_argument("--legacy-names", action="store_true",
                   help="MLP keys dense_h_to_4h/dense_4h_to_h, as GPT-NeoX before Sept. 2024 (default linear1/linear2)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("plan", help="compile the train step (or, with --generate, a model's inference) for GPUs "
                                    "and report memory, traffic and kernels")
    p.add_argument("config", nargs="?", help="training YAML (ours or GPT-NeoX's) or a preset name")
    p.add_argument("--generate", metavar="MODEL", help="plan inference instead: prefill and the decode step of MODEL "
                                                       "(a preset name or any checkpoint from_pretrained reads)")
    p.add_argument("--batch", type=int, help="--generate: sequences decoded together (default 1)")
    p.add_argument("--context", type=int, help="--generate: positions in the KV cache (default 2048)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="--generate: weights and cache (default bfloat16)")
    p.add_argument("--mesh", help="e.g. data=12,pipe=4,tensor=2 (default: the config's)")
    p.add_argument("--micro-batch", type=int, help="sequences per data-parallel replica per microstep")
    p.add_argument("--seq-length", type=int)
    p.add_argument("--sequence-parallel", choices=["on", "off"],
                   help="Megatron sequence parallelism over `tensor` (default: the config's sequence_parallel)")
    p.add_argument("--target", help="the card to compile for (default: the --cluster's, else a100-40gb): "
                                    "a100-40gb, a100-80gb, h100-80gb, h200-141gb, a6000-48gb, rtx3090ti-24gb")
    p.add_argument("--hosts", type=int, help="hosts the devices are spread over (default: the --cluster's node "
                                             "size, else 8 devices per host)")
    p.add_argument("--device", help=argparse.SUPPRESS)  # renamed --target: refused with that word
    p.add_argument("--devices", type=int, help="device count that fills a -1 mesh axis (default: the smallest "
                                                "mesh of the layout, data=1)")
    p.add_argument("--cluster", help="predict step time and TFLOP/s on a cluster: a100-40gb-paper, a100-80gb-selene, "
                                     "h100-80gb-ib, or a YAML file (docs/sharding.md)")
    _add_launch_flags(p)
    p.set_defaults(func=cmd_plan)

    from neox_jax.data.commands import add_commands

    add_commands(sub)  # preprocess, train-tokenizer, corpus: preparing data

    p = sub.add_parser("train", help="train from a YAML config (ours or GPT-NeoX's); resumes automatically")
    p.add_argument("config", nargs="+", metavar="CONFIG [CONFIG ...] [key=value ...]",
                   help="training YAML (see configs/README.md) or GPT-NeoX .yml files, merged the GPT-NeoX way, then "
                        "key=value settings, e.g. train_iters=100 model.num_layers=4")
    _add_launch_flags(p)
    p.set_defaults(func=cmd_train)

    from neox_jax.inference_commands import add_commands as add_inference_commands

    add_inference_commands(sub)  # generate, serve, eval: running a model

    p = sub.add_parser("launch", help="start the processes of a multi-process run and watch them",
                       description="neox-jax launch --local N -- neox-jax train CONFIG ... | "
                                   "--hostfile FILE -- neox-jax train CONFIG ...")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", type=int, metavar="N", help="N processes on this machine (loopback)")
    where.add_argument("--hostfile", help="DeepSpeed/GPT-NeoX hostfile (`host slots=8`): one process per host")
    p.add_argument("--port", type=int, help="coordinator port (default: a free one locally, 29500 with a hostfile)")
    p.add_argument("--ssh", default="ssh", help="the ssh program for --hostfile")
    p.add_argument("--log-dir", help="write process I's output to LOG_DIR/process-I.log instead of this terminal")
    p.add_argument("--grace", type=float, default=60.0,
                   help="seconds the others get after one process fails while a checkpoint is being written "
                        "(default 60; with none being written they are stopped at once)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    p.set_defaults(func=cmd_launch)

    sub.add_parser("lm-eval", help="lm-evaluation-harness with the `neox-jax` model registered (lm-eval's arguments)")

    p = sub.add_parser("demo", help="the embedded default job: build the local corpus and train configs/tiny-cpu.yml")
    p.add_argument("--config", default="configs/tiny-cpu.yml")
    p.add_argument("--corpus", default="data/stdlib")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_demo)

    return _run(parser.parse_args(argv))


def _run(args) -> int:
    """A command's exit status: 0 done, 1 a run that failed (diverged), 2 a refused input, 128 + N stopped by
    signal N (130 SIGINT, 143 SIGTERM); `train` stopped by SIGTERM after saving its step: 0."""
    from neox_jax import distributed, host_malloc
    from neox_jax.errors import CheckpointError, ConfigError, LaunchError, TrainingError

    try:
        distributed.without_a_gpu_skip_cuda_checks()  # before JAX starts: no CUDA traceback on a CPU machine
        host_malloc.reuse_freed_memory()  # before JAX starts a CPU backend (neox_jax/host_malloc.py)
        _print_setting_warnings(args)
        return args.func(args) or 0
    except (ConfigError, CheckpointError, LaunchError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:  # the run itself failed (diverged): its last good checkpoint stays the latest
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
