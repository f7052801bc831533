"""DPO, KTO and reward models against PyTorch transcriptions of GPT-NeoX's (on transformers' models), on every
layout, and in a run."""

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


@pytest.mark.parametrize("mesh_shape, zero_stage, split", [
    pytest.param({"data": 4, "tensor": 2}, 1, False, marks=pytest.mark.slow),
    pytest.param({"data": 4, "tensor": 2}, 3, False, marks=pytest.mark.slow),
    ({"data": 2, "pipe": 2, "tensor": 2}, 1, False),
    pytest.param({"data": 4, "tensor": 2}, 3, True, marks=pytest.mark.slow)],
    ids=["data4xtensor2", "data4xtensor2-fsdp", "data2xpipe2xtensor2", "data4xtensor2-fsdp-sequence-parallel"])
def test_dpo_on_every_layout_equals_one_device(models, mesh_shape, zero_stage, split):
    _, _, weights, config, _ = models
    one = dpo_trainer(config, {"data": 1})
    tokens, labels = pair_batch(one, seed=3)
    state, ref = one.start_from(weights["policy"]), one.start_from(weights["reference"]).params
    want_loss, want = one.grads(state.params, one.put_batch(tokens, labels), 1.0, ref)
    tr = dpo_trainer(config.replace(sequence_parallel=split), mesh_shape, zero_stage=zero_stage)
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


def _pairs(folder, name, prompts, rng, trained_from=6, eos=0):
    """Pair files as GPT-NeoX's chat preprocessing writes them: a prompt (labels -100) and an answer, whose token the
    prompt's first token (one of 8) decides: the rule the chosen side follows and the rejected side breaks. The
    rest of each prompt is random, so held-out prompts are sequences the run never saw. Labels from position
    `trained_from` (6: the answer, DPO's --only-last; 10: the closing `eos` alone, --for-rm)."""
    from neox_jax.data.indexed import IndexedDatasetWriter

    files = {k: IndexedDatasetWriter(folder / f"{name}_{k}", np.int32) for k in
             ("chosen", "rejected", "chosen_label", "rejected_label")}
    for _ in range(prompts):
        prompt = np.concatenate([[rng.randint(8)], rng.randint(10, 200, 5)])
        for side, answer in (("chosen", 300 + prompt[0]), ("rejected", 300 + (prompt[0] + 3) % 8)):
            tokens = np.concatenate([prompt, [answer] * 4, [eos]])
            files[side].add_document(tokens)
            files[f"{side}_label"].add_document(np.where(np.arange(len(tokens)) < trained_from, -100, tokens))
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


@pytest.mark.slow
def test_the_planner_counts_the_reference_weights():
    from neox_jax.config import NeoXConfig
    from neox_jax.plan import plan

    model = NeoXConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64)
    base = TrainConfig(model=model, mesh={"data": 2, "pipe": 1, "tensor": 4}, seq_length=32, micro_batch_size=2)
    normal = plan(base, compiler="cpu")
    dpo = plan(base.replace(train_impl="dpo", data_paths=("c",), rejected_data_paths=("r",)), compiler="cpu")
    assert normal.reference == 0 and dpo.reference == dpo.params > 0
    assert dpo.activations_estimate > 1.9 * normal.activations_estimate  # a micro batch of pairs: twice the rows
    assert "reference weights (DPO, KTO: a frozen copy)" in dpo.report()


def gpt_neox_kto(policy, reference, tokens, labels, rewards, micro, beta, desirable, undesirable):
    """megatron/training.py's `train_impl == "kto"` branch, transcribed, once per micro batch of `micro` rows (rows
    in the loader's order: microstep, data replica, row), the losses averaged as DeepSpeed averages micro batches:
    token log-probabilities of the labels (-100 masked) from the logits of tokens[:, :-1], rewards[:, :-1] per token,
    each half of a micro batch against the other half's KL estimate."""
    import torch
    import torch.nn.functional as F

    def logp(model, ids, lab):
        logits = model(ids[:, :-1]).logits.float()
        target, mask = lab[:, 1:], (lab[:, 1:] >= 0).float()
        return torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0], mask

    flat = lambda x: torch.from_numpy(x.reshape(-1, x.shape[-1]))  # noqa: E731
    ids, lab, rew = flat(tokens).long(), flat(labels).long(), flat(rewards).float()[:, :-1]
    losses = []
    for lo in range(0, len(ids), micro):
        i, l, rewards_ = ids[lo:lo + micro], lab[lo:lo + micro], rew[lo:lo + micro]
        with torch.no_grad():
            ref_logp, loss_mask = logp(reference, i, l)
            ref_logp = ref_logp * loss_mask
            scaling = (rewards_.sum(-1) > 0.001).float() * desirable
            scaling += (rewards_.sum(-1) < -0.001).float() * undesirable
        chosen_logp = logp(policy, i, l)[0] * loss_mask
        pol_logp1, pol_logp2 = torch.chunk(chosen_logp, 2, 0)
        ref_logp1, ref_logp2 = torch.chunk(ref_logp, 2, 0)
        reward1, reward2 = torch.chunk(rewards_, 2, 0)
        scaling1, scaling2 = torch.chunk(scaling, 2, 0)
        kl1 = torch.clamp((pol_logp1 - ref_logp1).sum(-1), min=0).mean()
        kl2 = torch.clamp((pol_logp2 - ref_logp2).sum(-1), min=0).mean()
        log_ratio1, log_ratio2 = pol_logp1 - ref_logp1, pol_logp2 - ref_logp2
        loss = (0.5 * scaling1.mean(-1) * (1 - F.sigmoid(beta * reward1.mean(-1) * (log_ratio1.sum(-1)
                                                                                      - kl2.clone().detach())))
                + 0.5 * scaling2.mean(-1) * (1 - F.sigmoid(beta * reward2.mean(-1) * (log_ratio2.sum(-1)
                                                                                       - kl1.clone().detach()))))
        losses.append(loss.mean())
    return torch.stack(losses).mean()


def kto_batch(tr: Trainer, seed: int = 0):
    """Sequences as the loader makes them: a prompt masked with -100, an answer, padding (labels -100, reward 0);
    rewards +1 or -1 per document, 2 where two documents share a row (a packed row's second document: rewards
    differ within the row)."""
    a, rows, t = tr.batch_shape()
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 384, (a, rows, t))
    labels = np.full_like(tokens, -100)
    rewards = np.zeros_like(tokens)
    for k in range(a):
        for r in range(rows):
            prompt, end = 3 + (5 * r + k) % 7, t - (r + 2 * k) % 9
            labels[k, r, prompt:end] = tokens[k, r, prompt:end]
            rewards[k, r, :end] = 1 if rng.rand() < 0.5 else -1
            if r % 3 == 2:
                rewards[k, r, end // 2:end] = 2
            tokens[k, r, end:] = 0
    return tokens, labels, rewards


def kto_trainer(model, mesh_shape, **changes):
    mesh = make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
    cfg = TrainConfig(model=model, mesh=mesh_shape, seq_length=32, **{
        "micro_batch_size": 4, "grad_accum_steps": 2, "train_impl": "kto", "kto_beta": BETA,
        "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.5, "data_paths": ("d",), "reward_data_paths": ("r",),
        **changes})
    return Trainer(cfg, mesh)


def test_kto_loss_and_gradients_equal_gpt_neox_transcribed(models):
    policy, reference, weights, config, folder = models
    tr = kto_trainer(config, {"data": 2, "pipe": 1, "tensor": 2})
    state = tr.start_from(weights["policy"])
    ref_params = tr.start_from(weights["reference"]).params
    tokens, labels, rewards = kto_batch(tr)
    loss, grads = tr.grads(state.params, tr.put_batch(tokens, labels, rewards), 1.0, ref_params)
    ref_loss = gpt_neox_kto(policy, reference, tokens, labels, rewards, 4, BETA, 1.0, 1.5)
    policy.zero_grad(set_to_none=True)  # the module's models are shared: no gradient of another test's loss
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-6) and float(loss) > 0.1
    ref_grads = _as_ours(policy, folder / "kto_grads")
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    assert max_diff(grads, ref_grads) <= 1e-5 * scale


@pytest.mark.slow
def test_kto_pipelined_and_sharded_equals_one_device(models):
    """The same micro batches (a micro batch is one data replica's rows of a microstep: the KL estimate's halves) on
    one device and on (2, 2, 2) with the 1F1B pipeline."""
    _, _, weights, config, _ = models
    tr = kto_trainer(config, {"data": 2, "pipe": 2, "tensor": 2}, micro_batch_size=2)
    tokens, labels, rewards = kto_batch(tr, seed=5)
    state, ref = tr.start_from(weights["policy"]), tr.start_from(weights["reference"]).params
    loss, grads = tr.grads(state.params, tr.put_batch(tokens, labels, rewards), 1.0, ref)
    one = kto_trainer(config, {"data": 1}, micro_batch_size=2, grad_accum_steps=4)
    as_one = lambda x: x.reshape(one.batch_shape())  # noqa: E731  [2, 2 x 2 rows] -> [4 microsteps, 2 rows]
    state, ref = one.start_from(weights["policy"]), one.start_from(weights["reference"]).params
    want_loss, want = one.grads(state.params, one.put_batch(*map(as_one, (tokens, labels, rewards))), 1.0, ref)
    assert abs(float(loss) - float(want_loss)) <= 1e-6
    assert max_diff(grads, jax.tree.map(np.asarray, want)) <= 1e-5


def test_kto_settings_are_checked_together():
    from neox_jax.config import NeoXConfig
    from neox_jax.errors import ConfigError

    model = NeoXConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64)
    with pytest.raises(ConfigError) as e:
        TrainConfig(model=model, seq_length=32, micro_batch_size=3, train_impl="kto", kto_beta=0,
                    kto_undesirable_weight=-1, data_paths=("d",), valid_data_paths=("v",))
    for part in ("kto_beta=0", "kto_undesirable_weight=-1", "micro_batch_size=3: KTO", "needs reward_data_paths",
                 "without valid_reward_data_paths"):
        assert part in str(e.value)
    with pytest.raises(ConfigError, match="reward_data_paths is set but train_impl='normal'"):
        TrainConfig(model=model, seq_length=32, data_paths=("d",), reward_data_paths=("r",))


def _rated(folder, name, prompts, rng):
    """KTO files: a prompt (labels -100) and an answer whose token the prompt's first token decides; an answer that
    follows the rule has reward 1, one that breaks it -1 (GPT-NeoX's --binary-reward)."""
    from neox_jax.data.indexed import IndexedDatasetWriter

    files = {k: IndexedDatasetWriter(folder / f"{name}_{k}", np.int32) for k in ("text", "label", "reward")}
    for _ in range(prompts):
        prompt = np.concatenate([[rng.randint(8)], rng.randint(10, 200, 5)])
        good = rng.rand() < 0.5
        tokens = np.concatenate([prompt, [300 + (prompt[0] + (0 if good else 3)) % 8] * 4, [0]])
        files["text"].add_document(tokens)
        files["label"].add_document(np.where(np.arange(len(tokens)) < 6, -100, tokens))
        files["reward"].add_document([1 if good else -1])
    for f in files.values():
        f.finalize()
    return {k: str(folder / f"{name}_{k}") for k in files}


@pytest.mark.slow
def test_a_kto_run_starts_at_half_learns_held_out_sequences_and_resumes_exactly(tmp_path):
    from neox_jax.loop import train

    rng = np.random.RandomState(0)
    tr_files, va_files = _rated(tmp_path, "train", 256, rng), _rated(tmp_path, "valid", 64, rng)
    cfg = TrainConfig.from_dict(dict(
        model=dict(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                   max_position_embeddings=32, rotary_pct=0.25),
        mesh={"data": 4, "pipe": 1, "tensor": 2}, seq_length=16, micro_batch_size=4, train_iters=30, lr=3e-3,
        warmup=0, train_impl="kto", kto_beta=BETA, data_paths=[tr_files["text"]],
        label_data_paths=[tr_files["label"]], reward_data_paths=[tr_files["reward"]],
        valid_data_paths=[va_files["text"]], valid_label_data_paths=[va_files["label"]],
        valid_reward_data_paths=[va_files["reward"]], eval_interval=30, eval_iters=2, save=str(tmp_path / "run"),
        save_interval=30, log_interval=10))
    result = train(cfg, show_progress=False)
    # policy = reference: every log-ratio and KL estimate 0, each half's loss 0.5 x 1 x (1 - sigmoid(0))
    assert result.losses[0] == pytest.approx(0.5, abs=1e-6)
    assert result.eval_losses[30] < 0.8 * 0.5  # held-out sequences: prompts it never saw
    stopped = cfg.replace(save=str(tmp_path / "stopped"))
    train(stopped, max_steps=15, show_progress=False)
    resumed = train(stopped, show_progress=False)
    assert {s: resumed.losses[s] for s in range(15, 30)} == {s: result.losses[s] for s in range(15, 30)}
    assert max_diff(resumed.state.params, result.state.params) == 0.0


def rm_batch(tr: Trainer, seed: int = 0):
    """Pairs as GPT-NeoX's --for-rm files make them: a shared prompt, two answers of their own lengths, and one
    trained label per row, the closing end-of-text token (0 here), padding after it."""
    a, rows, t = tr.batch_shape()
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, 384, (a, rows, t))
    labels = np.full_like(tokens, -100)
    for k in range(a):
        for p in range(rows // 2):
            prompt = 4 + (3 * p + k) % 9
            tokens[k, 2 * p + 1, :prompt] = tokens[k, 2 * p, :prompt]
            for side, end in enumerate((t - 1 - (p % 5), t - 3 - (k + p) % 7)):
                tokens[k, 2 * p + side, end] = 0
                labels[k, 2 * p + side, end] = 0
                tokens[k, 2 * p + side, end + 1:] = 0
    return tokens, labels


def gpt_neox_rm(hf, tokens, labels, z_loss):
    """megatron/training.py's `train_impl == "rm"` branch, transcribed, on a transformers
    GPTNeoXForSequenceClassification: the score head on every position of tokens[:, :-1] (GPT-NeoX's rm_linear on
    the final LayerNorm's output), gathered where the shifted labels train, -logsigmoid(chosen - rejected) plus
    z_loss x (chosen^2 + rejected^2), averaged (GPT-NeoX puts the chosen rows first; the rows alternate here)."""
    import torch
    import torch.nn.functional as F

    ids, lab = (torch.from_numpy(x.reshape(-1, x.shape[-1])).long() for x in (tokens, labels))
    outputs = hf.score(hf.gpt_neox(ids[:, :-1]).last_hidden_state)
    loss_mask = (lab[:, 1:] >= 0).float()
    pos, neg = outputs[0::2], outputs[1::2]
    pos_loss_mask, neg_loss_mask = loss_mask[0::2], loss_mask[1::2]
    pos_indx = pos_loss_mask.nonzero()[:, 1].unsqueeze(1)
    neg_indx = neg_loss_mask.nonzero()[:, 1].unsqueeze(1)
    pos = torch.gather(pos.squeeze(), dim=1, index=pos_indx)
    neg = torch.gather(neg.squeeze(), dim=1, index=neg_indx)
    return (-F.logsigmoid(pos - neg).mean()) + ((z_loss * (pos ** 2 + neg ** 2)).mean())


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    require("torch")
    from flax import nnx

    from neox_jax.convert.hf_config import config_from_hf
    from neox_jax.pretrained import from_pretrained

    from .conftest import make_hf_model

    folder = tmp_path_factory.mktemp("rm")
    hf = make_hf_model(seed=2, classifier=True, max_position_embeddings=64)
    hf.save_pretrained(folder / "rm")
    weights = nnx.to_pure_dict(nnx.state(from_pretrained(folder / "rm"), nnx.Param))
    return hf, weights, config_from_hf(folder / "rm"), folder


def rm_trainer(model, mesh_shape, **changes):
    mesh = make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
    cfg = TrainConfig(model=model, mesh=mesh_shape, seq_length=32, **{
        "micro_batch_size": 4 // mesh.shape["data"], "grad_accum_steps": 2, "train_impl": "rm", "z_loss": 0.05,
        "data_paths": ("c",), "rejected_data_paths": ("r",), **changes})
    return Trainer(cfg, mesh)


def test_reward_model_loss_and_gradients_equal_gpt_neox_transcribed(reward_model):
    hf, weights, config, folder = reward_model
    assert config.num_labels == 1 and "score" in weights and "embed_out" not in weights
    tr = rm_trainer(config, {"data": 2, "pipe": 1, "tensor": 2})
    tokens, labels = rm_batch(tr)
    loss, grads = tr.grads(tr.start_from(weights).params, tr.put_batch(tokens, labels))
    ref_loss = gpt_neox_rm(hf, tokens, labels, 0.05)
    hf.zero_grad(set_to_none=True)
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss.detach()), abs=1e-6) and float(loss) > 0.1
    ref_grads = _as_ours(hf, folder / "rm_grads")
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    assert max_diff(grads, ref_grads) <= 1e-5 * scale


@pytest.mark.slow
def test_reward_model_pipelined_equals_one_device_and_learns_its_pairs(reward_model):
    _, weights, config, _ = reward_model
    one = rm_trainer(config, {"data": 1})
    tokens, labels = rm_batch(one, seed=4)
    want_loss, want = one.grads(one.start_from(weights).params, one.put_batch(tokens, labels))
    tr = rm_trainer(config, {"data": 2, "pipe": 2, "tensor": 2}, lr=1e-3, warmup=0)
    state = tr.start_from(weights)
    batch = tr.put_batch(tokens, labels)
    loss, grads = tr.grads(state.params, batch)
    assert abs(float(loss) - float(want_loss)) <= 1e-6 and max_diff(grads, jax.tree.map(np.asarray, want)) <= 1e-5
    for _ in range(5):
        state, metrics = tr.step(state, batch)
    assert float(metrics["loss"]) < float(loss) and float(metrics["accuracy"]) == 1.0


@pytest.mark.slow
def test_a_reward_model_starts_from_a_language_model_and_ranks_held_out_pairs(tmp_path, capsys):
    """GPT-NeoX's --for-rm pairs (only the closing token labelled); a run from a Hugging Face causal LM (its head
    replaced by a new score head) learns which answer follows the prompt's rule, on prompts it never saw, and its
    export is a GPTNeoXForSequenceClassification that ranks them the same."""
    require("torch")
    import torch
    import transformers

    from neox_jax import from_pretrained, save_pretrained
    from neox_jax.data.indexed import IndexedDataset
    from neox_jax.loop import train

    from .conftest import make_hf_model

    make_hf_model(max_position_embeddings=32).save_pretrained(tmp_path / "lm")
    rng = np.random.RandomState(0)
    tr_files, va_files = (_pairs(tmp_path, name, n, rng, trained_from=10, eos=2) for name, n in (("train", 256),
                                                                                                  ("valid", 32)))
    cfg = TrainConfig.from_dict(dict(
        model=dict(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160,
                   max_position_embeddings=32, rotary_pct=0.25, eos_token_id=2),
        mesh={"data": 4, "pipe": 1, "tensor": 2}, seq_length=16, micro_batch_size=2, train_iters=60, lr=1e-2,
        warmup=0, train_impl="rm", init_from=str(tmp_path / "lm"), data_paths=[tr_files["chosen"]],
        rejected_data_paths=[tr_files["rejected"]], label_data_paths=[tr_files["chosen_label"]],
        rejected_label_data_paths=[tr_files["rejected_label"]], valid_data_paths=[va_files["chosen"]],
        valid_rejected_data_paths=[va_files["rejected"]], valid_label_data_paths=[va_files["chosen_label"]],
        valid_rejected_label_data_paths=[va_files["rejected_label"]], eval_interval=20, eval_iters=2,
        save=str(tmp_path / "run"), save_interval=60, log_interval=10))
    result = train(cfg, show_progress=False)
    assert "a new score head in place of the language-model head" in capsys.readouterr().out
    assert result.eval_losses[60] < 0.3 * math.log(2)  # held-out pairs: prompts it never saw
    save_pretrained(from_pretrained(tmp_path / "run"), tmp_path / "hf_rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf_rm").eval()
    chosen, rejected = (IndexedDataset(va_files[side]) for side in ("chosen", "rejected"))
    with torch.no_grad():
        margin = [float(hf(torch.tensor([chosen.get(i).tolist()])).logits
                        - hf(torch.tensor([rejected.get(i).tolist()])).logits) for i in range(len(chosen.sizes))]
    assert np.mean(np.array(margin) > 0) >= 0.9
