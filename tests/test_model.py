"""Logits parity of neox_jax.model against transformers' GPTNeoXForCausalLM (CPU torch, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import neox_jax.attention as attention_lib
import neox_jax.model as model_lib
from neox_jax import GPTNeoX, NeoXConfig, from_pretrained
from tests.conftest import hf_logits, make_hf_model

from .conftest import LOGITS_ATOL, require

require("transformers")

SEQ = 520  # long prompts: partial-rotary bugs hide in short ones
forward = nnx.jit(lambda m, ids, mask=None, pos=None: m(ids, attention_mask=mask, positions=pos))


def load_pair(tmp_path, **hf_overrides):
    hf = make_hf_model(**hf_overrides)
    hf.save_pretrained(tmp_path / "hf")
    return hf, from_pretrained(tmp_path / "hf")


def random_ids(vocab, shape, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape)


CASES = [
    # residual, rotary_pct, activation, head_dim, rotary base
    dict(use_parallel_residual=True, rotary_pct=0.25, hidden_act="gelu", head_dim=16, base=10000),
    dict(use_parallel_residual=False, rotary_pct=0.25, hidden_act="gelu_fast", head_dim=32, base=10000),
    dict(use_parallel_residual=True, rotary_pct=0.5, hidden_act="gelu_fast", head_dim=64, base=500),
    dict(use_parallel_residual=False, rotary_pct=1.0, hidden_act="gelu", head_dim=64, base=10000),
    dict(use_parallel_residual=True, rotary_pct=1.0, hidden_act="gelu_new", head_dim=32, base=1_000_000),
    dict(use_parallel_residual=False, rotary_pct=0.5, hidden_act="gelu", head_dim=16, base=25000),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_logits_match_transformers(tmp_path, case):
    heads = 4
    hf, model = load_pair(tmp_path, use_parallel_residual=case["use_parallel_residual"],
                          rotary_pct=case["rotary_pct"], hidden_act=case["hidden_act"],
                          hidden_size=heads * case["head_dim"], num_attention_heads=heads,
                          rotary_emb_base=case["base"])
    assert model.config.head_dim == case["head_dim"]
    ids = random_ids(384, (2, SEQ))
    ours = np.asarray(forward(model, ids))
    ref = hf_logits(hf, ids)
    assert ours.shape == ref.shape == (2, SEQ, 384)
    assert np.abs(ours - ref).max() <= LOGITS_ATOL


def test_left_padded_batch_matches_transformers_and_unpadded(tmp_path):
    hf, model = load_pair(tmp_path)
    lengths = [SEQ, SEQ - 37, SEQ - 300]
    ids = random_ids(384, (3, SEQ), seed=1)
    mask = np.zeros((3, SEQ), np.int32)
    for row, n in enumerate(lengths):
        mask[row, SEQ - n:] = 1
        ids[row, :SEQ - n] = 0  # pad token
    ours = np.asarray(forward(model, ids, jnp.asarray(mask)))
    # transformers takes explicit positions for left padding (as its generate() does)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = hf_logits(hf, ids, attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= LOGITS_ATOL
    for row, n in enumerate(lengths):  # a padded row equals the same prompt alone
        alone = np.asarray(forward(model, ids[row:row + 1, SEQ - n:]))
        assert np.abs(ours[row, SEQ - n:] - alone[0]).max() <= LOGITS_ATOL
    assert np.isfinite(ours).all()


def _interleaved_rotary(x_btnh, cos_btr, sin_btr):
    """GPT-J's rotary (pairs (0,1), (2,3), ...): the wrong convention for NeoX."""
    r = cos_btr.shape[-1]
    x_rot, x_pass = x_btnh[..., :r], x_btnh[..., r:]
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    cos, sin = cos_btr[:, :, None, : r // 2], sin_btr[:, :, None, : r // 2]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x_rot.shape)
    return jnp.concatenate([rotated.astype(x_btnh.dtype), x_pass], axis=-1)


def test_parity_catches_interleaved_rotary(tmp_path, monkeypatch):
    hf, model = load_pair(tmp_path)
    ids = random_ids(384, (1, SEQ))
    ref = hf_logits(hf, ids)
    monkeypatch.setattr(attention_lib, "apply_rotary", _interleaved_rotary)
    wrong = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    assert np.abs(wrong - ref).max() > 1e-2


def test_parity_catches_qkv_split_as_3_heads_headdim(tmp_path):
    hf, model = load_pair(tmp_path)
    ids = random_ids(384, (1, SEQ))
    ref = hf_logits(hf, ids)
    cfg = model.config
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    qkv = model.layers.attention.query_key_value
    # Read the torch [3h, h] weight as if its rows were [3, heads, head_dim] instead of [heads, 3, head_dim].
    torch_w = np.asarray(qkv.kernel[...]).reshape(cfg.num_layers, d, 3 * d).transpose(0, 2, 1)
    wrong_kernel = torch_w.reshape(cfg.num_layers, 3, n, h, d).transpose(0, 4, 2, 1, 3)
    torch_b = np.asarray(qkv.bias[...]).reshape(cfg.num_layers, 3 * d)
    qkv.kernel[...] = jnp.asarray(wrong_kernel)
    qkv.bias[...] = jnp.asarray(torch_b.reshape(cfg.num_layers, 3, n, h).transpose(0, 2, 1, 3))
    wrong = np.asarray(forward(model, ids))
    assert np.abs(wrong - ref).max() > 1e-2


@pytest.mark.parametrize("dtype,unit_roundoff", [("bfloat16", 2.0**-8), ("float16", 2.0**-11)])
def test_low_precision_compute_close_to_fp32(tmp_path, dtype, unit_roundoff):
    """Tolerance justified by the format: rounding error per op is at most the unit roundoff u (2**-8 for
    bf16, 2**-11 for fp16), and a few layers of matmuls accumulate a small multiple of it. Asserted relative
    to the spread (std) of the fp32 logits: RMS error <= 4u, max error <= 20u, argmax agreement >= 97%.
    Measured on this 4-layer model: RMS 2.2u and max 13u for bf16, RMS 2.2u and max 13u for fp16."""
    hf, model32 = load_pair(tmp_path, num_hidden_layers=4, hidden_size=128)
    model_lo = from_pretrained(tmp_path / "hf", dtype=dtype)
    ids = random_ids(384, (2, SEQ))
    l32 = np.asarray(forward(model32, ids))
    lo = np.asarray(forward(model_lo, ids))
    assert lo.dtype == np.float32  # logits come out in fp32 whatever the compute dtype
    err = np.abs(lo - l32) / l32.std()
    assert np.sqrt(np.mean(err**2)) <= 4 * unit_roundoff
    assert err.max() <= 20 * unit_roundoff
    assert (lo.argmax(-1) == l32.argmax(-1)).mean() >= 0.97


@pytest.mark.parametrize("case", CASES[:2], ids=["parallel", "sequential"])
def test_fused_layers_give_the_model_s_logits(case):
    """The CPU generator's layer weights (`fused_layers`: LayerNorms folded into the projections they feed, the
    parallel residual's two pairs of projections fused, kernels [out, in]) against the model's own. fp32: the same
    numbers up to rounding (measured 3.3e-6 of the logits' spread); bf16: as close to fp32 as the model's own bf16
    forward (the bounds of test_low_precision_compute_close_to_fp32; measured RMS 1.7u and max 7.5u, the model's
    1.8u and 7.7u). A sequential residual keeps `unstack`'s per-layer Blocks: the same program, the same numbers."""
    cfg = NeoXConfig(vocab_size=384, hidden_size=128, num_layers=3, num_heads=4, rotary_pct=case["rotary_pct"],
                     use_parallel_residual=case["use_parallel_residual"], activation=case["hidden_act"])
    model32 = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    layer = model32.layers
    norms, attention, mlp = (layer.input_layernorm, layer.post_attention_layernorm), layer.attention, layer.mlp
    for i, w in enumerate([*(ln.scale for ln in norms), *(ln.bias for ln in norms), attention.query_key_value.bias,
                           attention.dense.bias, mlp.dense_h_to_4h.bias, mlp.dense_4h_to_h.bias]):
        w[...] = w[...] + 0.3 * jax.random.normal(jax.random.key(i), w.shape)  # away from init's ones and zeros
    _, state = nnx.split(model32)
    ids = random_ids(384, (2, 64))
    fused = nnx.jit(lambda m, ids: m(ids, layer_weights=m.fused_layers()))
    want = np.asarray(forward(model32, ids))
    got = np.asarray(fused(model32, ids))
    if not cfg.use_parallel_residual:
        np.testing.assert_array_equal(got, want)
        return
    assert np.abs(got - want).max() <= 1e-5 * want.std()
    bf16 = model_lib.with_params(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"),
                                 jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.to_pure_dict(state)))
    u = 2.0**-8
    for lo in (np.asarray(forward(bf16, ids)), np.asarray(fused(bf16, ids))):
        err = np.abs(lo - want) / want.std()
        assert np.sqrt(np.mean(err**2)) <= 4 * u and err.max() <= 20 * u


@pytest.mark.slow
def test_remat_policies_give_same_loss_and_grads():
    cfg = NeoXConfig(vocab_size=128, hidden_size=32, num_layers=3, num_heads=2)
    ids = random_ids(128, (2, 24))

    def loss_and_grads(policy):
        model = GPTNeoX(cfg.replace(remat_policy=policy), rngs=nnx.Rngs(0))

        def loss(m):
            logp = jax.nn.log_softmax(m(ids[:, :-1]))
            return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

        return nnx.jit(nnx.value_and_grad(loss))(model)

    ref_loss, ref_grads = loss_and_grads("none")
    for policy in ("full", "dots_saveable"):
        loss, grads = loss_and_grads(policy)
        assert np.allclose(loss, ref_loss, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_init_follows_small_and_wang_init():
    cfg = NeoXConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    small, wang = np.sqrt(2 / (5 * 256)), 2 / 4 / np.sqrt(256)
    assert np.std(model.embed_in.embedding[...]) == pytest.approx(small, rel=0.02)
    assert np.std(model.layers.attention.query_key_value.kernel[...]) == pytest.approx(small, rel=0.02)
    assert np.std(model.layers.mlp.dense_h_to_4h.kernel[...]) == pytest.approx(small, rel=0.02)
    assert np.std(model.layers.attention.dense.kernel[...]) == pytest.approx(wang, rel=0.02)
    assert np.std(model.layers.mlp.dense_4h_to_h.kernel[...]) == pytest.approx(wang, rel=0.02)
    assert not np.any(model.layers.attention.dense.bias[...])
    assert np.all(model.final_layer_norm.scale[...] == 1)
    # layers are initialised independently
    k = np.asarray(model.layers.attention.dense.kernel[...])
    assert not np.allclose(k[0], k[1])


@pytest.mark.parametrize("dtype,relative", [("float32", False), ("bfloat16", True)])
def test_attention_backends_equal_the_einsum_reference(dtype, relative):
    """`attention: xla` (JAX's dot_product_attention) against `auto` on a CPU (`causal_blocks` unpadded, the einsum
    left-padded and with the decode cache). All take fp32 scores and softmax and cast the probabilities to the
    compute dtype, so fp32 agrees to rounding (at most 1e-6); in bf16 the same products may round differently once,
    at most one unit roundoff (2**-8) of the logits' spread."""
    cfg = NeoXConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, dtype=dtype)
    reference = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(reference)
    xla = nnx.merge(nnx.split(GPTNeoX(cfg.replace(attention="xla"), rngs=nnx.Rngs(1)))[0], state)
    ids = random_ids(256, (2, 40))
    mask = np.ones((2, 40), np.int32)
    mask[1, :9] = 0  # the second row left-padded
    forward = nnx.jit(lambda m, x, a: m(x, attention_mask=a))
    for attention_mask in (None, mask):
        want = np.asarray(forward(reference, ids, attention_mask))
        got = np.asarray(forward(xla, ids, attention_mask))
        assert np.abs(got - want).max() <= (2.0**-8 * want.std() if relative else 1e-6), attention_mask is not None
    prompts = [list(ids[0, :12]), list(ids[1, :5])]
    assert neox_jax_generate(xla, prompts) == neox_jax_generate(reference, prompts)


def neox_jax_generate(model, prompts):
    from neox_jax import generate

    return generate(model, prompts, max_new_tokens=8)


def test_cudnn_attention_is_refused_where_it_cannot_run():
    from neox_jax.errors import ConfigError

    model = GPTNeoX(NeoXConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, attention="cudnn"),
                    rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="attention='cudnn'.*compiled for cpu devices.*use attention auto or xla"):
        model(np.zeros((1, 4), np.int32))
    with pytest.raises(ConfigError, match="attention='flash': choose one of auto, xla, cudnn"):
        NeoXConfig(attention="flash")
