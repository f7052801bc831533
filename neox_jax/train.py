"""Train state and the sharded train step.

The state is plain pytrees (nested dicts of arrays), so Orbax saves it and any mesh restores it:

    step        steps taken (skipped steps included)
    updates     updates applied (steps skipped for non-finite gradients not): the learning-rate schedule's step
    params      working weights in the precision's dtype (bf16 / fp16 / fp32), laid out by the rules table
    master      fp32 copy of the weights when the working dtype is lower (None in fp32), ZeRO-1 layout
    opt_state   AdamW moments, ZeRO-1 layout (split over `data` as well)
    loss_scale  DeepSpeed-style dynamic loss scale (fp16 only, else None)
    reference   DPO's and KTO's reference model: the weights the run started from, never updated (else None)

The loss is a weighted sum of token losses, each token's weight its share of the step's loss (`Trainer.targets`: 0
where a label file masks it), so it adds exactly across microbatches and replicas however unevenly rows are masked.
One step: for each microbatch (a scan, or the pipeline's), loss and gradients w.r.t. the working weights, summed on
each data replica in `grad_accum_dtype`; one reduce-scatter per tensor over `data` brings the sums into the ZeRO
layout (once per step, as DeepSpeed); AdamW updates the master shards; the new working weights are cast and all-
gathered back to their layout. A step whose loss or gradient is not finite changes nothing but the counters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from neox_jax import dropout, matmul
from neox_jax import sharding as shd
from neox_jax.config import TrainConfig
from neox_jax.errors import ConfigError
from neox_jax.model import GPTNeoX, abstract_model, init_scale, output_logits
from neox_jax.objectives import (LOSS_CHUNK, dpo, joined, kto, last_trained, position_chunks, reward_model,
                                 score_loss, token_logprobs)
from neox_jax.optim import LossScale, make_optimizer, schedule
from neox_jax.pipeline import PIPELINE_REMAT, pipeline_grads
from neox_jax.xla_options import compiler_options

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    updates: jax.Array
    params: Any
    master: Any
    opt_state: Any
    loss_scale: LossScale | None = None
    reference: Any = None  # DPO, KTO: the starting weights, frozen (working dtype, the params' layout)


def check_layout(cfg: TrainConfig, mesh_shape: dict[str, int]):
    """Every layout error at once, before anything is compiled; each names the setting to change."""
    m, data, pipe, tensor = cfg.model, mesh_shape["data"], mesh_shape["pipe"], mesh_shape["tensor"]
    problems = []
    for what, size in (("num_heads", m.num_heads), ("intermediate_size", m.intermediate_size),
                       ("vocab_size", m.vocab_size)):
        if size % tensor:
            problems.append(f"{what}={size} is not divisible by mesh tensor={tensor}: "
                            f"choose a tensor size that divides {what}")
    if m.sequence_parallel and tensor > 1 and cfg.seq_length % tensor:
        problems.append(f"sequence_parallel with seq_length={cfg.seq_length}: the sequence is split over mesh "
                        f"tensor={tensor}, which does not divide it: choose a seq_length that tensor divides")
    if m.num_layers % pipe:
        problems.append(f"num_layers={m.num_layers} is not divisible by mesh pipe={pipe}: "
                        "choose a pipe size that divides the layer count")
    microbatches = pipe_microbatches(cfg, pipe)
    split = microbatches // cfg.grad_accum_steps
    if pipe > 1 and (microbatches % cfg.grad_accum_steps or cfg.micro_batch_size % max(split, 1)):
        problems.append(f"pipe_microbatches={microbatches} must be a multiple of grad_accum_steps="
                        f"{cfg.grad_accum_steps} that cuts micro_batch_size={cfg.micro_batch_size} (per data "
                        "replica) evenly: change pipe_microbatches")
    if pipe > 1 and cfg.zero_stage == 3:
        problems.append(f"zero_stage=3 (FSDP) with pipe={pipe}: FSDP gathers every weight in every microstep, which a "
                        "pipeline would repeat per stage and tick (DeepSpeed likewise refuses ZeRO-3 with pipeline "
                        "parallelism): use zero_stage 1, or pipe 1")
    if pipe > 1 and m.remat_policy not in PIPELINE_REMAT:
        problems.append(f"remat_policy={m.remat_policy} with pipe={pipe}: the pipeline recomputes once, each layer "
                        "(full) or each stage (none), and keeps no other activations: use remat_policy full or none")
    if problems:
        raise ConfigError("impossible layout for mesh "
                          f"data={data}, pipe={pipe}, tensor={tensor}:\n  " + "\n  ".join(problems))


def pipe_microbatches(cfg: TrainConfig, pipe: int) -> int:
    """Pipeline microbatches per step: the accumulation microsteps (GPT-NeoX's), at least 2 x stages by default."""
    if cfg.pipe_microbatches:
        return cfg.pipe_microbatches
    m = cfg.grad_accum_steps
    while m < 2 * pipe and cfg.micro_batch_size % (2 * m // cfg.grad_accum_steps) == 0:
        m *= 2
    return m


def cross_entropy(logits_btv, labels_bt):
    """Mean of logsumexp(logits) - the label's logit, in fp32: the whole-logits loss `lm_loss` equals."""
    logits_btv = logits_btv.astype(F32)
    target_bt = jnp.take_along_axis(logits_btv, labels_bt[..., None], axis=-1)[..., 0]
    return (jax.nn.logsumexp(logits_btv, axis=-1) - target_bt).mean()


def lm_loss(model: GPTNeoX, x_btd, targets, chunk: int = LOSS_CHUNK):
    """Next-token cross-entropy from the last layer's output `x_btd`: with `targets` the labels [b, t], their
    mean (equal to `cross_entropy(model.logits(x), labels)` in value and gradient); with (labels, weights), the
    weighted sum, the weights being data (a token's share of the step's loss: 0 where it is not trained on). The
    output layer and the loss are `output_cross_entropy`'s."""
    labels_bt, weights_bt = targets if isinstance(targets, tuple) else (
        targets, jnp.full(targets.shape, 1 / targets.size, F32))
    h_btd = model.final_hidden(x_btd)
    return output_cross_entropy(h_btd, model.output_kernel(h_btd.dtype), labels_bt, weights_bt, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def output_cross_entropy(h_btd, kernel_dv, labels_bt, weights_bt, chunk: int = LOSS_CHUNK):
    """The sum over positions of `weights` x the cross-entropy of the logits `h @ kernel`, run over the sequence
    `chunk` positions at a time (the largest divisor of its length up to `chunk`), so the whole [b, t, vocab] fp32
    logits never exist. The gradients are computed with the loss, chunk by chunk (softmax minus the one-hot label,
    times the weight): the logits are computed once, where autodiff of a rematerialised loss computed them again
    in the backward. The weights are data: no gradient flows to them."""
    return _output_cross_entropy(h_btd, kernel_dv, labels_bt, weights_bt, chunk)[0]


def _output_cross_entropy(h_btd, kernel_dv, labels_bt, weights_bt, chunk):
    def piece(carry, h_labels_weights):
        total, dkernel_dv = carry
        h_bcd, labels_bc, w_bc = h_labels_weights
        logits_bcv = output_logits(h_bcd, kernel_dv)
        max_bc = jnp.max(logits_bcv, axis=-1)
        exp_bcv = jnp.exp(logits_bcv - max_bc[..., None])
        sum_bc = exp_bcv.sum(-1)
        lse_bc = max_bc + jnp.log(sum_bc)
        target_bc = jnp.take_along_axis(logits_bcv, labels_bc[..., None], axis=-1)[..., 0]
        onehot_bcv = jnp.arange(logits_bcv.shape[-1]) == labels_bc[..., None]
        dlogits_bcv = ((exp_bcv / sum_bc[..., None] - onehot_bcv) * w_bc[..., None]).astype(h_bcd.dtype)
        dh_bcd = matmul.einsum("bcv,dv->bcd", dlogits_bcv, kernel_dv)
        dkernel_dv = dkernel_dv + jnp.einsum("bcd,bcv->dv", h_bcd, dlogits_bcv, preferred_element_type=F32)
        return (total + (w_bc * (lse_bc - target_bc)).sum(), dkernel_dv), dh_bcd

    zeros = shd.varying(shd.constrain(jnp.zeros(kernel_dv.shape, F32), ("embed", "vocab")))
    (total, dkernel_dv), dhs = jax.lax.scan(piece, (shd.varying(jnp.zeros((), F32)), zeros),
                                            position_chunks(chunk, h_btd, labels_bt, weights_bt.astype(F32)))
    return total, (joined(dhs), dkernel_dv.astype(kernel_dv.dtype))


def _output_cross_entropy_bwd(chunk, grads, g):
    dh_btd, dkernel_dv = grads
    return (g * dh_btd).astype(dh_btd.dtype), (g * dkernel_dv).astype(dkernel_dv.dtype), None, None


output_cross_entropy.defvjp(_output_cross_entropy, _output_cross_entropy_bwd)


class Trainer:
    """Holds the layout (mesh, shardings) and the jitted init and step for one TrainConfig."""

    def __init__(self, cfg: TrainConfig, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.mesh_shape = dict(mesh.shape)
        check_layout(cfg, self.mesh_shape)
        self.fp16 = cfg.precision == "fp16"
        self.tx = make_optimizer(cfg)
        self.lr = schedule(cfg)
        self.model_cfg = cfg.working_model()  # weights stored and computed in the precision's dtype
        self.graphdef, abstract_state = abstract_model(self.model_cfg)
        self.abstract_params = nnx.to_pure_dict(abstract_state)
        self.logical_axes = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
        self.has_master = self.model_cfg.param_dtype != "float32"
        self.dropout = self.model_cfg.hidden_dropout > 0 or self.model_cfg.attention_dropout > 0
        self.loss_fn = score_loss if cfg.train_impl == "rm" else lm_loss  # one microbatch's, given its weights

        self.stages = self.mesh_shape["pipe"]
        self.microbatches = pipe_microbatches(cfg, self.stages)
        self.param_specs = shd.param_specs(self.abstract_params, self.logical_axes, mesh, fsdp=cfg.zero_stage == 3)
        self.zero_specs = (shd.zero_specs(self.abstract_params, self.param_specs, self.logical_axes, mesh)
                           if cfg.zero_stage >= 1 else self.param_specs)
        abstract_master = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, F32), self.abstract_params)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_master)
        opt_specs = optax.tree_map_params(self.tx, lambda _, spec: spec, abstract_opt, self.zero_specs,
                                          transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
        scalar_specs = jax.tree.map(lambda _: P(), LossScale.initial(cfg)) if self.fp16 else None
        self.keeps_reference = cfg.train_impl == "kto" or (cfg.train_impl == "dpo" and not cfg.dpo_reference_free)
        self.state_specs = TrainState(step=P(), updates=P(), params=self.param_specs,
                                      master=self.zero_specs if self.has_master else None, opt_state=opt_specs,
                                      loss_scale=scalar_specs,
                                      reference=self.param_specs if self.keeps_reference else None)
        self.state_shardings = shd.named(mesh, self.state_specs)
        self.batch_sharding = NamedSharding(mesh, P(None, *shd.batch_spec()))  # [accum, batch, length]

        self.platform = mesh.devices.flat[0].platform if isinstance(mesh, Mesh) else None  # None: JAX's backend
        self.compiler_options = compiler_options(cfg.xla_options, self.platform,
                                                 cfg.model.sequence_parallel and self.mesh_shape["tensor"] > 1)
        jit = functools.partial(jax.jit, compiler_options=self.compiler_options)
        self.init = jit(self.under_mesh(self._init), out_shardings=self.state_shardings)
        self.start_from = jit(self.under_mesh(self._start_from), out_shardings=self.state_shardings)
        replicated = NamedSharding(mesh, P())
        # (params, batch[, loss scale, reference, step]): the inputs come laid out (put_batch, the state)
        self.grads = jit(self.under_mesh(self._grads), out_shardings=(replicated, shd.named(mesh, self.zero_specs)))
        self.eval_loss = jit(self.under_mesh(self._eval_loss), out_shardings=replicated)
        self.step = jit(self.under_mesh(self._step), in_shardings=(self.state_shardings, self.batch_sharding),
                        out_shardings=(self.state_shardings, NamedSharding(mesh, P())), donate_argnums=0)

    def under_mesh(self, fn):
        """Trace `fn` with the mesh set, so the model's logical constraints apply, and for the mesh's devices, so
        the hardware choices (attention, products) are theirs whatever this process's backend."""

        def traced(*args):
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), matmul.compiling_for(self.platform):
                return fn(*args)

        return traced

    # ---- shapes ---------------------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        return self.cfg.global_batch_size(self.mesh_shape["data"])

    def batch_shape(self) -> tuple[int, int, int]:
        """Token batch [grad_accum_steps, micro_batch x data, seq_length + 1] (inputs and shifted labels); DPO's and
        reward models' micro batch counts pairs, two rows each (chosen, rejected)."""
        cfg = self.cfg
        rows = cfg.micro_batch_size * self.mesh_shape["data"] * (2 if cfg.pairs else 1)
        return cfg.grad_accum_steps, rows, cfg.seq_length + 1

    def abstract_state(self) -> TrainState:
        return jax.eval_shape(self._init, jax.random.key(0))

    def abstract_state_with_shardings(self) -> TrainState:
        """The state's shapes and dtypes with this layout's shardings: what a checkpoint restores onto."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.abstract_state(),
                            self.state_shardings)

    def abstract_batch(self) -> dict:
        """The step's batch: `tokens` [accum, rows, seq + 1], and `labels` of the same shape when the run reads
        label files (GPT-NeoX's: the target ids, -100 where a token is not trained on), `rewards` for KTO."""
        leaf = jax.ShapeDtypeStruct(self.batch_shape(), jnp.int32, sharding=self.batch_sharding)
        impl = self.cfg.train_impl
        fields = ("tokens",) + (("labels",) if self.cfg.label_data_paths or impl != "normal" else ()) + (
            ("rewards",) if impl == "kto" else ())  # pairs and rewarded sequences always carry labels
        return dict.fromkeys(fields, leaf)

    # ---- the computations ---------------------------------------------------------------------------
    def _init(self, key) -> TrainState:
        model = GPTNeoX(self.model_cfg, rngs=nnx.Rngs(key))
        return self._start_from(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    def _start_from(self, weights) -> TrainState:
        """A fresh state (step 0, new optimizer) on given weights: fine-tuning's start (DPO's reference too)."""
        master = jax.tree.map(lambda x: x.astype(F32), weights)
        dtype = jnp.dtype(self.model_cfg.param_dtype)
        params = jax.tree.map(lambda x: x.astype(dtype), master)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, updates=zero, params=params,
                          master=master if self.has_master else None, opt_state=self.tx.init(master),
                          loss_scale=LossScale.initial(self.cfg) if self.fp16 else None,
                          reference=params if self.keeps_reference else None)

    def new_score_head(self) -> dict:
        """A reward model's score head drawn afresh (from the seed, with the model's init), laid out on the mesh: the
        head that replaces a language model's when a reward model starts from one."""
        m = self.model_cfg
        shape = (m.hidden_size, m.num_labels)
        kernel = init_scale(m.init_method, m) * jax.random.normal(jax.random.key(self.cfg.seed), shape)
        return {"kernel": jax.device_put(kernel, NamedSharding(self.mesh, self.param_specs["score"]["kernel"]))}

    def targets(self, batch, mean: str | None = None):
        """(inputs, labels, weights) [accum, rows, seq] of a step's batch. A token's weight is its share of the
        step's loss, 0 where it is not trained on (a label below 0), so the loss is a plain sum wherever it is cut:
        with `loss_mean: tokens` every trained token of the step weighs the same; with `micro_batch` (GPT-NeoX's)
        each data replica's microbatch is a token mean and the step averages them."""
        tokens = batch["tokens"]
        raw = batch.get("labels", tokens)[..., 1:]
        keep = raw >= 0
        if self.cfg.eod_mask_loss:  # GPT-NeoX's: the token after a document's end is not trained on
            keep &= tokens[..., :-1] != self.cfg.model.eos_token_id
        weights = keep.astype(F32)
        if (mean or self.cfg.loss_mean) == "micro_batch":
            a, rows, t = weights.shape
            data = self.mesh_shape["data"]
            blocks = weights.reshape(a, data, rows // data, t)
            counts = blocks.sum((2, 3), keepdims=True)
            weights = (blocks / (jnp.maximum(counts, 1) * a * data)).reshape(a, rows, t)
        else:
            weights = weights / jnp.maximum(weights.sum(), 1)
        return tokens[..., :-1], jnp.where(keep, raw, 0), weights

    def sequence_logprobs(self, params, inputs_mbt, labels_mbt, keep_mbt, keys_mbt=None):
        """Each row's log-probability of its trained tokens [accum, rows], one microstep at a time, no gradient;
        with dropout keys, under the step's own dropout masks."""
        def one(piece):
            inputs, labels, keep, keys = piece
            model = nnx.merge(self.graphdef, jax.lax.stop_gradient(params))
            logp, _ = token_logprobs(model, model(inputs, hidden_only=True, dropout_keys=keys), labels)
            return jnp.sum(jnp.where(keep, logp, 0.0), axis=-1)

        return jax.lax.map(one, (inputs_mbt, labels_mbt, keep_mbt, keys_mbt))

    def sequence_scores(self, params, inputs_mbt, at_mbt, keys_mbt=None):
        """A reward model's score of each row [accum, rows] (the score head where `at` is set), no gradient."""
        def one(piece):
            inputs, at, keys = piece
            model = nnx.merge(self.graphdef, jax.lax.stop_gradient(params))
            return jnp.sum(jnp.where(at, model.scores(model(inputs, hidden_only=True, dropout_keys=keys))[..., 0], 0),
                           axis=-1)

        return jax.lax.map(one, (inputs_mbt, at_mbt, keys_mbt))

    def preference(self, params, reference, inputs_mbt, labels_mbt, weights_mbt, rewards_mbt=None, keys_mbt=None):
        """DPO's or KTO's token weights from the current and the reference log-probabilities (objectives.py), or a
        reward model's weights on its scores, and the objective's loss and metrics. DPO's and RM's rows alternate
        chosen, rejected: a pair never straddles two data replicas. With
        dropout keys the policy's log-probabilities are those of the step's forward (the reference's drop nothing),
        so the weights make the step's gradient exactly the objective's under dropout, as in GPT-NeoX."""
        cfg, keep = self.cfg, weights_mbt > 0
        if cfg.train_impl == "rm":  # the weights are on the scores, at each row's last trained position
            at = last_trained(keep)
            scores = self.sequence_scores(params, inputs_mbt, at, keys_mbt)
            loss, d_chosen, d_rejected, metrics = reward_model(scores[:, 0::2], scores[:, 1::2], cfg.z_loss)
            a, pairs = d_chosen.shape
            return at * jnp.stack([d_chosen, d_rejected], -1).reshape(a, 2 * pairs)[..., None], {"loss": loss,
                                                                                                 **metrics}
        policy = self.sequence_logprobs(params, inputs_mbt, labels_mbt, keep, keys_mbt)
        ref = (jnp.zeros_like(policy) if reference is None
               else self.sequence_logprobs(reference, inputs_mbt, labels_mbt, keep))
        if cfg.train_impl == "kto":
            loss, c, metrics = kto(policy, ref, rewards_mbt.astype(F32), keep, self.mesh_shape["data"], cfg.kto_beta,
                                   cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
            return keep * c[..., None], {"loss": loss, **metrics}
        loss, c, metrics = dpo(policy[:, 0::2], policy[:, 1::2], ref[:, 0::2], ref[:, 1::2], cfg.dpo_beta)
        a, pairs = c.shape
        signed = jnp.stack([c, -c], axis=-1).reshape(a, 2 * pairs)  # chosen +c, rejected -c
        return keep * signed[..., None], {"loss": loss, **metrics}

    def _rewards(self, batch):
        """KTO's rewards of the input positions (GPT-NeoX drops the last), else None."""
        return batch["rewards"][..., :-1] if "rewards" in batch else None

    def loss(self, params, inputs_bt, labels_bt, weights_bt, keys_b=None):
        """The weighted sum of one microbatch's token losses (with dropout keys, under dropout); a reward model's
        weighted sum of scores."""
        model = nnx.merge(self.graphdef, params)
        return self.loss_fn(model, model(inputs_bt, hidden_only=True, dropout_keys=keys_b), (labels_bt, weights_bt))

    def pipelined_grads(self, params, inputs_mbt, labels_mbt, weights_mbt, seed, accum_dtype, keys_mbt=None):
        """(loss, gradients of `seed` x it summed in `accum_dtype`) of the whole step's batch [accum, rows, seq]
        through the pipeline. Each microstep's rows are cut into `split` microbatches (split innermost, so every
        piece keeps its data sharding), their dropout keys (or None) with them."""
        a, rows = inputs_mbt.shape[:2]
        split = self.microbatches // a

        def cut(x):
            rest = x.shape[2:]
            return x.reshape(a, rows // split, split, *rest).swapaxes(1, 2).reshape(a * split, rows // split, *rest)

        return pipeline_grads(self.graphdef, params, cut(inputs_mbt), (cut(labels_mbt), cut(weights_mbt)), self.loss_fn,
                              seed=seed, accum_dtype=accum_dtype, keys_mbt=None if keys_mbt is None else cut(keys_mbt))

    def dropout_keys(self, step, shape):
        """The step's rows' dropout keys [accum, rows, 2] (dropout.py), laid out as the rows; None without dropout."""
        if not self.dropout:
            return None
        keys = dropout.row_keys(self.cfg.seed, step, *shape[:2])
        return jax.lax.with_sharding_constraint(keys, self.batch_sharding)

    def _grads(self, params, batch, loss_scale=1.0, reference=None, step=0):
        """The step's loss and its fp32 gradients, in the ZeRO layout (`_grads_and_report`)."""
        loss, grads, _ = self._grads_and_report(params, batch, loss_scale, reference, step)
        return loss, grads

    def _grads_and_report(self, params, batch, loss_scale=1.0, reference=None, step=0):
        """The step's loss, its fp32 gradients in the ZeRO layout, and the objective's metrics. The gradients are
        those of the weighted sum of token losses (`targets`; DPO's, KTO's and RM's weights: `preference`), under the
        step's dropout masks (`dropout_keys`: a function of the seed, `step` and each row's place).

        The loss is multiplied by `loss_scale` for differentiation and the gradients divided by it after. Each data
        replica sums its microbatches' gradients locally in `grad_accum_dtype`, then one reduce-scatter per tensor
        (an all-reduce without ZeRO) brings them into the ZeRO layout: the traffic over `data` is once per step,
        whatever the number of microsteps, as DeepSpeed's. FSDP, whose weights are gathered per microstep anyway,
        reduces per microstep.
        """
        inputs_mbt, labels_mbt, weights_mbt = self.targets(batch)
        keys_mbt = self.dropout_keys(step, inputs_mbt.shape)
        report = {}
        if self.cfg.train_impl != "normal":
            weights_mbt, report = self.preference(params, reference, inputs_mbt, labels_mbt, weights_mbt,
                                                  self._rewards(batch), keys_mbt)
        if self.cfg.zero_stage == 3:
            loss, grads = self._grads_per_microstep(params, (inputs_mbt, labels_mbt, weights_mbt, keys_mbt),
                                                    loss_scale)
            return report.pop("loss", loss), grads, report
        data = self.mesh_shape["data"]
        accum = jnp.dtype(self.cfg.grad_accum_dtype)
        # the dimension ZeRO splits over `data` when it splits a dimension of its own, else -1: an all-reduce
        dims = jax.tree.map(lambda spec: next((i for i, e in enumerate(spec) if e == "data"), -1), self.zero_specs,
                            is_leaf=lambda x: isinstance(x, P))

        def replica(params, inputs_mbt, labels_mbt, weights_mbt, keys_mbt, loss_scale):  # one data replica's rows;
            # `pipe` and `tensor` stay automatic, so that the gradient's transpose reduces nothing over `data`
            params = jax.tree.map(lambda p: jax.lax.pcast(p, "data", to="varying"), params)
            if self.stages > 1:
                loss, total = self.pipelined_grads(params, inputs_mbt, labels_mbt, weights_mbt, loss_scale, accum,
                                                   keys_mbt)
            else:
                def micro(acc, piece):
                    def scaled(w):
                        loss = self.loss(w, *piece)
                        return loss * loss_scale, loss

                    g, loss = jax.grad(scaled, has_aux=True)(params)
                    return jax.tree.map(lambda a, x: a + x.astype(accum), acc, g), loss

                zeros = jax.tree.map(lambda p: shd.varying(jnp.zeros(p.shape, accum)), params)
                total, losses = jax.lax.scan(micro, zeros, (inputs_mbt, labels_mbt, weights_mbt, keys_mbt))
                loss = losses.sum()
            return jax.lax.psum(loss, "data"), total

        loss_scale = jnp.asarray(loss_scale, F32)
        # Each replica's sums leave side by side along the dimension they are reduced over (`data` outermost), so a
        # replica's block is its own buffer; then one reduce-scatter per tensor makes the ZeRO shard of them.
        is_spec = lambda x: isinstance(x, P)  # noqa: E731
        along = jax.tree.map(lambda dim: max(dim, 0), dims)

        def beside(spec, k):
            entries = list(spec) + [None] * (k + 1 - len(spec))
            e = entries[k]
            entries[k] = "data" if e is None else ("data", *(e if isinstance(e, tuple) else (e,)))
            return P(*entries)

        rows = P(None, "data")
        loss, totals = jax.shard_map(replica, mesh=self.mesh, in_specs=(P(), rows, rows, rows, rows, P()),
                                     out_specs=(P(), jax.tree.map(lambda k: P(*[None] * k, "data"), along)),
                                     axis_names={"data"})(params, inputs_mbt, labels_mbt, weights_mbt, keys_mbt,
                                                          loss_scale)

        def mean(g, scale):  # the weights made the sums the step's loss: only the loss scale is left to divide
            return g.astype(F32) / scale

        def reduce(g, dim, scale):  # one reduce-scatter (all-reduce without ZeRO) per tensor, on its local shard
            g = jax.lax.psum(g, "data") if dim < 0 else jax.lax.psum_scatter(g, "data", scatter_dimension=dim,
                                                                             tiled=True)
            return mean(g, scale)

        loss = report.pop("loss", loss)
        if data == 1:  # nothing to reduce (XLA's CPU all-reduce over one device copies every gradient: 3% of a step)
            grads = jax.tree.map(lambda g: mean(g, loss_scale), totals)
            return loss, jax.lax.with_sharding_constraint(grads, shd.named(self.mesh, self.zero_specs)), report
        reduced_specs = jax.tree.map(lambda z, p, dim: z if dim >= 0 else p, self.zero_specs, self.param_specs, dims,
                                     is_leaf=is_spec)
        grads = jax.shard_map(lambda t, scale: jax.tree.map(lambda g, dim: reduce(g, dim, scale), t, dims),
                              mesh=self.mesh, in_specs=(jax.tree.map(beside, self.param_specs, along, is_leaf=is_spec),
                                                        P()), out_specs=reduced_specs)(totals, loss_scale)
        return loss, jax.lax.with_sharding_constraint(grads, shd.named(self.mesh, self.zero_specs)), report

    def _grads_per_microstep(self, params, targets, loss_scale=1.0):
        """FSDP: each microstep's gradients are reduce-scattered into the ZeRO layout and accumulated in fp32."""
        zero = shd.named(self.mesh, self.zero_specs)

        def micro(acc, piece):
            def scaled(p):
                loss = self.loss(p, *piece)
                return loss * loss_scale, loss

            g, loss = jax.grad(scaled, has_aux=True)(params)
            g = jax.lax.with_sharding_constraint(jax.tree.map(lambda x: x.astype(F32), g), zero)
            return jax.tree.map(jnp.add, acc, g), loss

        acc = jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(jnp.zeros(x.shape, F32), s),
                           self.abstract_params, zero)
        acc, losses = jax.lax.scan(micro, acc, targets)
        return losses.sum(), jax.tree.map(lambda g: g / loss_scale, acc)

    def _eval_loss(self, params, batch, reference=None):
        """The batch's loss: the mean over its trained tokens (each weighs the same, whatever `loss_mean`), or
        DPO's over its pairs, or KTO's."""
        targets = self.targets(batch, "tokens")
        if self.cfg.train_impl != "normal":
            return self.preference(params, reference, *targets, self._rewards(batch))[1]["loss"]
        return jax.lax.map(lambda piece: self.loss(params, *piece), targets).sum()

    def _step(self, state: TrainState, batch):
        scale = state.loss_scale.scale if self.fp16 else 1.0
        loss, grads, report = self._grads_and_report(state.params, batch, scale, state.reference, state.step)
        master = state.master if self.has_master else state.params
        lr = self.lr(state.updates)
        updates, opt_state = self.tx.update(grads, state.opt_state, master)
        new_master = optax.apply_updates(master, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, **report}
        # A step with a non-finite loss or gradient is skipped: weights and optimizer stay as they were. (The
        # global norm is non-finite when any gradient is.) The run decides from the metrics when to stop.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_master, opt_state = keep(new_master, master), keep(opt_state, state.opt_state)
        loss_scale = None
        if self.fp16:  # an overflow also shrinks the loss scale
            loss_scale = state.loss_scale.update(~finite, self.cfg)
            metrics.update(loss_scale=state.loss_scale.scale, skipped=loss_scale.skipped,
                           skipped_in_a_row=loss_scale.skipped_in_a_row)
        applied = finite.astype(jnp.int32)
        dtype = jnp.dtype(self.model_cfg.param_dtype)
        params = jax.tree.map(lambda x: x.astype(dtype), new_master)
        new = TrainState(step=state.step + 1, updates=state.updates + applied, params=params,
                         master=new_master if self.has_master else None, opt_state=opt_state, loss_scale=loss_scale,
                         reference=state.reference)
        return new, metrics

    # ---- data ---------------------------------------------------------------------------------------
    def put_batch(self, tokens: np.ndarray, labels: np.ndarray | None = None, rewards: np.ndarray | None = None
                  ) -> dict:
        """A whole host batch [accum, batch, length] (and its labels, KTO's rewards) onto the mesh; each process
        puts only the rows its devices hold (training itself never builds the whole batch: neox_jax/data/loader.py
        reads just those rows)."""
        from neox_jax.data.loader import local_rows

        batch = {name: rows for name, rows in (("tokens", tokens), ("labels", labels), ("rewards", rewards))
                 if rows is not None}
        out = {}
        for name, rows in batch.items():
            rows = np.asarray(rows, np.int32)
            if rows.shape != self.batch_shape():
                raise ConfigError(f"{name} of shape {rows.shape}, expected {self.batch_shape()} "
                                  "(grad_accum_steps, micro_batch_size x data, seq_length + 1)")
            lo, hi = local_rows(self.batch_sharding, rows.shape)
            out[name] = jax.make_array_from_process_local_data(self.batch_sharding, rows[:, lo:hi], rows.shape)
        return out

