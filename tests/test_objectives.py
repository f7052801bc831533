"""DPO against a PyTorch transcription of GPT-NeoX's (transformers' logits), on every layout, and in a run."""

import math

import jax
import numpy as np
import pytest

from neox_jax.config import TrainConfig
from neox_jax.sharding import make_mesh
from neox_jax.train import Trainer

from .conftest import max_diff, require
from .test_train import _as_ours

BETA = 0.5


def pair_batch(tr: Trainer, seed: int = 0):
    """Pairs as the loader makes them (rows alternate chosen, rejected): a shared prompt masked with -100, answers
    of different lengths, padding labelled -100."""
    a, rows, t = tr.batch_shape()
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 384, (a, rows, t))
    labels = np.full_like(tokens, -100)
    for k in range(a):
        for p in range(rows // 2):
            prompt, ends = 4 + (3 * p + k) % 9, [t - (p % 5), t - 2 - (k + p) % 7]
            tokens[k, 2 * p + 1, :prompt] = tokens[k, 2 * p, :prompt]
            for side, end in enumerate(ends):
                labels[k, 2 * p + side, prompt:end] = tokens[k, 2 * p + side, prompt:end]
                tokens[k, 2 * p + side, end:] = 0
    return tokens, labels


def gpt_neox_dpo(policy, reference, tokens, labels, beta):
    """megatron/training.py's `train_impl == "dpo"` branch, transcribed: sequence log-probabilities of the labels
    (-100 masked) from the logits of tokens[:, :-1], the reference's without gradient, -logsigmoid(beta x margin)
    averaged over pairs (GPT-NeoX puts the chosen rows first and the rejected after; the rows alternate here)."""
    import torch
    import torch.nn.functional as F

    def logp(model, ids, lab):
        logits = model(ids[:, :-1]).logits.float()
        target, mask = lab[:, 1:], lab[:, 1:] >= 0
        token = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        return (token * mask).sum(-1)

    ids, lab = torch.from_numpy(tokens.reshape(-1, tokens.shape[-1])).long(), torch.from_numpy(
        labels.reshape(-1, labels.shape[-1])).long()
    with torch.no_grad():
        ref = logp(reference, ids, lab)
    pi = logp(policy, ids, lab)
    logits = (pi[0::2] - pi[1::2]) - (ref[0::2] - ref[1::2])
    return -F.logsigmoid(beta * logits).mean()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    require("torch")
    from flax import nnx

    from neox_jax.convert.hf_config import config_from_hf
    from neox_jax.pretrained import from_pretrained

    from .conftest import make_hf_model

    folder = tmp_path_factory.mktemp("dpo")
    policy, reference = make_hf_model(seed=0, max_position_embeddings=64), make_hf_model(seed=1,
                                                                                         max_position_embeddings=64)
    for name, m in (("policy", policy), ("reference", reference)):
        m.save_pretrained(folder / name)
    weights = {name: nnx.to_pure_dict(nnx.state(from_pretrained(folder / name), nnx.Param))
               for name in ("policy", "reference")}
    return policy, reference, weights, config_from_hf(folder / "policy"), folder


def dpo_trainer(model, mesh_shape, **changes):
    mesh = make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
    cfg = TrainConfig(model=model, mesh=mesh_shape, seq_length=32, micro_batch_size=4 // mesh.shape["data"],
                      grad_accum_steps=2, train_impl="dpo", dpo_beta=BETA, data_paths=("c",),
                      rejected_data_paths=("r",), **changes)
    return Trainer(cfg, mesh)


def test_dpo_loss_and_gradients_equal_gpt_neox_transcribed(models):
    policy, reference, weights, config, folder = models
    tr = dpo_trainer(config, {"data": 2, "pipe": 1, "tensor": 2})
    state = tr.start_from(weights["policy"])
    ref_params = tr.start_from(weights["reference"]).params
    tokens, labels = pair_batch(tr)
    loss, grads = tr.grads(state.params, tr.put_batch(tokens, labels), 1.0, ref_params)
    # GPT-NeoX's loss is per micro batch, averaged: every micro batch has the same number of pairs, so it is the
    # mean over all pairs, one call here
    ref_loss = gpt_neox_dpo(policy, reference, tokens, labels, BETA)
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-5) and float(loss) > 0.1
    ref_grads = _as_ours(policy, folder / "grads")
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    assert max_diff(grads, ref_grads) <= 1e-5 * scale


@pytest.mark.parametrize("mesh_shape, zero_stage", [({"data": 4, "tensor": 2}, 1), ({"data": 4, "tensor": 2}, 3),
                                                    ({"data": 2, "pipe": 2, "tensor": 2}, 1)],
                         ids=["data4xtensor2", "data4xtensor2-fsdp", "data2xpipe2xtensor2"])
def test_dpo_on_every_layout_equals_one_device(models, mesh_shape, zero_stage):
    _, _, weights, config, _ = models
    one = dpo_trainer(config, {"data": 1})
    tokens, labels = pair_batch(one, seed=3)
    state, ref = one.start_from(weights["policy"]), one.start_from(weights["reference"]).params
    want_loss, want = one.grads(state.params, one.put_batch(tokens, labels), 1.0, ref)
    tr = dpo_trainer(config, mesh_shape, zero_stage=zero_stage)
    state, ref = tr.start_from(weights["policy"]), tr.start_from(weights["reference"]).params
    loss, grads = tr.grads(state.params, tr.put_batch(tokens, labels), 1.0, ref)
    assert abs(float(loss) - float(want_loss)) <= 1e-5  # fp32 sums in another order, as the plain loss's layouts
    assert max_diff(grads, jax.tree.map(np.asarray, want)) <= 1e-5


def test_dpo_starts_at_ln2_with_zero_rewards_and_keeps_its_reference(models):
    _, _, weights, config, _ = models
    tr = dpo_trainer(config, {"data": 2, "pipe": 1, "tensor": 1}, lr=1e-3, warmup=0)
    state = tr.start_from(weights["policy"])
    reference = jax.tree.map(np.asarray, state.reference)
    tokens, labels = pair_batch(tr)
    batch = tr.put_batch(tokens, labels)
    state, metrics = tr.step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert float(metrics["chosen_rewards"]) == float(metrics["rejected_rewards"]) == 0.0
    state, metrics = tr.step(state, batch)
    assert float(metrics["loss"]) < math.log(2) and float(metrics["reward_acc"]) > 0.5  # it learns the pairs
    assert max_diff(state.reference, reference) == 0.0  # the reference never moves


def _pairs(folder, name, prompts, rng):
    """Pair files as GPT-NeoX's chat preprocessing writes them: a prompt (labels -100) and an answer, whose token the
    prompt's first token (one of 8) decides: the rule the chosen side follows and the rejected side breaks. The
    rest of each prompt is random, so held-out prompts are sequences the run never saw."""
    from neox_jax.data.indexed import IndexedDatasetWriter

    files = {k: IndexedDatasetWriter(folder / f"{name}_{k}", np.int32) for k in
             ("chosen", "rejected", "chosen_label", "rejected_label")}
    for _ in range(prompts):
        prompt = np.concatenate([[rng.randint(8)], rng.randint(10, 200, 5)])
        for side, answer in (("chosen", 300 + prompt[0]), ("rejected", 300 + (prompt[0] + 3) % 8)):
            tokens = np.concatenate([prompt, [answer] * 4, [0]])
            files[side].add_document(tokens)
            files[f"{side}_label"].add_document(np.where(np.arange(len(tokens)) < 6, -100, tokens))
    for f in files.values():
        f.finalize()
    return {k: str(folder / f"{name}_{k}") for k in files}


@pytest.mark.slow
def test_a_dpo_run_learns_a_rule_on_held_out_pairs_and_resumes_exactly(tmp_path):
    from neox_jax.data.dataset import GlobalBatches
    from neox_jax.data.loader import LocalBatches
    from neox_jax.loop import _datasets, train

    rng = np.random.RandomState(0)
    tr_files, va_files = _pairs(tmp_path, "train", 256, rng), _pairs(tmp_path, "valid", 64, rng)
    cfg = TrainConfig.from_dict(dict(
        model=dict(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                   max_position_embeddings=32, rotary_pct=0.25),
        mesh={"data": 8, "pipe": 1, "tensor": 1}, seq_length=16, micro_batch_size=2, train_iters=40, lr=3e-3,
        warmup=0, train_impl="dpo", dpo_beta=BETA, data_paths=[tr_files["chosen"]],
        rejected_data_paths=[tr_files["rejected"]], label_data_paths=[tr_files["chosen_label"]],
        rejected_label_data_paths=[tr_files["rejected_label"]], valid_data_paths=[va_files["chosen"]],
        valid_rejected_data_paths=[va_files["rejected"]], valid_label_data_paths=[va_files["chosen_label"]],
        valid_rejected_label_data_paths=[va_files["rejected_label"]], eval_interval=40, eval_iters=2,
        save=str(tmp_path / "run"), save_interval=40, log_interval=10))
    result = train(cfg, show_progress=False)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the run starts at its own reference
    assert result.eval_losses[40] < 0.5 * math.log(2)  # held-out pairs: prompts it never saw
    stopped = cfg.replace(save=str(tmp_path / "stopped"))  # stopped at 20 and resumed: the same run, bit for bit
    train(stopped, max_steps=20, show_progress=False)
    resumed = train(stopped, show_progress=False)
    assert {s: resumed.losses[s] for s in range(20, 40)} == {s: result.losses[s] for s in range(20, 40)}
    assert max_diff(resumed.state.params, result.state.params) == 0.0

    tr = Trainer(cfg, make_mesh(cfg.mesh))
    valid = LocalBatches(GlobalBatches(_datasets(cfg, tr.global_batch_size)[1], 1, 2, 8), tr.batch_sharding,
                         cfg.seq_length)
    metrics = jax.jit(tr.under_mesh(lambda p, b, r: tr.preference(p, r, *tr.targets(b, "tokens"))[1]))
    acc = [float(metrics(result.state.params, valid.device_batch(i), result.state.reference)["reward_acc"])
           for i in range(2)]
    assert np.mean(acc) >= 0.85  # chance is 0.5


def test_the_planner_counts_the_reference_weights():
    from neox_jax.config import NeoXConfig
    from neox_jax.plan import plan

    model = NeoXConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64)
    base = TrainConfig(model=model, mesh={"data": 2, "pipe": 1, "tensor": 4}, seq_length=32, micro_batch_size=2)
    normal = plan(base, compiler="cpu")
    dpo = plan(base.replace(train_impl="dpo", data_paths=("c",), rejected_data_paths=("r",)), compiler="cpu")
    assert normal.reference == 0 and dpo.reference == dpo.params > 0
    assert dpo.activations_estimate > 1.9 * normal.activations_estimate  # a micro batch of pairs: twice the rows
    assert "DPO reference weights (frozen copy)" in dpo.report()
