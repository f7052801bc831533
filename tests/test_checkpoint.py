"""checkpoint.py alone: params checkpoints, and TrainCheckpointer's rotation, layouts and partial restores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from neox_jax import checkpoint as ckpt
from neox_jax.config import NeoXConfig
from neox_jax.pretrained import abstract_params
from neox_jax.sharding import make_mesh

CONFIG = NeoXConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=32)


def random_params(seed=0, dtype=np.float32):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(dtype)), abstract_params(CONFIG))


def test_params_checkpoint_round_trips_bit_exact_and_never_overwrites(tmp_path):
    params = random_params()
    ckpt.save_params_checkpoint(tmp_path / "p", params, CONFIG)
    assert ckpt.is_params_checkpoint(tmp_path / "p") and not ckpt.is_train_checkpoint(tmp_path / "p")
    back, config = ckpt.load_params_checkpoint(tmp_path / "p")
    assert config == CONFIG
    jax.tree.map(np.testing.assert_array_equal, back, params)
    with pytest.raises(FileExistsError, match="already exists"):
        ckpt.save_params_checkpoint(tmp_path / "p", params, CONFIG)


def state(step: int):
    """A train-state-like tree: bf16 working weights, fp32 master, a moment, a step counter."""
    master = random_params(step)
    return {"step": jnp.int32(step), "params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), master),
            "master": master, "opt_state": {"mu": jax.tree.map(lambda x: 0.5 * x, master)}}


def test_rotation_keeps_the_last_and_every_kth(tmp_path):
    c = ckpt.TrainCheckpointer(tmp_path, keep_last=2, keep_every=4, async_save=False)
    for step in range(1, 10):
        c.save(step, state(step), {"step": step})
    c.close()
    assert ckpt.TrainCheckpointer(tmp_path).all_steps() == [4, 8, 9]
    assert ckpt.is_train_checkpoint(tmp_path)


def test_restore_onto_a_mesh_and_weights_only(tmp_path):
    c = ckpt.TrainCheckpointer(tmp_path, async_save=False)
    saved = state(3)
    c.save(3, saved, {"step": 3, "note": "x"})
    assert c.read_meta(3) == {"step": 3, "note": "x"}
    mesh = make_mesh({"data": 2, "pipe": 1, "tensor": 4})
    split = NamedSharding(mesh, P(None, "tensor"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split if x.ndim == 2 and
                                                         x.shape[1] % 4 == 0 else NamedSharding(mesh, P())), saved)
    restored = c.restore(3, target)
    jax.tree.map(lambda r, s, t: (np.testing.assert_array_equal(np.asarray(r), np.asarray(s)),
                                  r.sharding == t.sharding or pytest.fail(f"{r.sharding} != {t.sharding}")),
                 restored, saved, target)
    # only the weights, the fp32 master (not the bf16 copy), cast and laid out as asked
    want = abstract_params(CONFIG, mesh)
    weights = c.restore_weights(3, want)
    jax.tree.map(lambda w, m, a: (np.testing.assert_array_equal(np.asarray(w), np.asarray(m)),
                                  w.sharding == a.sharding or pytest.fail("layout")), weights, saved["master"], want)
    c.close()


def test_a_checkpoint_of_another_shape_names_the_tensor(tmp_path):
    c = ckpt.TrainCheckpointer(tmp_path, async_save=False)
    c.save(1, state(1), {})
    wider = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(1))
    wider["master"]["embed_in"]["embedding"] = jax.ShapeDtypeStruct((65, 32), jnp.float32)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"master/embed_in/embedding has shape \(64, 32\)"):
        c.restore(1, wider)
    del wider["opt_state"]
    wider["extra"] = jax.ShapeDtypeStruct((1,), jnp.float32)
    with pytest.raises(ckpt.CheckpointMismatchError, match="has no tensor extra"):
        c.restore(1, wider)
    c.close()
