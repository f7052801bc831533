"""The layout planner: compile the train step for a mesh of GPUs without having them, allocate nothing, and
report per-device memory, collective traffic and kernels, beside an analytical estimate.

With the gpu-plan extra the step is compiled by XLA's own GPU compiler for compile-only devices of the target card
(`neox_jax/gpus.py`): the memory is the GPU program's buffer assignment, the kernels and asynchronous collectives
are the GPU passes' own. Without it, the fallback compiles the same partitioned program for emulated CPU devices,
labelled as such: XLA's CPU compiler keeps some bf16 work in fp32, so its temporaries are an upper bound. The
analytical figures use exact shard shapes for the state and the activation model of Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models").
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from neox_jax import gpus, matmul
from neox_jax import sharding as shd
from neox_jax.config import TrainConfig
from neox_jax.errors import ConfigError
from neox_jax.hlo import attention_forwards, collective_bytes, collective_ops, kernel_calls
from neox_jax.traffic import minimum_traffic, ratio_line
from neox_jax.train import Trainer

GB = 1e9


def sharded_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a tree laid out by `shardings` (the largest shard, exactly)."""
    total = 0
    for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass
class Plan:
    mesh: dict
    devices: int
    global_batch: int
    params: int  # bytes per device
    master: int
    opt_state: int
    grads: int
    activations_estimate: int
    xla_argument: int
    xla_output: int
    xla_alias: int
    xla_temp: int
    collectives: dict  # mesh axes -> bytes sent per device per step, counted right after SPMD partitioning
    compile_seconds: float
    capacity: int
    stages: int = 1
    microbatches: int = 1
    minimum: dict = dataclasses.field(default_factory=dict)  # mesh axis -> the least bytes (neox_jax/traffic.py)
    recomputed_forwards: int = 0  # forwards run again in the backward (0 or 1)
    forwards_per_layer: float = 0.0  # measured: layer forwards per layer and microbatch in the compiled step
    recomputation: str = "no recomputation"  # what is recomputed
    replication: float = 1.0  # devices holding each working-weight byte, averaged over the bytes (from the specs)
    target: str = "a100-40gb"  # the card (neox_jax/gpus.py)
    compiler: str = "gpu"  # "gpu": XLA's GPU compiler for the card; "cpu": the fallback on emulated CPU devices
    hosts: int = 1
    kernels: dict = dataclasses.field(default_factory=dict)  # kernel -> calls per step (GPU compile)
    collective_ops: dict = dataclasses.field(default_factory=dict)  # kind -> (asynchronous, all) per step
    gpu_collectives: dict = dataclasses.field(default_factory=dict)  # mesh axes -> bytes, the optimized GPU program
    reference: int = 0  # DPO's or KTO's frozen reference weights, bytes per device (the working weights' layout)
    sequence_parallel: bool = False  # the residual stream split along the sequence over `tensor` (tensor > 1)
    activations_toggled: int = 0  # the analytical activations with sequence parallelism the other way (tensor > 1)

    @property
    def xla_total(self) -> int:
        return self.xla_argument + self.xla_output - self.xla_alias + self.xla_temp

    @property
    def analytic_total(self) -> int:
        return self.params + self.reference + self.master + self.opt_state + self.grads + self.activations_estimate

    @property
    def fits(self) -> bool:
        return self.xla_total <= self.capacity

    @property
    def fits_analytically(self) -> bool:
        return self.analytic_total <= self.capacity

    def report(self) -> str:
        rows = [
            ("parameters (working weights)", self.params),
            *((("reference weights (DPO, KTO: a frozen copy)", self.reference),) if self.reference else ()),
            ("fp32 master weights", self.master),
            ("optimizer state (Adam moments)", self.opt_state),
            ("gradients (microbatch sums + fp32 shard)", self.grads),
            ("activations (analytical)", self.activations_estimate),
        ]
        compiler = (f"XLA's GPU compiler for {self.hosts} x {self.devices // self.hosts} {self.target} (compile-only "
                    "devices, autotuning off, cuBLAS GEMMs: neox_jax/gpus.py)" if self.compiler == "gpu" else
                    "XLA's CPU compiler on emulated devices (the fallback without the gpu-plan extra: "
                    f"{gpus.GPU_PLAN}); temporaries an upper bound for a GPU")
        out = [f"mesh {self.mesh} on {self.devices} devices, global batch {self.global_batch} sequences",
               f"compiled by {compiler}",
               "", "per device                                         analytical"]
        out += [f"  {name:47s} {v / GB:9.2f} GB" for name, v in rows]
        out += [f"  {'total':47s} {self.analytic_total / GB:9.2f} GB"]
        if self.mesh.get("tensor", 1) > 1:
            out.append(f"  sequence_parallel {'on' if self.sequence_parallel else 'off'}: activations "
                       f"{self.activations_estimate / GB:.2f} GB; {'off' if self.sequence_parallel else 'on'} they "
                       f"would be {self.activations_toggled / GB:.2f} GB (analytical)")
        out += ["",
                "XLA memory analysis of the compiled step (per device)",
                f"  {'arguments (state + batch)':47s} {self.xla_argument / GB:9.2f} GB",
                f"  {'outputs, less donated buffers':47s} {(self.xla_output - self.xla_alias) / GB:9.2f} GB",
                f"  {'temporaries (activations, gradients, ...)':47s} {self.xla_temp / GB:9.2f} GB",
                f"  {'total':47s} {self.xla_total / GB:9.2f} GB", "",
                "collective traffic per device per step (bytes sent, ring algorithms; the compiled step, counted "
                "after SPMD partitioning, beside the least it could send: neox_jax/traffic.py)"]
        for axes, v in sorted(((a, v) for a, v in self.collectives.items() if v >= 1e6), key=lambda kv: -kv[1]):
            out.append(ratio_line(axes, v, self.minimum.get(axes)))
        if self.collective_ops:
            out.append("  in the GPU program, per step (asynchronous: start/done pairs the scheduler overlaps): " +
                       ", ".join(f"{kind} {a:,} of {n:,} asynchronous" for kind, (a, n) in
                                 sorted(self.collective_ops.items())))
        if self.kernels:
            out += ["", "kernels per step (loop trips included): " +
                    ", ".join(f"{name} {n:,}" for name, n in sorted(self.kernels.items()))]
        if self.stages > 1:
            from neox_jax.pipeline import bubble_fraction

            out += ["", f"pipeline: {self.stages} stages x {self.microbatches} microbatches per step, bubble "
                        f"(P-1)/(M+P-1) = {bubble_fraction(self.stages, self.microbatches):.1%}; per-stage weights "
                        f"{self.params / GB:.2f} GB per device (1/{self.stages} of the layers)"]
        out += ["", f"recompute factor {3 + self.recomputed_forwards} (forward 1 + backward 2 + "
                    f"{self.recomputed_forwards} recomputed: {self.recomputation}); compiled: each layer's forward "
                    f"runs {self.forwards_per_layer:.2f} times per microbatch (its attention scores counted in the "
                    "step" + (f"; {self.microbatches + self.stages - 1} pipeline ticks for {self.microbatches} "
                              "microbatches)" if self.stages > 1 else ")")]
        verdict = "fits" if self.fits else "does NOT fit"
        out += ["", f"compile time {self.compile_seconds:.1f}s",
                f"{self.target}: {self.capacity / 2**30:.1f} GiB per device -> {verdict} "
                f"({100 * self.xla_total / self.capacity:.0f}% by XLA's {self.compiler.upper()} count)"
                + gpus.preallocation(self.xla_total, self.capacity)]
        return "\n".join(out)


def activation_bytes(cfg: TrainConfig, mesh: dict, microbatches: int = 1, sequence_parallel: bool | None = None
                     ) -> int:
    """Korthikanti et al.: a layer's activations for b sequences are s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes at
    16-bit, s*b*h*(34/t + 5*a*s/(h*t)) with sequence parallelism (`sequence_parallel`, default the model's: the
    LayerNorms' and dropouts' regions split too). With recomputation only each layer's input (2*s*b*h, or 1/t of
    it split along the sequence) is kept, plus one layer's working set in the backward. With a pipeline of P stages
    over M microbatches each device runs L/P layers on microbatches of b = micro_batch x accumulation / M sequences
    and keeps 2P - 1 of them at once (neox_jax/pipeline.py): each layer's input (remat full) plus one layer's working
    set, or the stage's input (none) plus the whole stage's working set in its backward. Plus one chunk of the loss's
    fp32 logits and their gradient (objectives.LOSS_CHUNK positions) and the loss's fp32 sum of the output kernel's
    gradient."""
    from neox_jax.pipeline import slots
    from neox_jax.objectives import LOSS_CHUNK

    m = cfg.model
    s, h, a, t, stages = cfg.seq_length, m.hidden_size, m.num_heads, mesh["tensor"], mesh["pipe"]
    width = np.dtype(cfg.working_dtype).itemsize / 2  # the formula counts 16-bit activations
    b = cfg.micro_batch_size * cfg.grad_accum_steps // microbatches if stages > 1 else cfg.micro_batch_size
    b *= 2 if cfg.pairs else 1  # a DPO or RM micro batch counts pairs: two sequences each
    layers = m.num_layers // stages
    split = (m.sequence_parallel if sequence_parallel is None else sequence_parallel) and t > 1
    per_layer = s * b * h * ((34 / t if split else 10 + 24 / t) + 5 * a * s / (h * t)) * width
    layer_input = 2 * s * b * h * width / (t if split else 1)
    in_flight = slots(stages) if stages > 1 else 1
    if m.remat_policy == "none":
        kept = (in_flight * layer_input if stages > 1 else 0) + layers * per_layer
    else:
        kept = in_flight * layers * layer_input + per_layer
    loss = (2 * b * min(LOSS_CHUNK, s) + h) * (m.vocab_size / t) * 4
    return int(kept + loss)


def default_hosts(mesh: dict[str, int], node: int = 8) -> int:
    """Hosts for a mesh's devices: as few devices per host as fill nodes of `node`, in whole `pipe` x `tensor` groups
    (which stay inside a host: sharding.make_mesh), so a group larger than a node makes a host of its own size."""
    n, group = math.prod(mesh.values()), mesh.get("pipe", 1) * mesh.get("tensor", 1)
    return n // max(d for d in range(group, max(node, group) + 1, group) if n % d == 0)


def plan(cfg: TrainConfig, target: str = "a100-40gb", hosts: int | None = None, compiler: str | None = None) -> Plan:
    """The step of `cfg` compiled for `target` cards (neox_jax/gpus.py): by XLA's GPU compiler for `hosts` hosts
    (default: `default_hosts`) where the gpu-plan extra is installed (`compiler` "gpu" insists on it), else on
    emulated CPU devices ("cpu")."""
    import time

    from neox_jax.sharding import make_mesh, named

    card = gpus.card(target)
    compiler = compiler or ("cpu" if gpus.missing() else "gpu")
    n = math.prod(cfg.mesh.values())
    hosts = hosts or default_hosts(dict(cfg.mesh))
    if compiler == "gpu":
        if n % hosts:
            raise ConfigError(f"--hosts {hosts}: the mesh's {n} devices are not divisible among them")
        mesh = make_mesh(cfg.mesh, gpus.topology(target, hosts, n // hosts))
    else:
        mesh, hosts = make_mesh(cfg.mesh, jax.devices()[:n]), 1
    # The planner only lowers: fp16 has bf16's memory footprint, so plan it as bf16 (the model's own dtype fields
    # play no part in training: `precision` sets them).
    if cfg.precision == "fp16":
        cfg = cfg.replace(precision="bf16", model=cfg.model.replace(dtype="float32", param_dtype="float32"))
    trainer = Trainer(cfg, mesh)
    state, batch = trainer.abstract_state(), trainer.abstract_batch()
    t0 = time.perf_counter()
    with matmul.as_on_gpu():  # on CPU devices, the products a GPU runs, not this CPU's (neox_jax/matmul.py)
        lowered = trainer.step.lower(state, batch)
    compiled, partitioned = compile_partitioned(lowered, gpus.DEVICELESS_OPTIONS if compiler == "gpu" else {})
    seconds = time.perf_counter() - t0
    optimized = compiled.as_text() if compiler == "gpu" else ""
    mem = compiled.memory_analysis()
    sh = trainer.state_shardings
    def like(dtype):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), trainer.abstract_params)

    reduced = sharded_bytes(like(np.float32), named(mesh, trainer.zero_specs))  # the fp32 ZeRO shard
    if cfg.zero_stage == 3:  # reduced every microstep into it, beside one microbatch's gradients
        grads = reduced + sharded_bytes(trainer.abstract_params, sh.params)
    else:  # each replica's sums over its microbatches, in grad_accum_dtype
        grads = reduced + sharded_bytes(like(jax.numpy.dtype(cfg.grad_accum_dtype)), sh.params)
    recomputed, how = recomputation(trainer.cfg, trainer.stages)
    # parameters a device holds of its `pipe` x `tensor` shard (before any FSDP split): one-byte elements counted
    held = sharded_bytes(like(np.int8), named(mesh, shd.param_specs(trainer.abstract_params, trainer.logical_axes,
                                                                     mesh)))
    return Plan(
        mesh=dict(mesh.shape), devices=mesh.size, global_batch=trainer.global_batch_size,
        params=sharded_bytes(state.params, sh.params),
        master=sharded_bytes(state.master, sh.master) if state.master is not None else 0,
        reference=sharded_bytes(state.reference, sh.reference) if state.reference is not None else 0,
        opt_state=sharded_bytes(state.opt_state, sh.opt_state),
        grads=grads,
        activations_estimate=activation_bytes(trainer.cfg, dict(mesh.shape), trainer.microbatches),
        sequence_parallel=cfg.model.sequence_parallel and mesh.shape["tensor"] > 1,
        activations_toggled=activation_bytes(trainer.cfg, dict(mesh.shape), trainer.microbatches,
                                             not cfg.model.sequence_parallel),
        xla_argument=mem.argument_size_in_bytes, xla_output=mem.output_size_in_bytes,
        xla_alias=mem.alias_size_in_bytes, xla_temp=mem.temp_size_in_bytes,
        collectives=collective_bytes(partitioned, dict(mesh.shape)),
        compile_seconds=seconds, capacity=card.memory, stages=trainer.stages,
        microbatches=trainer.microbatches,
        recomputed_forwards=recomputed, recomputation=how,
        forwards_per_layer=attention_forwards(partitioned, trainer.cfg.seq_length)
        / (cfg.model.num_layers // trainer.stages
           * (trainer.microbatches if trainer.stages > 1 else cfg.grad_accum_steps)),
        minimum=minimum_traffic(trainer.cfg, dict(mesh.shape), held),
        replication=replication(trainer.abstract_params, trainer.param_specs, dict(mesh.shape)),
        target=target, compiler=compiler, hosts=hosts,
        kernels=kernel_calls(optimized) if optimized else {},
        collective_ops=collective_ops(optimized) if optimized else {},
        gpu_collectives=collective_bytes(optimized, dict(mesh.shape)) if optimized else {},
    )


def replication(abstract_params, specs, mesh_shape: dict[str, int]) -> float:
    """How many devices hold each parameter byte, averaged over the bytes: a tensor split over mesh axes of total
    size k is held by devices / k of them. (Per-device bytes x devices / this = the model's bytes.)"""
    devices = math.prod(mesh_shape.values())
    held = total = 0
    for x, spec in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, P))):
        split = math.prod(mesh_shape[a] for entry in spec if entry for a in ((entry,) if isinstance(entry, str)
                                                                               else entry))
        size = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        held, total = held + size * devices / split, total + size
    return held / total


def relayout(cfg: TrainConfig, mesh: dict[str, int], zero_stage: int | None = None) -> TrainConfig:
    """`cfg` on another mesh with the same global batch, micro batch and sequences per pipeline microbatch: the
    accumulation steps follow the data size (for comparing layouts of one training run)."""
    from neox_jax.train import pipe_microbatches

    global_batch = cfg.global_batch_size(cfg.mesh["data"])
    rows = mesh["data"] * cfg.micro_batch_size
    if global_batch % rows:
        raise ConfigError(f"mesh {mesh}: the global batch of {global_batch} sequences is not a multiple of data="
                          f"{mesh['data']} x micro_batch_size={cfg.micro_batch_size}: change micro_batch_size")
    accum = global_batch // rows
    split = pipe_microbatches(cfg, cfg.mesh["pipe"]) // cfg.grad_accum_steps if cfg.mesh["pipe"] > 1 else 0
    return cfg.replace(mesh=dict(mesh), grad_accum_steps=accum,
                       pipe_microbatches=accum * split if mesh["pipe"] > 1 else 0,
                       zero_stage=cfg.zero_stage if zero_stage is None else zero_stage)


def summary(p: Plan, cfg: TrainConfig, cluster=None) -> dict:
    """One layout's plan as a flat, JSON-ready row (bytes per device per step; seconds on `cluster` when given):
    what the notebooks tabulate and plot."""
    from neox_jax.pipeline import bubble_fraction
    from neox_jax.predict import inside_node

    mesh = p.mesh
    traffic = {axis: p.collectives.get(axis, 0) for axis in ("data", "pipe", "tensor")}
    row = dict(layout=f"({mesh['data']},{mesh['pipe']},{mesh['tensor']})", data=mesh["data"], pipe=mesh["pipe"],
               tensor=mesh["tensor"], zero_stage=cfg.zero_stage, devices=p.devices, global_batch=p.global_batch,
               microbatches=p.microbatches, params=p.params, master=p.master, opt_state=p.opt_state, grads=p.grads,
               activations=p.activations_estimate, analytic_total=p.analytic_total, xla_total=p.xla_total,
               capacity=p.capacity, fits_analytically=p.fits_analytically, fits_xla=p.fits, compiler=p.compiler,
               # what decides the fit: XLA's GPU count where the GPU compiler ran, else the analytical total
               memory=p.xla_total if p.compiler == "gpu" else p.analytic_total,
               fits=p.fits if p.compiler == "gpu" else p.fits_analytically,
               replication=p.replication, traffic=traffic,
               minimum={axis: p.minimum.get(axis, 0) for axis in traffic},
               bubble=bubble_fraction(p.stages, p.microbatches) if p.stages > 1 else 0.0,
               recompute_factor=3 + p.recomputed_forwards,
               model_bytes=cfg.model.num_params * np.dtype(cfg.working_dtype).itemsize)
    if cluster is not None:
        pred = prediction(p, cfg, cluster)
        inside = {a: inside_node(cluster, mesh, a) for a in traffic}
        row.update(inside_node=sum(v for a, v in traffic.items() if inside[a]),
                   across_nodes=sum(v for a, v in traffic.items() if not inside[a]),
                   compute_s=pred.compute_s, bubble_s=pred.bubble_s, comm_s=dict(pred.comm_s), step_s=pred.step_s,
                   tflops_6n=pred.tflops_6n, tflops_paper=pred.tflops_paper, tokens_per_s=pred.tokens_per_s)
    return row


def recomputation(cfg: TrainConfig, stages: int) -> tuple[int, str]:
    """(forwards run again in the backward, what): the layer scan's checkpoint recomputes each layer once (a `dots`
    policy keeps its matmuls' outputs); the pipeline recomputes each layer (remat full) or each stage (none) once in
    its backward (neox_jax/pipeline.py)."""
    policy = cfg.model.remat_policy
    if stages > 1:
        return 1, ("each stage's forward recomputed once in its backward" if policy == "none" else
                   "each layer's forward recomputed once in its stage's backward")
    if policy == "none":
        return 0, "no recomputation"
    if policy == "selective":
        return 0, ("selective: the attention core, LayerNorms and activations recomputed, the projections kept (not "
                   "counted)")
    return 1, "each layer recomputed once" + ("" if policy == "full" else f" ({policy}: the matmuls kept)")


def prediction(p: Plan, cfg: TrainConfig, cluster):
    """The step on `cluster` (neox_jax/predict.py) with this plan's compiled traffic and recomputation."""
    from neox_jax.predict import predict

    traffic = {axis: v for axis, v in p.collectives.items() if axis in ("data", "pipe", "tensor")}
    return predict(cfg.model, p.mesh, cfg.seq_length, p.global_batch, p.microbatches, p.recomputed_forwards,
                   traffic, cluster)


def compile_partitioned(lowered, options: dict | None = None):
    """(compiled with `options`, the HLO text right after SPMD partitioning). The collectives are counted there:
    later passes are the backend's (the CPU one computes bf16 in fp32, doubling the bytes of bf16 collectives)."""
    import glob
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        compiled = lowered.compile(compiler_options={**(options or {}), "xla_dump_to": folder,
                                                     "xla_dump_hlo_pass_re": "spmd-partitioning"})
        dumps = glob.glob(os.path.join(folder, "*after_spmd-partitioning*.txt"))
        # one device is not partitioned (and has no collectives to count): the program before the backend's passes,
        # whose products are still dots (a GPU's optimized program calls cuBLAS instead)
        text = (open(max(dumps, key=os.path.getsize)).read() if dumps else
                lowered.as_text(dialect="hlo", debug_info=True))
    return compiled, text

