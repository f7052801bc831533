"""The layout planner: compiled memory on emulated devices, and the HLO collective accounting."""

import numpy as np
import pytest

from neox_jax.config import TrainConfig
from neox_jax.hlo import _first_group, collective_bytes
from neox_jax.plan import plan
from tests.conftest import require_gpu_plan


@pytest.mark.parametrize("compiler", ["gpu", "cpu"])
def test_planner_on_a_small_model_accounts_for_every_argument_byte(compiler):
    if compiler == "gpu":
        require_gpu_plan()
    cfg = TrainConfig.from_dict({"model": "pythia-14m", "mesh": {"data": 2, "pipe": 2, "tensor": 2},
                                 "seq_length": 128, "micro_batch_size": 2, "grad_accum_steps": 2,
                                 "precision": "bf16"})
    p = plan(cfg, "a100-40gb", compiler=compiler)
    assert p.compiler == compiler
    batch = 2 * (2 * 2) * 129 * 4  # [accum, micro x data, seq + 1] int32, replicated over pipe and tensor
    # XLA's arguments are exactly our sharded state (+ the step counter) and the batch shard
    assert p.xla_argument == p.params + p.master + p.opt_state + batch // 2 + 8  # + the step and update counters
    assert p.fits and p.xla_total > p.xla_argument
    assert set(p.collectives) >= {"data", "tensor"}
    report = p.report()
    assert "fits" in report and "over data" in report and "XLA memory analysis" in report
    assert ("XLA's GPU compiler for 1 x 8 a100-40gb" if compiler == "gpu" else "emulated devices") in report


HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[1024]{0} all-reduce(f32[1024]{0} %x), channel_id=1, replica_groups=[4,2]<=[8], to_apply=%add
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %ag = f32[256]{0} all-gather(f32[64]{0} %y), replica_groups={{0,2,4,6},{1,3,5,7}}, dimensions={0}
  %cp = f32[100]{0} collective-permute(f32[100]{0} %z), source_target_pairs={{0,0},{0,4},{4,0}}
}
"""


def test_collective_accounting_by_axis_and_loop_trips():
    mesh = {"data": 2, "pipe": 2, "tensor": 2}  # device id = 4*data + 2*pipe + tensor
    out = collective_bytes(HLO, mesh)
    assert out["tensor"] == 5 * 2 * (1 / 2) * 4096  # all-reduce in a 5-trip loop over pairs {0,1}
    assert out["data+pipe"] == int(3 / 4 * 1024)  # all-gather over {0,2,4,6}
    assert out["data"] == 400  # the permute 0 -> 4 moves along data


def test_replica_group_spellings():
    assert _first_group("replica_groups=[2,4]<=[4,2]T(1,0), x", 8) == [0, 2, 4, 6]
    line = "replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_0'}, x"
    assert _first_group(line, 8) == [0, 2]  # ids [[0,4,1,5],[2,6,3,7]], varying along axis_0
    assert _first_group("replica_groups=mesh['a'=2,'b'=2,'c'=2] {'b','c'}, x", 8) == [0, 1, 2, 3]
    assert np.array_equal(_first_group("replica_groups={{3,7}}", 8), [3, 7])


# ---- traffic against its minimum (neox_jax/traffic.py) ---------------------------------------------------------


@pytest.fixture(scope="module")
def traffic_plans():
    """The small model's step compiled on (4,1,2) and (2,2,2) with 1 and 8 accumulation microsteps."""
    return {(mesh, accum): plan(small(mesh, accum)) for mesh in ((4, 1, 2), (2, 2, 2)) for accum in (1, 8)}


def small(mesh, accum):
    return TrainConfig.from_dict({"model": {"preset": "pythia-14m", "remat_policy": "full"},
                                  "mesh": dict(zip(("data", "pipe", "tensor"), mesh)), "seq_length": 128,
                                  "micro_batch_size": 2, "grad_accum_steps": accum, "precision": "bf16"})


def test_traffic_over_data_is_once_per_step_whatever_the_microsteps(traffic_plans):
    for mesh in ((4, 1, 2), (2, 2, 2)):
        one, eight = traffic_plans[mesh, 1], traffic_plans[mesh, 8]
        assert abs(eight.collectives["data"] / one.collectives["data"] - 1) <= 0.05, mesh
        # an fp32 reduce-scatter of the gradients and a bf16 all-gather of the weights, nothing more
        assert abs(eight.collectives["data"] / eight.minimum["data"] - 1) <= 0.05, mesh


def test_traffic_over_tensor_is_gpt_neox_count(traffic_plans):
    p = traffic_plans[(4, 1, 2), 8]  # 6 layers x (forward, recomputed forward, 2 backward) + embedding, output
    assert abs(p.collectives["tensor"] / p.minimum["tensor"] - 1) <= 0.10
    per_microstep = p.collectives["tensor"] / 8
    assert abs(traffic_plans[(4, 1, 2), 1].collectives["tensor"] / per_microstep - 1) <= 0.10


def test_the_compiled_step_runs_each_layer_forward_once_plus_one_recomputation(traffic_plans):
    """Counted in the compiled HLO (attention scores per layer and microbatch, loop trips included): 2 with per-layer
    remat; the pipeline's 2 per tick, 9 ticks for 8 microbatches on 2 stages; 1 without remat."""
    assert traffic_plans[(4, 1, 2), 8].forwards_per_layer == 2.0
    assert traffic_plans[(2, 2, 2), 8].forwards_per_layer == pytest.approx(2 * 9 / 8)
    cfg = small((4, 1, 2), 2)
    assert plan(cfg.replace(model=cfg.model.replace(remat_policy="none"))).forwards_per_layer == 1.0


def test_the_loss_never_gathers_the_vocabulary_over_tensor():
    from neox_jax.plan import compile_partitioned
    from neox_jax.sharding import make_mesh
    from neox_jax.train import Trainer

    cfg = TrainConfig.from_dict({"model": {"preset": "pythia-14m"}, "mesh": {"data": 2, "pipe": 1, "tensor": 4},
                                 "seq_length": 64, "micro_batch_size": 2, "precision": "bf16"})
    tr = Trainer(cfg, make_mesh(cfg.mesh))
    _, hlo = compile_partitioned(tr.step.lower(tr.abstract_state(), tr.abstract_batch()))
    vocab = cfg.model.vocab_size
    moved = [line for line in hlo.splitlines() if any(f" {op}(" in line for op in ("all-gather", "all-reduce",
                                                                                  "all-to-all", "collective-permute"))]
    assert moved, "no collectives found: the HLO was not read"
    # logits, their gradient and the output weights move only as [batch, length] statistics or not at all
    assert not [line for line in moved if str(vocab) in line.split("=")[1].split("(")[0]]


def test_the_prediction_takes_the_compiled_traffic_and_recomputation(traffic_plans):
    from neox_jax.plan import prediction
    from neox_jax.predict import CLUSTERS, predict

    piped, flat = traffic_plans[(2, 2, 2), 8], traffic_plans[(4, 1, 2), 8]
    assert (piped.recomputed_forwards, flat.recomputed_forwards) == (1, 1)
    assert "recompute factor 4" in piped.report() and "recompute factor 4" in flat.report()
    cluster = CLUSTERS["a100-40gb-paper"]
    got = prediction(piped, small((2, 2, 2), 8), cluster)
    want = predict(small((2, 2, 2), 8).model, piped.mesh, 128, piped.global_batch, piped.microbatches, 1,
                   {a: piped.collectives[a] for a in ("data", "pipe", "tensor")}, cluster)
    assert got == want and got.bubble_s > 0


# ---- comparing layouts (the sharding notebook's rows) ----------------------------------------------------------


def test_activation_estimate_by_hand_with_a_pipeline():
    from neox_jax.plan import activation_bytes

    cfg = TrainConfig.from_dict({"model": {"vocab_size": 512, "hidden_size": 64, "num_layers": 4, "num_heads": 4,
                                           "remat_policy": "full"},
                                 "mesh": {"data": 1, "pipe": 2, "tensor": 2}, "seq_length": 128,
                                 "micro_batch_size": 2, "grad_accum_steps": 2, "pipe_microbatches": 4,
                                 "precision": "bf16"})
    # 1 sequence per pipeline microbatch, 2 layers per stage, 16-bit activations
    per_layer = 128 * 64 * (10 + 24 / 2 + 5 * 4 * 128 / (64 * 2))  # one layer's working set
    layer_input = 2 * 128 * 64
    logits = (2 * 128 + 64) * (512 / 2) * 4  # a 128-token chunk of fp32 logits and their gradient, the kernel's
    # 3 microbatches in flight on the first stage (2P - 1), each with its 2 layers' inputs
    assert activation_bytes(cfg, cfg.mesh, 4) == int(3 * 2 * layer_input + per_layer + logits)
    # 16 microbatches of one sequence each (4x the rows per step): nothing grows with M
    assert activation_bytes(cfg.replace(micro_batch_size=8), cfg.mesh, 16) == activation_bytes(cfg, cfg.mesh, 4)
    # remat none: the stage's input in flight, the whole stage's working set in its backward
    none = cfg.replace(model=cfg.model.replace(remat_policy="none"))
    assert activation_bytes(none, cfg.mesh, 4) == int(3 * layer_input + 2 * per_layer + logits)


def test_relayout_keeps_the_run_and_the_summary_splits_traffic_by_link():
    from neox_jax.errors import ConfigError
    from neox_jax.plan import relayout, summary
    from neox_jax.predict import Cluster

    base = TrainConfig.from_dict({"model": {"preset": "pythia-14m", "remat_policy": "full"},
                                  "mesh": {"data": 2, "pipe": 2, "tensor": 2}, "seq_length": 128,
                                  "micro_batch_size": 2, "grad_accum_steps": 2, "pipe_microbatches": 4,
                                  "precision": "bf16"})
    cfg = relayout(base, {"data": 4, "pipe": 2, "tensor": 1})
    assert cfg.global_batch_size(4) == base.global_batch_size(2) == 8
    assert (cfg.grad_accum_steps, cfg.pipe_microbatches) == (1, 2)  # still 1 sequence per pipeline microbatch
    assert relayout(base, {"data": 4, "pipe": 1, "tensor": 2}, zero_stage=3).zero_stage == 3
    with pytest.raises(ConfigError, match="not a multiple of data=8 x micro_batch_size=2"):
        relayout(base.replace(grad_accum_steps=1, pipe_microbatches=2), {"data": 8, "pipe": 1, "tensor": 1})

    node_of_two = Cluster("toy", "a100-80gb", 2, 10.0, 0.5, intra_gbps=100.0)  # pipe stays inside a node, data crosses
    row = summary(plan(cfg), cfg, node_of_two)
    assert row["inside_node"] == row["traffic"]["pipe"] > 0 and row["across_nodes"] == row["traffic"]["data"] > 0
    # layers split over pipe (4 copies of each byte), embeddings and the final LayerNorm on all 8 devices
    assert 4 < row["replication"] < 8
    assert row["params"] * row["devices"] / row["replication"] == pytest.approx(row["model_bytes"], rel=1e-9)
    assert row["step_s"] == pytest.approx(row["compute_s"] + row["bubble_s"] + sum(row["comm_s"].values()))


def test_default_hosts_keep_pipe_and_tensor_inside_one():
    from neox_jax.plan import default_hosts

    def hosts(data, pipe, tensor, node=8):
        return default_hosts({"data": data, "pipe": pipe, "tensor": tensor}, node)

    assert (hosts(12, 4, 2), hosts(96, 1, 1), hosts(2, 2, 2), hosts(3, 1, 1)) == (12, 12, 1, 1)
    assert (hosts(6, 4, 4), hosts(6, 2, 8)) == (6, 6)  # 16 devices of pipe x tensor: hosts of 16
    assert hosts(12, 1, 1, node=4) == 3


@pytest.mark.parametrize("compiler,precision,remat,accum,forwards", [("cpu", "fp32", "none", 1, 1.0),
                                                                   ("gpu", "fp32", "full", 3, 2.0),
                                                                   ("gpu", "bf16", "none", 1, 1.0)])
def test_layer_forwards_on_one_device_with_one_sequence(compiler, precision, remat, accum, forwards):
    """Micro batch 1 on one device (no partitioning: the dots counted before the backend's passes), the einsum's
    scores or cuDNN's calls: each layer's forward runs once, twice with per-layer remat, per microstep."""
    if compiler == "gpu":
        require_gpu_plan()
    cfg = TrainConfig.from_dict({"model": {"preset": "pythia-14m", "num_layers": 2, "remat_policy": remat},
                                 "mesh": {"data": 1}, "seq_length": 64, "micro_batch_size": 1,
                                 "grad_accum_steps": accum, "precision": precision})
    assert plan(cfg, "h100-80gb", compiler=compiler).forwards_per_layer == forwards
