"""The layout planner: compiled memory on emulated devices, and the HLO collective accounting."""

import numpy as np

from neox_jax.config import TrainConfig
from neox_jax.plan import _first_group, collective_bytes, plan


def test_planner_on_a_small_model_accounts_for_every_argument_byte():
    cfg = TrainConfig.from_dict({"model": "pythia-14m", "mesh": {"data": 2, "pipe": 2, "tensor": 2},
                                 "seq_length": 128, "micro_batch_size": 2, "grad_accum_steps": 2,
                                 "precision": "bf16"})
    p = plan(cfg, "a100-40gb")
    batch = 2 * (2 * 2) * 129 * 4  # [accum, micro x data, seq + 1] int32, replicated over pipe and tensor
    # XLA's arguments are exactly our sharded state (+ the step counter) and the batch shard
    assert p.xla_argument == p.params + p.master + p.opt_state + batch // 2 + 8  # + the step and update counters
    assert p.fits and p.xla_total > p.xla_argument
    assert set(p.collectives) >= {"data", "tensor"}
    report = p.report("a100-40gb")
    assert "fits" in report and "over data" in report and "XLA memory analysis" in report


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
