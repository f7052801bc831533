"""GPU programs compiled here by XLA's own GPU compiler (compile-only devices, neox_jax/gpus.py): the train step with
cuDNN attention on every layout, the planner's figures from it, the decode step's memory and bound, and the CPU's
choices kept in a process that has the CUDA plugin. Needs the gpu-plan extra (CI installs it)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from neox_jax import gpus
from neox_jax.config import NeoXConfig, TrainConfig
from tests.conftest import require_gpu_plan

pytestmark = pytest.mark.usefixtures("gpu_plan")


@pytest.fixture(scope="module")
def gpu_plan():
    require_gpu_plan()


@pytest.mark.parametrize("name", list(gpus.CARDS))
def test_every_card_renders_compile_only_devices_over_hosts(name):
    devices = gpus.topology(name, hosts=2, per_host=2)
    card = gpus.CARDS[name]
    assert [d.device_kind for d in devices] == [card.product] * 4
    assert [d.process_index for d in devices] == [0, 0, 1, 1] and devices[0].platform == "gpu"
    assert f"core_count: {card.sms}" in gpus.target_config(card)
    major, minor, _ = gpus.cudnn_version()
    assert f"dnn_version_info {{ major: {major} minor: {minor}" in gpus.target_config(card)


def small(mesh, zero_stage=1, remat="full"):
    return TrainConfig.from_dict({"model": {"preset": "pythia-14m", "num_layers": 2, "remat_policy": remat},
                                  "mesh": dict(zip(("data", "pipe", "tensor"), mesh)), "seq_length": 128,
                                  "micro_batch_size": 2, "grad_accum_steps": 2, "precision": "bf16",
                                  "zero_stage": zero_stage})


@pytest.mark.slow
@pytest.mark.parametrize("mesh,zero_stage", [((8, 1, 1), 1), ((8, 1, 1), 3), ((2, 1, 4), 1), ((2, 2, 2), 1),
                                             ((1, 1, 1), 1)],
                         ids=["zero1-8x1x1", "fsdp-8x1x1", "2x1x4", "pipelined-2x2x2", "one-device"])
def test_the_step_compiles_for_h100s_with_cudnn_attention_in_every_layer(mesh, zero_stage):
    """The step with `attention: auto` compiled by XLA's GPU compiler for 1 x 8 (or 1 x 1) H100s: cuDNN's forward and
    backward calls as often as the layers, microbatches and recomputation imply (the pipeline: every tick of every
    stage), XLA's argument bytes exactly the sharded state and this device's batch rows, every collective of the GPU
    program asynchronous and sending no more than the partitioned program."""
    from neox_jax.plan import plan

    cfg = small(mesh, zero_stage)
    p = plan(cfg, "h100-80gb", hosts=1, compiler="gpu")
    layers, accum = cfg.model.num_layers, cfg.grad_accum_steps
    if p.stages > 1:  # L / P layers per stage, a forward and a recomputed one per tick, M + P - 1 ticks
        ticks = p.microbatches + p.stages - 1
        forwards, backwards = 2 * layers // p.stages * ticks, layers // p.stages * ticks
    else:  # each layer once forward and once recomputed (remat full) per microstep
        forwards, backwards = 2 * layers * accum, layers * accum
    assert p.kernels["cuDNN attention forward"] == forwards and p.kernels["cuDNN attention backward"] == backwards
    assert p.kernels["cuBLAS GEMM"] > 0 and p.forwards_per_layer == forwards / (layers // p.stages) / max(
        p.microbatches, accum)
    rows = accum * cfg.micro_batch_size * (cfg.seq_length + 1) * 4  # int32 [accum, micro, seq + 1] of one replica
    assert p.xla_argument == p.params + p.master + p.opt_state + rows + 8  # + the step and update counters
    assert p.fits and p.xla_temp > 0
    assert all(a == n for a, n in p.collective_ops.values()), p.collective_ops
    # the GPU passes send no more than the partitioned program counts (beyond a few scalars: the loss's sums)
    assert all(sent <= p.collectives.get(axes, 0) + 1024 for axes, sent in p.gpu_collectives.items()), (
        p.gpu_collectives, p.collectives)
    assert bool(p.collective_ops) == (np.prod(mesh) > 1)


def test_auto_attention_follows_the_mesh_s_devices_in_one_process():
    """The same config traced for a GPU mesh calls cuDNN; for this process's CPU devices it does not."""
    from neox_jax.sharding import make_mesh
    from neox_jax.train import Trainer

    cfg = small((1, 1, 1))
    for devices, cudnn in ((gpus.topology("h100-80gb", 1, 1), True), (jax.devices()[:1], False)):
        tr = Trainer(cfg, make_mesh(cfg.mesh, devices))
        text = tr.step.lower(tr.abstract_state(), tr.abstract_batch()).as_text()
        assert ("__cudnn$fmha" in text) == cudnn
        assert tr.platform == ("gpu" if cudnn else "cpu")
        assert ("xla_gpu_enable_latency_hiding_scheduler" in tr.compiler_options) == cudnn


def test_the_decode_step_holds_weights_and_cache_and_its_bound_by_hand():
    """pythia-70m-sized in bf16, tensor=2, batch 4, context 256 on a100-40gb: the decode step's arguments are the
    weights and the cache a device holds (plus the small state); the HBM bound is bandwidth over those bytes."""
    from neox_jax.plan_generate import plan_generate

    config = NeoXConfig.preset("pythia-70m")
    p = plan_generate(config, "pythia-70m", "a100-40gb", tensor=2, batch=4, context=256)
    h, layers, vocab = config.hidden_size, config.num_layers, config.vocab_size
    weights = 2 * sum(n for n in (  # bf16 bytes per device: split over tensor but LayerNorms and row-parallel biases
        vocab * h // 2 * 2,  # embed_in, embed_out (vocab-parallel)
        layers * (3 * h * h + 3 * h) // 2, layers * (h * h) // 2 + layers * h,  # QKV + bias, dense + its bias
        layers * (4 * h * h + 4 * h) // 2, layers * (4 * h * h) // 2 + layers * h,  # MLP in + bias, out + bias
        layers * 4 * h + 2 * h))  # four LayerNorm vectors per layer, the final LayerNorm
    cache = 2 * layers * 4 * (config.num_heads // 2) * 256 * config.head_dim * 2  # k and v, bf16
    assert (p.weights, p.cache) == (weights, cache)
    small_state = 4 * 256 * 4 + 4 * 64 * 4 + 4 * vocab * 4 + 64  # mask, out, fp32 logits, counters and knobs
    assert weights + cache <= p.decode.argument <= weights + cache + small_state
    assert p.decode.alias >= cache and p.decode.temp < weights  # the cache is updated in place
    assert p.tokens_per_s_bound == pytest.approx(4 * 1555e9 / (weights + cache))
    assert p.fits and "decode bound by HBM bandwidth" in p.report()


def test_a_cpu_run_keeps_its_emulated_devices_and_choices_beside_the_cuda_plugin(tmp_path):
    """With the CUDA plugin installed and JAX_PLATFORMS unset (no driver here), a CPU process still counts as
    CPU-only: the demo's 8 emulated devices with 8 runtime threads each, the host allocator setting, the CPU's
    attention."""
    code = ("import os; from neox_jax import distributed, host_malloc; distributed.emulate_cpu_devices(8); "
            "host_malloc.reuse_freed_memory(); "
            "import jax, jax.numpy as jnp; from neox_jax.attention import attention_backend; "
            "print(sorted(distributed._accelerator_plugins()), len(jax.devices()), jax.default_backend(), "
            "host_malloc.state(), attention_backend('auto', jnp.bfloat16, 64, True), "
            "sum(open(f'/proc/self/task/{t}/comm').read() == 'tf_XLAEigen\\n' for t in os.listdir('/proc/self/task')))")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "PJRT_NPROC")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("] ")[1].split() == ["8", "cpu", "reuse", "blocks", "64"]
    assert "xla_cuda12" in out.stdout.split("]")[0]


@pytest.mark.slow
@pytest.mark.parametrize("args,expect", [
    (["{config}", "--mesh", "data=2,tensor=2", "--cluster", "h100-80gb-ib"],
     ["compiled by XLA's GPU compiler for 1 x 4 h100-80gb", "cuDNN attention forward",
      "predicted on h100-80gb-ib (8 x h100-80gb per node"]),
    (["--generate", "pythia-14m", "--target", "rtx3090ti-24gb", "--mesh", "tensor=2", "--context", "128"],
     ["on 2 x rtx3090ti-24gb (tensor=2), batch 1, context 128", "-> fits", "decode bound by HBM bandwidth"])],
    ids=["train", "generate"])
def test_the_cli_compiles_for_gpus_in_a_process_without_jax_platforms(args, expect, tmp_path):
    """`neox-jax plan` as a user runs it (JAX_PLATFORMS unset, no GPU, no driver): the CUDA plugin must still start
    for compiling."""
    config = tmp_path / "small.yml"
    config.write_text("model: {preset: pythia-14m, num_layers: 2}\nseq_length: 128\nmicro_batch_size: 2\n"
                      "precision: bf16\n")
    args = [a.format(config=config) for a in args]
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-m", "neox_jax.cli", "plan", *args], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for text in expect:
        assert text in out.stdout, (text, out.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("head", [64, 80, 96, 128, 256])
def test_cudnn_takes_every_pythia_head_size_but_256(head):
    """Heads of 64 (pythia-70m..410m), 80 (pythia-2.8b), 96 (the 20B), 128 (1.4b, 6.9b, 12b) run cuDNN on an H100;
    pythia-1b's 256 is beyond the kernel and takes the einsum (`attention.attention_backend`)."""
    from neox_jax.hlo import kernel_calls
    from neox_jax.sharding import make_mesh
    from neox_jax.train import Trainer

    cfg = TrainConfig.from_dict({"model": {"vocab_size": 512, "hidden_size": 2 * head, "num_layers": 1,
                                           "num_heads": 2, "max_position_embeddings": 128},
                                 "mesh": {"data": 1}, "seq_length": 64, "micro_batch_size": 1, "precision": "bf16"})
    tr = Trainer(cfg, make_mesh(cfg.mesh, gpus.topology("h100-80gb", 1, 1)))
    hlo = tr.step.lower(tr.abstract_state(), tr.abstract_batch()).compile(gpus.DEVICELESS_OPTIONS).as_text()
    calls = kernel_calls(hlo)
    fused = (1, 1) if head <= 128 else (0, 0)
    assert (calls.get("cuDNN attention forward", 0), calls.get("cuDNN attention backward", 0)) == fused


def test_bad_plans_are_refused_naming_every_setting_before_compiling():
    from neox_jax.errors import ConfigError
    from neox_jax.plan_generate import plan_generate

    with pytest.raises(ConfigError, match="--batch=0: must be at least 1\n.*--context 99999 exceeds the model's "
                                          "max_position_embeddings=2048\n.*--mesh tensor=3 does not divide "
                                          "num_heads=8"):
        plan_generate(NeoXConfig.preset("pythia-70m"), "pythia-70m", "a6000-48gb", tensor=3, batch=0, context=99999)
    with pytest.raises(ConfigError, match="--target 'v100': choose one of a100-40gb, a100-80gb, h100-80gb"):
        gpus.topology("v100")


@pytest.mark.parametrize("args, says", [
    (["--generate", "pythia-14m", "--seq-length", "128"], "--seq-length apply to training plans"),
    (["configs/tiny-cpu.yml", "--context", "128"], "--context plan a generation: add --generate MODEL"),
    (["configs/tiny-cpu.yml", "--device", "h100-80gb"], "--device is now --target"),
    (["configs/tiny-cpu.yml", "--target", "a100-80gb", "--cluster", "a100-40gb-paper"],
     "--target a100-80gb but --cluster a100-40gb-paper has a100-40gb"),
])
def test_plan_refuses_flags_that_do_not_apply(args, says, capsys):
    from neox_jax.cli import main as cli

    with pytest.raises(SystemExit) as e:
        cli(["plan", *args])
    assert says in str(e.value)
