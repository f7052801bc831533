"""The step-time predictor: a hand computation on a toy cluster, and published runs it was not tuned on."""

import pytest

from neox_jax.config import NeoXConfig
from neox_jax.errors import ConfigError
from neox_jax.flops import flops_paper
from neox_jax.predict import PUBLISHED, Cluster, executed_flops_per_token, link_gbps, predict, predict_published


def test_a_toy_cluster_step_by_hand():
    toy = Cluster("toy", "a100-40gb", devices_per_node=4, inter_gbps=10.0, efficiency=0.5, intra_gbps=100.0)
    model = NeoXConfig(vocab_size=1000, hidden_size=128, num_layers=4, num_heads=4, max_position_embeddings=512)
    mesh = {"data": 2, "pipe": 2, "tensor": 2}  # tensor and pipe inside a 4-device node, data across nodes
    assert [link_gbps(toy, mesh, axis) for axis in ("tensor", "pipe", "data")] == [100, 100, 10]
    p = predict(model, mesh, seq_length=512, global_batch=16, microbatches=4, recomputed_forwards=1,
                traffic={"data": 2e9, "tensor": 5e9, "pipe": 1e9}, cluster=toy)
    matmul_params = model.num_params - 1000 * 128
    per_token = (2 * matmul_params + 4 * 4 * 512 * 128) * 4  # forward, backward (2x) and one recomputed forward
    compute = 16 * 512 * per_token / 8 / (312e12 * 0.5)  # the A100's dense bf16 peak
    assert executed_flops_per_token(model, 512, 1) == per_token
    assert p.compute_s == pytest.approx(compute) and p.bubble_s == pytest.approx(compute * 1 / 4)
    assert p.comm_s == pytest.approx({"data": 0.2, "tensor": 0.05, "pipe": 0.01})
    assert p.step_s == pytest.approx(compute * 1.25 + 0.26)
    assert p.tflops_paper == pytest.approx(flops_paper(model, 512, 16 * 512) / p.step_s / 8 / 1e12)


def test_the_paper_convention_reproduces_the_20b_figures():
    per_token = flops_paper(NeoXConfig.preset("neox-20b"), 2048, 1)
    assert per_token == pytest.approx(156.5e9, rel=1e-3)
    tokens_per_s = 117e12 * 96 / per_token
    assert 150_000 * 1536 * 2048 / tokens_per_s / 3600 == pytest.approx(1830, rel=0.01)  # the paper's 1,830 hours


@pytest.mark.parametrize("run", PUBLISHED, ids=lambda r: r.name)
def test_published_runs(run):
    """The efficiency constant comes from the 20B's run; the Megatron-LM runs up to 76B are predicted within 15%
    from their layouts alone. The 145B and 310B runs are under-predicted by 17-22% (docs/sharding.md says why);
    they are checked to stay so, so that a change of the model shows."""
    prediction, tflops = predict_published(run)
    error = tflops / run.reported - 1
    if run.name == "GPT-NeoX-20B":
        assert prediction.step_s == pytest.approx(43.9, rel=0.01)
    elif run.model.num_params < 100e9:
        assert abs(error) <= 0.15, error
    else:
        assert -0.25 <= error < -0.15, error


def test_a_cluster_from_yaml_and_bad_ones(tmp_path):
    f = tmp_path / "mine.yml"
    f.write_text("card: a100-80gb\ndevices_per_node: 8\ninter_gbps: 25\nefficiency: 0.46\n")
    mine = Cluster.get(str(f))
    assert mine == Cluster("mine", "a100-80gb", 8, 25, 0.46)
    assert (mine.peak_tflops, mine.link_gbps) == (312.0, 300.0)  # the card's, from neox_jax/gpus.py
    f.write_text("name: pcie\ncard: a100-80gb\ndevices_per_node: 8\ninter_gbps: 25\nefficiency: 0.46\n"
                 "intra_gbps: 32\n")
    assert Cluster.get(str(f)).link_gbps == 32 and Cluster.get(str(f)).name == "pcie"
    f.write_text("card: a100-80gb\n")
    with pytest.raises(ConfigError, match="missing: .*devices_per_node"):
        Cluster.get(str(f))
    f.write_text("card: v100\ndevices_per_node: 0\ninter_gbps: -25\nefficiency: 46\nintra_gbps: fast\n")
    with pytest.raises(ConfigError) as e:  # every mistake at once, each with its unit
        Cluster.get(str(f))
    assert str(e.value).splitlines() == [
        f"{f}: cluster 'mine':", "  card='v100': choose one of a100-40gb, a100-80gb, h100-80gb, h200-141gb, "
        "a6000-48gb, rtx3090ti-24gb", "  devices_per_node=0: a whole number of GPUs per node, at least 1",
        "  inter_gbps=-25: GB/s per GPU across nodes, above 0 (e.g. 12.5 for 4 x 200 Gb/s HDR shared by 8 GPUs)",
        "  intra_gbps='fast': GB/s per GPU and direction inside a node, 0 for the card's NVLink",
        "  efficiency=46: the fraction of peak the matmuls reach, in (0, 1] (0.46, not 46)"]
    with pytest.raises(ConfigError, match="--cluster 'nope': choose one of a100-40gb-paper"):
        Cluster.get("nope")
