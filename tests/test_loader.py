"""Per-process loading into global sharded arrays, with prefetch (8 emulated CPU devices)."""

import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from neox_jax.data.dataset import GlobalBatches, GPTDataset
from neox_jax.data.indexed import IndexedDataset, IndexedDatasetWriter
from neox_jax.data.loader import Loader, local_rows
from neox_jax.sharding import make_mesh


def test_loader_assembles_the_global_batch_in_step_order(tmp_path):
    rng = np.random.RandomState(0)
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for _ in range(40):
            w.add_document(rng.randint(0, 500, rng.randint(3, 30)))
    dataset = GPTDataset(IndexedDataset(tmp_path / "d"), np.arange(40), 400, 16, seed=5, cache_dir=tmp_path)
    batches = GlobalBatches(dataset, grad_accum_steps=2, micro_batch_size=2, data_parallel=4)
    mesh = make_mesh({"data": 4, "tensor": 2})
    sharding = NamedSharding(mesh, P(None, "data", None))
    assert local_rows(sharding, (2, 8, 17)) == (0, 8)  # one process holds every row here
    with Loader(batches, sharding, seq_length=16, start_step=3, prefetch=2) as loader:
        for expected_step, (step, batch) in zip(range(3, 7), loader):
            assert step == expected_step and list(batch) == ["tokens"]  # no label files: tokens alone
            batch = batch["tokens"]
            assert batch.sharding == sharding and batch.shape == (2, 8, 17)
            np.testing.assert_array_equal(np.asarray(batch), batches.batch(step)["tokens"])
            # each data rank's devices hold its contiguous micro batch
            shard = next(s for s in batch.addressable_shards if s.device == mesh.devices[1, 0, 0])
            np.testing.assert_array_equal(np.asarray(shard.data), batches.batch(step)["tokens"][:, 2:4])
