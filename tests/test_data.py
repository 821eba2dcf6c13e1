"""Data: real Fashion-MNIST, the held-out validation split, and batches that peers share."""
import torch

from online_distill.config import DataConfig
from online_distill.data import Batches, augment_batch, load_data, synthetic


def test_fashion_mnist_is_real_and_split_without_overlap():
    data = load_data(DataConfig(dataset="fashion_mnist", val_size=5000))
    assert (data.input_shape, data.num_classes) == ((1, 28, 28), 10) and data.sample.dtype == torch.float32
    assert len(data.train) == 55000 and len(data.val) == 5000 and len(data.test) == 10000
    assert data.train.images.shape[1:] == (1, 28, 28) and data.train.labels.unique().numel() == 10
    # validation examples are held out of training: no image appears in both
    tr = {hash(x.numpy().tobytes()) for x in data.train.images[:20000]}
    assert not any(hash(x.numpy().tobytes()) in tr for x in data.val.images[:500])


def test_split_is_fixed_by_split_seed_not_by_run_seed():
    a = load_data(DataConfig(dataset="synthetic", val_size=300, train_subset=500))
    b = load_data(DataConfig(dataset="synthetic", val_size=300, train_subset=500))
    c = load_data(DataConfig(dataset="synthetic", val_size=300, train_subset=500, split_seed=1))
    assert torch.equal(a.val.labels, b.val.labels) and not torch.equal(a.val.images, c.val.images)
    assert len(a.train) == 500 and len(a.val) == 300


def test_all_peers_see_identical_batches_and_replicas_disjoint_shards():
    ds = synthetic(DataConfig()).train
    cpu = torch.device("cpu")
    peer0 = list(Batches(ds, 32, cpu, seed=3, shard=0, num_shards=2))
    peer1 = list(Batches(ds, 32, cpu, seed=3, shard=0, num_shards=2))  # another peer, same replica index
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(peer0, peer1))
    r0 = Batches(ds, 32, cpu, seed=3, shard=0, num_shards=2)
    r1 = Batches(ds, 32, cpu, seed=3, shard=1, num_shards=2)
    assert len(r0) == len(r1) == (len(ds) // 2) // 32
    assert not set(r0._indices().tolist()) & set(r1._indices().tolist())


def test_order_changes_with_epoch_and_seed_only():
    ds = synthetic(DataConfig()).train
    b = Batches(ds, 16, torch.device("cpu"), seed=0)
    e0 = b._indices().clone()
    b.set_epoch(1)
    assert not torch.equal(e0, b._indices())
    b.set_epoch(0)
    assert torch.equal(e0, b._indices())


def test_eval_batches_cover_every_example_once():
    ds = synthetic(DataConfig()).test
    seen = torch.cat([y for _, y in Batches(ds, 300, torch.device("cpu"), shuffle=False, drop_last=False)])
    assert torch.equal(seen, ds.labels)


def test_augmentation_is_a_crop_and_flip_drawn_alike_for_peers():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    a = augment_batch(x, torch.Generator().manual_seed(5), pad=2)
    b = augment_batch(x, torch.Generator().manual_seed(5), pad=2)
    assert torch.equal(a, b) and a.shape == x.shape
    # with pad=0 the only change can be a horizontal flip
    c = augment_batch(x, torch.Generator().manual_seed(1), pad=0)
    for i in range(2):
        assert torch.equal(c[i], x[i]) or torch.equal(c[i], x[i].flip(2))
