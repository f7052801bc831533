"""The sharded train step: a single-device run is the oracle for every mesh (8 emulated CPU devices)."""

import jax
import numpy as np
import pytest

from neox_jax.config import NeoXConfig, TrainConfig
from neox_jax.errors import ConfigError
from neox_jax.sharding import make_mesh
from neox_jax.train import Trainer
from tests.conftest import max_diff, require

MODEL = NeoXConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=8, intermediate_size=128,
                   rotary_pct=0.25, max_position_embeddings=64)
GLOBAL_MICRO = 8  # sequences per microstep over all replicas
BASE = TrainConfig(model=MODEL, seq_length=32, micro_batch_size=GLOBAL_MICRO, grad_accum_steps=2, lr=1e-3,
                   warmup=0, train_iters=10, weight_decay=0.1)


def trainer(mesh_shape, **changes):
    mesh = make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
    changes.setdefault("micro_batch_size", GLOBAL_MICRO // mesh.shape["data"])
    cfg = BASE.replace(mesh=mesh_shape, **changes)
    return Trainer(cfg, mesh)


def sft_labels(tokens: np.ndarray) -> np.ndarray:
    """GPT-NeoX's SFT labels for `tokens`: -100 over a prompt of a different length in each row (the whole of one
    row), so the rows carry different numbers of trained tokens."""
    labels = tokens.copy()
    a, rows, t = tokens.shape
    for k in range(a):
        for r in range(rows):
            labels[k, r, :t if (k, r) == (0, 3) else (5 * r + 3 * k) % (t - 4)] = -100
    return labels


@pytest.fixture(scope="module")
def reference():
    """One device's loss and gradients on a batch whose rows are masked unevenly (SFT labels): every layout below
    equals them only if the weighted sums and their reductions are exact."""
    tr = trainer({"data": 1})
    state = tr.init(jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, 256, tr.batch_shape())
    loss, grads = tr.grads(state.params, tr.put_batch(tokens, sft_labels(tokens)))
    return tokens, state, float(loss), jax.tree.map(np.asarray, grads)


MESHES = [dict(data=8), dict(tensor=8), dict(data=2, tensor=4), dict(data=4, tensor=2),
          dict(data=2, pipe=2, tensor=2)]


@pytest.mark.parametrize("zero_stage", [1, 3], ids=["zero1", "fsdp"])
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_sharded_loss_and_grads_equal_single_device(reference, mesh_shape, zero_stage):
    tokens, ref_state, ref_loss, ref_grads = reference
    if zero_stage == 3 and mesh_shape.get("pipe", 1) > 1:  # as DeepSpeed, no ZeRO-3 with a pipeline
        with pytest.raises(ConfigError, match="zero_stage=3 \\(FSDP\\) with pipe=2: FSDP gathers every weight"):
            trainer(mesh_shape, zero_stage=zero_stage)
        return
    tr = trainer(mesh_shape, zero_stage=zero_stage)
    state = tr.init(jax.random.key(0))
    assert max_diff(state.params, ref_state.params) == 0.0  # the same init on every layout
    loss, grads = tr.grads(state.params, tr.put_batch(tokens, sft_labels(tokens)))
    assert abs(float(loss) - ref_loss) <= 1e-5
    assert max_diff(grads, ref_grads) <= 1e-5


@pytest.mark.slow
def test_one_optimizer_step_on_222_equals_single_device(reference):
    """Adam's first step is lr * g / (|g| + eps): with eps=1e-8 a gradient of 1e-8 turns a 1e-10 summation-order
    difference into a visible update difference, so this test takes eps=1e-6 to compare the layouts."""
    tokens, *_ = reference
    results = []
    for mesh_shape in ({"data": 1}, {"data": 2, "pipe": 2, "tensor": 2}):
        tr = trainer(mesh_shape, eps=1e-6)
        state = tr.init(jax.random.key(0))
        state, metrics = tr.step(state, tr.put_batch(tokens))
        results.append((jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()}))
    (p1, m1), (p8, m8) = results
    assert max_diff(p1, p8) <= 1e-5
    assert m1["loss"] == pytest.approx(m8["loss"], abs=1e-5)
    assert m1["grad_norm"] == pytest.approx(m8["grad_norm"], rel=1e-5)


def test_bf16_working_weights_follow_the_fp32_master():
    tr = trainer({"data": 2, "tensor": 2, "pipe": 2}, precision="bf16")
    state = tr.init(jax.random.key(0))
    tokens = np.random.RandomState(1).randint(0, 256, tr.batch_shape())
    losses = []
    for _ in range(3):
        state, metrics = tr.step(state, tr.put_batch(tokens))
        losses.append(float(metrics["loss"]))
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(jax.tree.leaves(state.master)[0].astype(leaf.dtype)))
    assert losses[-1] < losses[0]  # the same batch three times: it is learning


def test_bad_batch_shape_is_named():
    tr = trainer({"data": 2})
    with pytest.raises(ConfigError, match=r"expected \(2, 8, 33\)"):
        tr.put_batch(np.zeros((2, 6, 33), np.int32))


def test_gradient_accumulation_equals_one_big_batch(reference):
    tokens, *_ = reference  # [2 microsteps, 8 rows, 33]
    one = trainer({"data": 1}, grad_accum_steps=1, micro_batch_size=16)
    four = trainer({"data": 1}, grad_accum_steps=4, micro_batch_size=4)
    state = one.init(jax.random.key(0))
    big = tokens.reshape(1, 16, 33)
    loss1, g1 = one.grads(state.params, one.put_batch(big))
    loss4, g4 = four.grads(state.params, four.put_batch(big.reshape(4, 4, 33)))
    assert abs(float(loss1) - float(loss4)) <= 1e-6
    assert max_diff(g1, g4) <= 1e-6


def relative_errors(grads, ref):
    """Per tensor, max |g - ref| / max |ref|."""
    return jax.tree.map(lambda g, r: float(np.abs(np.asarray(g) - r).max() / np.abs(r).max()), grads, ref)


def test_bf16_and_fp32_gradient_sums_against_the_fp32_reference(reference):
    """fp32 sums are exact to fp32 rounding. bf16 sums round each microstep's gradient to 8 bits of mantissa and each
    partial sum again: with 2 microsteps, at most about 2 x 2^-8 of the largest entry per tensor (2^-9 per rounding),
    and visibly worse than fp32 sums."""
    tokens, _, _, ref_grads = reference
    errors = {}
    for dtype in ("float32", "bfloat16"):
        tr = trainer({"data": 4, "tensor": 2}, grad_accum_dtype=dtype)
        _, grads = tr.grads(tr.init(jax.random.key(0)).params, tr.put_batch(tokens, sft_labels(tokens)))
        errors[dtype] = jax.tree.leaves(relative_errors(grads, ref_grads))
    assert max(errors["float32"]) <= 1e-5
    assert max(errors["bfloat16"]) <= 2 * 2**-8 and max(errors["bfloat16"]) > 100 * max(errors["float32"])


def test_the_chunked_loss_equals_the_full_one_in_value_and_gradient():
    import optax
    from flax import nnx

    from neox_jax.model import GPTNeoX
    from neox_jax.train import cross_entropy, lm_loss

    model = GPTNeoX(MODEL, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = np.random.RandomState(3).randint(0, 256, (3, 33))

    def loss(params, how):
        m = nnx.merge(graphdef, params)
        x = m(tokens[:, :-1], hidden_only=True)
        return how(m, x, tokens[:, 1:])

    full = lambda m, x, labels: cross_entropy(m.logits(x), labels)  # noqa: E731
    chunked = lambda m, x, labels: lm_loss(m, x, labels, chunk=8)  # noqa: E731  4 chunks of 8 positions
    optax_ce = lambda m, x, labels: optax.softmax_cross_entropy_with_integer_labels(m.logits(x), labels).mean()  # noqa
    (a, ga), (b, gb), (c, gc) = (jax.value_and_grad(loss)(params, how) for how in (full, chunked, optax_ce))
    assert abs(float(a) - float(c)) <= 1e-6 and max_diff(ga, jax.tree.map(np.asarray, gc)) <= 1e-6  # optax's
    assert abs(float(a) - float(b)) <= 1e-5 and max_diff(gb, jax.tree.map(np.asarray, ga)) <= 1e-5
    assert abs(float(lm_loss(model, model(tokens[:, :-1], hidden_only=True), tokens[:, 1:], chunk=5)) - float(a)) \
        <= 1e-5  # 32 positions: the largest divisor up to 5 is 4


def test_the_loss_gradient_computes_the_logits_once():
    """The output layer's [b, c, vocab] logits are one matmul in the gradient's program (autodiff of a
    rematerialised chunk computed them in the forward and again in the backward)."""
    from flax import nnx

    from neox_jax.model import GPTNeoX
    from neox_jax.train import lm_loss

    model = GPTNeoX(MODEL, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = np.random.RandomState(3).randint(0, 256, (2, 33))

    def loss(params):
        m = nnx.merge(graphdef, params)
        return lm_loss(m, m(tokens[:, :-1], hidden_only=True), tokens[:, 1:], chunk=8)

    def vocab_matmuls(jaxpr):
        count = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] == MODEL.vocab_size:
                count += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        count += vocab_matmuls(getattr(inner, "jaxpr", inner))
        return count

    assert vocab_matmuls(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr) == 2  # logits, kernel gradient


def _as_ours(hf, folder):
    """A transformers model's gradients in our params layout: written as the weights of a copy and read back
    through the Hugging Face conversion (every mapping is linear: transposes, reshapes, splits)."""
    import copy

    import torch
    from flax import nnx

    from neox_jax.pretrained import from_pretrained

    clone = copy.deepcopy(hf)
    with torch.no_grad():
        for p, q in zip(hf.parameters(), clone.parameters()):
            q.copy_(p.grad)
    clone.save_pretrained(folder)
    return nnx.to_pure_dict(nnx.state(from_pretrained(folder), nnx.Param))


@pytest.mark.parametrize("loss_mean", ["tokens", "micro_batch"])
def test_masked_loss_and_gradients_equal_transformers_with_labels_minus_100(tmp_path, loss_mean):
    """SFT against transformers' `labels=-100`: its loss is the mean over the trained tokens of the rows it is
    given, so `tokens` is one call on all rows, and GPT-NeoX's `micro_batch` the mean of one call per data
    replica's rows."""
    torch = require("torch")
    from flax import nnx

    from neox_jax.convert.hf_config import config_from_hf
    from neox_jax.pretrained import from_pretrained

    from .conftest import make_hf_model

    hf = make_hf_model(max_position_embeddings=64)
    hf.save_pretrained(tmp_path / "model")
    cfg = TrainConfig(model=config_from_hf(tmp_path / "model"), mesh={"data": 2, "pipe": 1, "tensor": 2},
                      seq_length=32, micro_batch_size=2, loss_mean=loss_mean)
    tr = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:4]))
    state = tr.start_from(nnx.to_pure_dict(nnx.state(from_pretrained(tmp_path / "model"), nnx.Param)))
    tokens = np.random.RandomState(1).randint(0, 384, tr.batch_shape())
    labels = sft_labels(tokens)
    loss, grads = tr.grads(state.params, tr.put_batch(tokens, labels))

    ids, targets = torch.from_numpy(tokens[0]).long(), torch.from_numpy(labels[0]).long()
    halves = [slice(0, 4)] if loss_mean == "tokens" else [slice(0, 2), slice(2, 4)]
    ref = sum(hf(ids[rows], labels=targets[rows]).loss for rows in halves) / len(halves)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), abs=1e-5)
    ref_grads = _as_ours(hf, tmp_path / "grads")
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    assert max_diff(grads, ref_grads) <= 1e-5 * scale


def test_eod_mask_loss_is_masking_the_token_after_each_document_end():
    """GPT-NeoX's `eod_mask_loss`: no loss where the input token is the end-of-document id (model.eos_token_id, 0)."""
    tokens = np.random.RandomState(5).randint(1, 256, (2, 8, 33))
    tokens[:, ::3, 7] = tokens[:, 1::4, 20] = 0  # documents end inside the samples
    labels = tokens.copy()
    labels[..., 1:][tokens[..., :-1] == 0] = -100
    masked, plain = trainer({"data": 2, "tensor": 2}, eod_mask_loss=True), trainer({"data": 2, "tensor": 2})
    params = plain.init(jax.random.key(0)).params
    loss, grads = masked.grads(params, masked.put_batch(tokens))
    want_loss, want = plain.grads(params, plain.put_batch(tokens, labels))
    assert float(loss) == float(want_loss) and max_diff(grads, want) == 0.0
    assert float(loss) != float(plain.grads(params, plain.put_batch(tokens))[0])
