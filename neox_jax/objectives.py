"""What a step minimises, beyond plain next-token prediction: per-token log-probabilities, DPO, KTO and reward models.

Every objective reaches the train step as token weights (train.py's `Trainer.targets`): the step's gradient is
the gradient of the weighted sum of token cross-entropies, which the chunked `train.output_cross_entropy`
computes with the loss. A preference objective's gradient is such a sum too, with weights computed from the
current log-probabilities: for DPO, L = mean over pairs of -log sigmoid(beta x margin), margin = (chosen - rejected
log-probability) minus the reference's, so dL/d(chosen log p) = -c and dL/d(rejected log p) = +c with
c = beta x sigmoid(-beta x margin) / pairs; a sequence's log p is minus the sum of its trained tokens'
cross-entropies, so the chosen tokens weigh +c and the rejected -c. The log-probabilities are computed first, in
a forward pass without gradients (the policy's and the reference's), then the weighted step runs as any other.
KTO's loss depends on each sequence's log-ratio to the reference alone (its KL estimate is held constant), so its
gradient is such a sum as well. A reward model's loss depends on each sequence's score, the score head's output at
one position: its gradient is that of the weighted sum of the scores (`score_loss`), the weights dL/dscore.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neox_jax.model import GPTNeoX, output_logits

F32 = jnp.float32
LOSS_CHUNK = 512  # sequence positions whose fp32 logits exist at once in a loss or its log-probabilities


def position_chunks(chunk: int, *arrays_bt):
    """[b, t, ...] arrays cut along the sequence into pieces of the largest divisor of t up to `chunk`, the pieces
    leading: [t / c, b, c, ...] (a `lax.scan` runs over them; `joined` undoes it)."""
    b, t = arrays_bt[0].shape[:2]
    c = max(n for n in range(1, min(chunk, t) + 1) if t % n == 0)
    return tuple(x.reshape(b, t // c, c, *x.shape[2:]).swapaxes(0, 1) for x in arrays_bt)


def joined(x_nbc):
    """[t / c, b, c, ...] -> [b, t, ...]."""
    n, b, c = x_nbc.shape[:3]
    return x_nbc.swapaxes(0, 1).reshape(b, n * c, *x_nbc.shape[3:])


def token_logprobs(model: GPTNeoX, x_btd, labels_bt, chunk: int = LOSS_CHUNK):
    """(log p(label) [b, t] in fp32, whether the label is the argmax [b, t]) from the last layer's output `x_btd`,
    run over the sequence `chunk` positions at a time (the largest divisor of its length up to `chunk`), so the
    whole [b, t, vocab] logits never exist. No gradient is meant to flow through it."""
    h_btd = model.final_hidden(x_btd)
    kernel_dv = model.output_kernel(h_btd.dtype)

    def piece(_, h_and_labels):
        h_bcd, labels_bc = h_and_labels
        logits_bcv = output_logits(h_bcd, kernel_dv).astype(F32)
        target_bc = jnp.take_along_axis(logits_bcv, labels_bc[..., None], axis=-1)[..., 0]
        logp_bc = target_bc - jax.nn.logsumexp(logits_bcv, axis=-1)
        return None, (logp_bc, jnp.argmax(logits_bcv, axis=-1) == labels_bc)

    _, (logp, greedy) = jax.lax.scan(piece, None, position_chunks(chunk, h_btd, labels_bt))
    return joined(logp), joined(greedy)


def dpo(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """DPO (Rafailov et al. 2023, as GPT-NeoX computes it) from sequence log-probabilities [pairs]: (the mean loss,
    the chosen sequences' gradient weight c [pairs] — the rejected ones' is -c —, metrics)."""
    margin = (chosen - rejected) - (ref_chosen - ref_rejected)
    loss = jnp.mean(-jax.nn.log_sigmoid(beta * margin))
    c = beta * jax.nn.sigmoid(-beta * margin) / margin.size
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    metrics = {"chosen_rewards": chosen_rewards.mean(), "rejected_rewards": rejected_rewards.mean(),
               "reward_acc": (chosen_rewards > rejected_rewards).astype(F32).mean(),
               "margins": (chosen_rewards - rejected_rewards).mean(),
               "chosen_logp": chosen.mean(), "rejected_logp": rejected.mean()}
    return loss, c, metrics


def kto(policy, reference, rewards_bt, keep_bt, data: int, beta: float, desirable: float, undesirable: float):
    """KTO (Ethayarajh et al. 2024) as GPT-NeoX computes it, from sequence log-probabilities [accum, rows] and the
    rewards of the tokens [accum, rows, seq]: (the step's loss, each row's gradient weight c [accum, rows] — its
    trained tokens weigh c —, metrics).

    A micro batch is each data replica's rows of one microstep, and is cut into halves. Row i of a half has the
    log-ratio r_i = policy_i - reference_i and the reward R_i, the mean of its tokens' rewards (padding's 0 counted,
    as GPT-NeoX's `reward.mean(-1)`); the half's weight S is the mean over its rows of `desirable` (reward sum
    > 0.001) or `undesirable` (< -0.001); its KL estimate is the mean of max(r_i, 0), taken from the other half and
    held constant. The micro batch's loss is the mean over i of 0.5 x S x (1 - sigmoid(beta x R_i x (r_i - KL)))
    summed over the two halves; the step's loss is the mean over micro batches, as DeepSpeed averages them."""
    a, rows = policy.shape
    split = lambda x: x.reshape(a, data, 2, rows // data // 2, *x.shape[2:])  # noqa: E731  [a, data, half, i, ...]
    ratio = split(policy - reference)
    mean_reward = split(rewards_bt.mean(-1))
    total = split(rewards_bt.sum(-1))
    scale = ((total > 0.001) * desirable + (total < -0.001) * undesirable).mean(-1, keepdims=True)
    kl = jax.lax.stop_gradient(jnp.maximum(ratio, 0).mean(-1, keepdims=True))
    z = beta * mean_reward * (ratio - kl[:, :, ::-1])  # each half against the other half's KL
    micro = 0.5 * scale * (1 - jax.nn.sigmoid(z))
    loss = micro.sum(2).mean(-1).mean()
    # d loss / d r_i; a row's log-probability is minus the sum of its tokens' cross-entropies
    c = 0.5 * scale * jax.nn.sigmoid(z) * jax.nn.sigmoid(-z) * beta * mean_reward / (a * data * (rows // data // 2))
    metrics = {"kl": jnp.sum(policy - reference) / jnp.maximum(keep_bt.sum(), 1),  # per trained token
               "reward_acc": (mean_reward * ratio > 0).astype(F32).mean(),  # the log-ratio has the reward's sign
               "policy_logp": policy.mean(), "ref_logp": reference.mean()}
    return loss, c.reshape(a, rows), metrics


def reward_model(chosen, rejected, z_loss: float):
    """A reward model's pairwise loss as GPT-NeoX computes it, from the scores [pairs] of the chosen and rejected
    sequences: (mean of -log sigmoid(chosen - rejected) + z_loss x mean of (chosen^2 + rejected^2), dL/d chosen,
    dL/d rejected, metrics)."""
    margin = chosen - rejected
    loss = jnp.mean(-jax.nn.log_sigmoid(margin)) + z_loss * jnp.mean(chosen ** 2 + rejected ** 2)
    n = margin.size
    d_chosen = (-jax.nn.sigmoid(-margin) + 2 * z_loss * chosen) / n
    d_rejected = (jax.nn.sigmoid(-margin) + 2 * z_loss * rejected) / n
    metrics = {"pos_values": chosen.mean(), "neg_values": rejected.mean(), "margin": margin.mean(),
               "accuracy": (margin > 0).astype(F32).mean()}
    return loss, d_chosen, d_rejected, metrics


def score_loss(model: GPTNeoX, x_btd, targets):
    """The sum of the score head's outputs weighted by `targets` (labels, unused; weights [b, t]): the loss whose
    gradient is a reward model's, given the weights dL/dscore where each sequence is scored (the pipeline's and the
    microstep scan's loss, as `train.lm_loss` is the language model's)."""
    _, weights_bt = targets
    return jnp.sum(model.scores(x_btd)[..., 0] * weights_bt)


def last_trained(keep_bt):
    """One-hot [b, t] of each row's last trained position (the one a reward model scores: GPT-NeoX's --for-rm data
    trains only the closing token, whose input position is that one)."""
    t = keep_bt.shape[-1]
    last = t - 1 - jnp.argmax(keep_bt[..., ::-1], axis=-1)
    return (jnp.arange(t) == last[..., None]) & keep_bt.any(-1, keepdims=True)
