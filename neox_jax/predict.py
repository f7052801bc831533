"""Step time and TFLOP/s per device of a layout on a cluster: compute + the communication that cannot overlap +
the pipeline bubble, with one efficiency constant fixed once from the GPT-NeoX-20B paper's run.

    compute   the FLOPs the step executes per device (forward 2 N + 4 L s h per token, times 3 for forward and
              backward plus one per recomputed forward) / (peak x efficiency)
    bubble    a pipeline of P stages over M microbatches takes (M + P - 1) / M of the compute
    comm      each axis's bytes per device / the link it runs on, none of it overlapped: `tensor` all-reduces sit
              between a layer's matmuls, the pipeline's sends between stages, and the once-per-step gradient
              reduction over `data` after the last microbatch. An axis runs inside a node when it and the axes
              inside it (`tensor` innermost, then `pipe`, then `data`) fit in one node's devices.

The model and the runs it was checked on are in docs/sharding.md.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import yaml

from neox_jax import gpus
from neox_jax.config import NeoXConfig
from neox_jax.errors import ConfigError
from neox_jax.flops import flops_6n, flops_paper

# From the GPT-NeoX-20B paper's run (43.9 s per step on 96 A100-40GB, (12, 4, 2), 32 microbatches, per-layer
# recomputation, fp16 gradients): the fraction of peak its matmuls reached. Fixed once; see docs/sharding.md.
A100_EFFICIENCY = 0.460


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Nodes of `devices_per_node` cards (neox_jax/gpus.py's table: peak, memory, NVLink) and their network."""

    name: str
    card: str
    devices_per_node: int
    inter_gbps: float  # GB/s per device across nodes (the node's NICs shared by its devices)
    efficiency: float  # achievable fraction of peak for the step's matmuls
    intra_gbps: float = 0.0  # GB/s per device per direction inside a node; 0: the card's NVLink

    def __post_init__(self):
        """Every field's range and unit at once (a cluster file's mistakes: a percent for a fraction, a sign)."""
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        problems = [] if self.card in gpus.CARDS else [f"card={self.card!r}: choose one of {', '.join(gpus.CARDS)}"]
        if not (isinstance(self.devices_per_node, int) and not isinstance(self.devices_per_node, bool)
                and self.devices_per_node >= 1):
            problems.append(f"devices_per_node={self.devices_per_node!r}: a whole number of GPUs per node, at least 1")
        if not (number(self.inter_gbps) and self.inter_gbps > 0):
            problems.append(f"inter_gbps={self.inter_gbps!r}: GB/s per GPU across nodes, above 0 (e.g. 12.5 for "
                            "4 x 200 Gb/s HDR shared by 8 GPUs)")
        if not (number(self.intra_gbps) and self.intra_gbps >= 0):
            problems.append(f"intra_gbps={self.intra_gbps!r}: GB/s per GPU and direction inside a node, 0 for the "
                            "card's NVLink")
        if not (number(self.efficiency) and 0 < self.efficiency <= 1):
            problems.append(f"efficiency={self.efficiency!r}: the fraction of peak the matmuls reach, in (0, 1] "
                            f"(0.46, not 46)")
        if problems:
            raise ConfigError(f"cluster {self.name!r}:\n  " + "\n  ".join(problems))

    @property
    def peak_tflops(self) -> float:  # dense bf16/fp16 per device
        return gpus.card(self.card).peak_tflops

    @property
    def link_gbps(self) -> float:  # inside a node
        return self.intra_gbps or gpus.card(self.card).nvlink_gbps

    @classmethod
    def get(cls, name_or_yaml: str) -> "Cluster":
        if name_or_yaml in CLUSTERS:
            return CLUSTERS[name_or_yaml]
        fields = [f.name for f in dataclasses.fields(cls)]
        path = Path(name_or_yaml)
        if not path.is_file():
            raise ConfigError(f"--cluster {name_or_yaml!r}: choose one of {', '.join(CLUSTERS)} or give a YAML file "
                              f"with {', '.join(fields[1:])} (intra_gbps and name optional)")
        values = yaml.safe_load(path.read_text()) or {}
        needed = set(fields[1:-1])
        unknown, missing = sorted(set(values) - set(fields)), sorted(needed - set(values))
        if unknown or missing:
            raise ConfigError(f"{path}: a cluster needs {', '.join(sorted(needed))}, optionally intra_gbps and name "
                              f"(unknown: {unknown}, missing: {missing})")
        try:
            return cls(**{"name": path.stem, **values})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


CLUSTERS = {
    # the paper's: 12 nodes of 8 A100-SXM4-40GB, NVLink3, 4 x 200 Gb/s HDR per node
    "a100-40gb-paper": Cluster("a100-40gb-paper", "a100-40gb", 8, 4 * 25.0 / 8, A100_EFFICIENCY),
    # Megatron-LM's Selene (Narayanan et al. 2021): DGX A100 80GB, 8 x 200 Gb/s HDR per node
    "a100-80gb-selene": Cluster("a100-80gb-selene", "a100-80gb", 8, 25.0, A100_EFFICIENCY),
    # 8 x H100 SXM per node, NVLink4, 8 x 400 Gb/s NDR; efficiency not measured: A100's
    "h100-80gb-ib": Cluster("h100-80gb-ib", "h100-80gb", 8, 50.0, A100_EFFICIENCY),
}


def inside_node(cluster: Cluster, mesh: dict[str, int], axis: str) -> bool:
    """Whether an axis's collectives stay inside a node: the axis and those inside it (`tensor` innermost, then
    `pipe`, then `data`) fit in one node's devices."""
    inner = {"tensor": ("tensor",), "pipe": ("pipe", "tensor"), "data": ("data", "pipe", "tensor")}[axis]
    return math.prod(mesh[a] for a in inner) <= cluster.devices_per_node


def link_gbps(cluster: Cluster, mesh: dict[str, int], axis: str) -> float:
    """The bandwidth an axis's collectives run at, per device."""
    return cluster.link_gbps if inside_node(cluster, mesh, axis) else cluster.inter_gbps


@dataclasses.dataclass
class Prediction:
    compute_s: float
    bubble_s: float
    comm_s: dict[str, float]
    step_s: float
    tflops_6n: float  # per device
    tflops_paper: float
    tokens_per_s: float

    def report(self, cluster: Cluster) -> str:
        comm = ", ".join(f"{a} {s:.2f} s" for a, s in sorted(self.comm_s.items(), key=lambda kv: -kv[1]))
        return "\n".join([
            f"predicted on {cluster.name} ({cluster.devices_per_node} x {cluster.card} per node, "
            f"{cluster.peak_tflops:.0f} TFLOP/s peak, {cluster.efficiency:.1%} of it "
            f"for compute, {cluster.link_gbps:.0f} / {cluster.inter_gbps:.1f} GB/s inside / across nodes)",
            f"  compute {self.compute_s:.2f} s + bubble {self.bubble_s:.2f} s + communication ({comm or 'none'}) "
            f"= step {self.step_s:.2f} s, {self.tokens_per_s:,.0f} tokens/s",
            f"  per device: {self.tflops_6n:.1f} TFLOP/s (6N convention), {self.tflops_paper:.1f} TFLOP/s (the "
            "GPT-NeoX-20B paper's)"])


def executed_flops_per_token(model: NeoXConfig, seq_length: int, recomputed_forwards: int) -> float:
    forward = 2 * (model.num_params - model.vocab_size * model.hidden_size) + 4 * model.num_layers * seq_length \
        * model.hidden_size
    return forward * (3 + recomputed_forwards)


def predict(model: NeoXConfig, mesh: dict[str, int], seq_length: int, global_batch: int, microbatches: int,
            recomputed_forwards: int, traffic: dict[str, float], cluster: Cluster) -> Prediction:
    """`traffic`: bytes per device per step by axis ("data", "tensor", "pipe"); `microbatches`: the pipeline's
    per step (1 without one); `recomputed_forwards`: 0 without recomputation, 1 per-layer, 2 nested."""
    devices = math.prod(mesh.values())
    tokens = global_batch * seq_length
    compute = tokens * executed_flops_per_token(model, seq_length, recomputed_forwards) / devices \
        / (cluster.peak_tflops * 1e12 * cluster.efficiency)
    stages = mesh["pipe"]
    bubble = compute * (stages - 1) / microbatches if stages > 1 else 0.0
    comm = {a: b / (link_gbps(cluster, mesh, a) * 1e9) for a, b in traffic.items() if a in mesh and mesh[a] > 1}
    step = compute + bubble + sum(comm.values())
    return Prediction(compute_s=compute, bubble_s=bubble, comm_s=comm, step_s=step,
                      tflops_6n=flops_6n(model, seq_length, tokens) / step / devices / 1e12,
                      tflops_paper=flops_paper(model, seq_length, tokens) / step / devices / 1e12,
                      tokens_per_s=tokens / step)


# ---- checked against published runs ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PublishedRun:
    """A run whose layout, cluster and throughput were published; `reported` is TFLOP/s per GPU in `convention`."""

    name: str
    model: NeoXConfig
    mesh: dict
    global_batch: int
    micro_batch: int
    cluster: str
    reported: float
    convention: str  # "paper" (GPT-NeoX-20B's) or "megatron" (Narayanan et al.'s, recomputation counted)
    zero_stage: int
    source: str


def _megatron(billions, heads, hidden, layers, tp, pp, gpus, batch, tflops) -> PublishedRun:
    model = NeoXConfig(vocab_size=51200, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       intermediate_size=4 * hidden, max_position_embeddings=2048, use_parallel_residual=False,
                       remat_policy="full")
    return PublishedRun(f"Megatron-LM GPT {billions}B", model, {"data": gpus // (tp * pp), "pipe": pp, "tensor": tp},
                        batch, 1, "a100-80gb-selene", tflops, "megatron", 0,
                        "Narayanan et al. 2021 (arXiv 2104.04473), Table 1")


PUBLISHED = [
    PublishedRun("GPT-NeoX-20B", NeoXConfig.preset("neox-20b", remat_policy="full"),
                 {"data": 12, "pipe": 4, "tensor": 2}, 1536, 4, "a100-40gb-paper", 117.0, "paper", 1,
                 "Black et al. 2022 (arXiv 2204.06745): 117 TFLOP/s per GPU, 43.9 s per step; the efficiency constant "
                 "comes from it"),
    _megatron(1.7, 24, 2304, 24, 1, 1, 32, 512, 137), _megatron(3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    _megatron(7.5, 32, 4096, 36, 4, 1, 128, 512, 142), _megatron(18, 48, 6144, 40, 8, 1, 256, 1024, 135),
    _megatron(39, 64, 8192, 48, 8, 2, 512, 1536, 138), _megatron(76, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    _megatron(145, 96, 12288, 80, 8, 8, 1536, 2304, 148), _megatron(310, 128, 16384, 96, 8, 16, 1920, 2160, 155),
]


def predict_published(run: PublishedRun) -> tuple[Prediction, float]:
    """The prediction for a published run, from its layout alone (the least traffic, fp16 gradients, per-layer
    recomputation, microbatches of `micro_batch`), and its TFLOP/s per GPU in the run's own convention."""
    from neox_jax.config import TrainConfig
    from neox_jax.traffic import minimum_traffic

    m, mesh, seq = run.model, run.mesh, 2048
    per_replica = run.global_batch // mesh["data"]
    cfg = TrainConfig(model=m, mesh=mesh, seq_length=seq, micro_batch_size=run.micro_batch,
                      grad_accum_steps=per_replica // run.micro_batch, precision="bf16", grad_accum_dtype="bfloat16",
                      zero_stage=run.zero_stage)
    embedding = m.vocab_size * m.hidden_size  # each end of the pipeline holds one embedding
    layers = m.num_params - 2 * embedding
    held = (layers / mesh["pipe"] + (2 if mesh["pipe"] == 1 else 1) * embedding) / mesh["tensor"]
    traffic = minimum_traffic(cfg, mesh, int(held))
    p = predict(m, mesh, seq, run.global_batch, per_replica // run.micro_batch, 1, traffic, Cluster.get(run.cluster))
    if run.convention == "paper":
        return p, p.tflops_paper
    s, h, L, V = seq, m.hidden_size, m.num_layers, m.vocab_size
    flops = 96 * run.global_batch * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    return p, flops / p.step_s / math.prod(mesh.values()) / 1e12
