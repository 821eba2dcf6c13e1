"""Data: real Fashion-MNIST, the held-out validation split, and batches that peers share."""
import pytest
import torch

from online_distill.config.schema import DataConfig
from online_distill.config.schema import ConfigError
from online_distill.data.datasets import Batches, Jitter, load_data, synthetic


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


def test_jitter_is_drawn_alike_for_peers_and_shifts_by_at_most_k():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    jitter = Jitter(shift=2, flip=True)
    a, b = jitter(x, torch.Generator().manual_seed(5)), jitter(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    # without a shift the only change can be a horizontal flip
    c = Jitter(shift=0, flip=True)(x, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(c[i], x[i]) or torch.equal(c[i], x[i].flip(2))
    # a shift moves the image by (dy, dx) in [-2, 2]: its content is the original's, shifted
    for seed in range(10):
        y = Jitter(shift=2)(x, torch.Generator().manual_seed(seed))
        for i in range(2):
            found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                     if torch.equal(y[i, 0, max(0, dy):8 + min(0, dy), max(0, dx):8 + min(0, dx)],
                                    x[i, 0, max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)])]
            assert found


def test_the_border_a_shift_uncovers_is_the_background_not_grey():
    """Hinton et al.'s jitter on MNIST-like images: the padding is the image's background
    (its corner pixel), where zero padding after normalisation would add the mean's grey."""
    x = torch.full((1, 1, 6, 6), -0.8)  # a normalised black background (not exact in float32)
    x[0, 0, 2:4, 2:4] = 2.0
    g = torch.Generator().manual_seed(0)
    for seed in range(5):
        y = Jitter(shift=2, pad="background")(x, torch.Generator().manual_seed(seed))
        assert set(y.unique().tolist()) <= set(x.unique().tolist())
    zero = torch.cat([Jitter(shift=2, pad="zero")(x, torch.Generator().manual_seed(s)) for s in range(20)])
    assert (zero == 0).any()  # the grey the old fixed augmentation padded with
    edge = Jitter(shift=3, pad="edge")(x, g)
    assert set(edge.unique().tolist()) <= set(x.unique().tolist())


def test_the_transfer_set_is_drawn_by_its_own_seed_and_can_leave_classes_out():
    base = dict(dataset="synthetic", val_size=500)
    first = load_data(DataConfig(**base, train_subset=100))
    again = load_data(DataConfig(**base, train_subset=100))
    drawn = load_data(DataConfig(**base, train_subset=100, subset_seed=7))
    other = load_data(DataConfig(**base, train_subset=100, subset_seed=8))
    assert torch.equal(first.train.labels, again.train.labels)
    assert not torch.equal(drawn.train.x, first.train.x) and not torch.equal(drawn.train.x, other.train.x)
    assert torch.equal(drawn.train.x, load_data(DataConfig(**base, train_subset=100, subset_seed=7)).train.x)
    assert torch.equal(drawn.val.labels, first.val.labels)  # the validation split never moves
    left_out = load_data(DataConfig(**base, exclude_classes=(3, 5), train_subset=300, subset_seed=1))
    assert len(left_out.train) == 300 and not torch.isin(left_out.train.labels, torch.tensor([3, 5])).any()
    assert torch.isin(left_out.val.labels, torch.tensor([3])).any() and torch.isin(left_out.test.labels, torch.tensor([3])).any()
    with pytest.raises(ConfigError, match=r"^data.exclude_classes: got \[10\]; allowed: class indices in \[0, 9\]"):
        load_data(DataConfig(**base, exclude_classes=(10,)))
    with pytest.raises(ConfigError, match=r"^data.exclude_classes: .* leaves no training example"):
        load_data(DataConfig(**base, exclude_classes=tuple(range(10))))

