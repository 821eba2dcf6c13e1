"""Datasets and the batch iterator that knows about peers and replicas.

Built-in datasets are held in memory as uint8 tensors and normalised per batch on the device,
so feeding a small model costs an index and a copy, not a Python loop per sample. Users may
pass their own dataset builders (any torch Dataset works, through a DataLoader).

Deep mutual learning needs every peer to see the same batch at the same step: the batch order
depends only on (seed, epoch) and the replica index, never on the peer.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .config import ConfigError, DataConfig

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class ImageTensors(Dataset):
    """Images as a uint8 (N, C, H, W) tensor with int64 labels; normalised when batched."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255.0

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx].to(device, non_blocking=True).float()
        x = (x - self.mean.to(device)) / self.std.to(device)
        return x, self.labels[idx].to(device, non_blocking=True)

    def subset(self, idx: torch.Tensor) -> "ImageTensors":
        out = ImageTensors.__new__(ImageTensors)
        out.images, out.labels, out.mean, out.std = self.images[idx], self.labels[idx], self.mean, self.std
        return out

    def __getitem__(self, i: int):
        x, y = self.batch(torch.tensor([i]), torch.device("cpu"))
        return x[0], y[0]


@dataclass
class Splits:
    """What a dataset builder returns. `train` is split into train/validation by us."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


DatasetBuilder = Callable[[DataConfig], Splits]


# ---- Fashion-MNIST ---------------------------------------------------------------------------

def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path} is not an idx file of unsigned bytes")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def _find_idx(dirs: list[str], stem: str) -> str | None:
    for d in dirs:
        for name in (f"{stem}.gz", stem):
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    return None


def fashion_mnist(cfg: DataConfig) -> Splits:
    root = os.path.expanduser(cfg.root)
    dirs = [os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "fashion-mnist"), root, DEBIAN_FASHION_MNIST]
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [_find_idx(dirs, s) for s in stems]
    if None in paths:
        if not cfg.download:
            raise ConfigError(
                f"data.dataset: Fashion-MNIST not found in {dirs}; set data.download=true, "
                "or install Debian's dataset-fashion-mnist package"
            )
        from torchvision.datasets import FashionMNIST

        with _download_lock(root):
            FashionMNIST(root, train=True, download=True)
            FashionMNIST(root, train=False, download=True)
        paths = [_find_idx(dirs, s) for s in stems]
    xtr, ytr, xte, yte = (torch.from_numpy(_read_idx(p).copy()) for p in paths)
    mean, std = (0.2860,), (0.3530,)
    return Splits(
        train=ImageTensors(xtr.unsqueeze(1), ytr, mean, std),
        test=ImageTensors(xte.unsqueeze(1), yte, mean, std),
        num_classes=10, in_channels=1, image_size=28,
    )


# ---- CIFAR -----------------------------------------------------------------------------------

def _download_lock(root: str):
    from filelock import FileLock

    os.makedirs(root, exist_ok=True)
    return FileLock(os.path.join(root, ".download.lock"))


def _cifar(cls_name: str, num_classes: int, mean, std) -> DatasetBuilder:
    def build(cfg: DataConfig) -> Splits:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        root = os.path.expanduser(cfg.root)
        try:
            with _download_lock(root):
                tr, te = cls(root, train=True, download=cfg.download), cls(root, train=False, download=cfg.download)
        except RuntimeError as e:
            raise ConfigError(
                f"data.dataset: {cls_name} not found under data.root={cfg.root!r} and data.download is "
                f"{cfg.download} ({e}); put a copy there or allow the download"
            ) from None

        def tensors(ds):
            x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            return ImageTensors(x, torch.tensor(ds.targets), mean, std)

        return Splits(tensors(tr), tensors(te), num_classes=num_classes, in_channels=3, image_size=32)

    return build


# ---- synthetic -------------------------------------------------------------------------------

def synthetic(cfg: DataConfig, n_train: int = 4000, n_test: int = 1000, num_classes: int = 10) -> Splits:
    """Learnable 1x28x28 images: a fixed noisy prototype per class. For smoke tests and benchmarks."""
    g = torch.Generator().manual_seed(1234)
    protos = torch.rand(num_classes, 1, 28, 28, generator=g)

    def make(n: int, seed: int) -> ImageTensors:
        gg = torch.Generator().manual_seed(seed)
        y = torch.randint(0, num_classes, (n,), generator=gg)
        x = 0.6 * protos[y] + 0.4 * torch.rand(n, 1, 28, 28, generator=gg)
        return ImageTensors((x * 255).to(torch.uint8), y, (0.5,), (0.25,))

    return Splits(make(n_train, 1), make(n_test, 2), num_classes=num_classes, in_channels=1, image_size=28)


DATASETS: dict[str, DatasetBuilder] = {
    "fashion_mnist": fashion_mnist,
    "cifar10": _cifar("CIFAR10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _cifar("CIFAR100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": synthetic,
}


# ---- splits and batches ----------------------------------------------------------------------

@dataclass
class Data:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


def _take(ds: Dataset, idx: torch.Tensor) -> Dataset:
    return ds.subset(idx) if isinstance(ds, ImageTensors) else Subset(ds, idx.tolist())


def load_data(cfg: DataConfig, builders: dict[str, DatasetBuilder] | None = None) -> Data:
    """Build the dataset and hold a validation split out of its training set."""
    splits = {**DATASETS, **(builders or {})}[cfg.dataset](cfg)
    n = len(splits.train)
    if cfg.val_size >= n:
        raise ConfigError(f"data.val_size: got {cfg.val_size}; allowed: fewer than the {n} training examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, train_idx = perm[: cfg.val_size], perm[cfg.val_size:]
    if cfg.train_subset is not None:
        train_idx = train_idx[: cfg.train_subset]
    test = splits.test
    if cfg.test_subset is not None and cfg.test_subset < len(test):
        test_perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.split_seed))
        test = _take(test, test_perm[: cfg.test_subset])
    return Data(_take(splits.train, train_idx), _take(splits.train, val_idx), test,
                splits.num_classes, splits.in_channels, splits.image_size)


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip, drawn from g so peers draw alike."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy.view(-1, 1) + torch.arange(h)).to(x.device)  # (B, H)
    cols = (dx.view(-1, 1) + torch.arange(w)).to(x.device)  # (B, W)
    bi = torch.arange(b, device=x.device).view(-1, 1, 1)
    return padded.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)


class Batches:
    """Batches of one replica's shard, in an order set by (seed, epoch) alone.

    Every replica gets the same number of batches (the shard is cut to an equal length) so
    that collectives inside the loop stay in step.
    """

    def __init__(self, ds: Dataset, batch_size: int, device: torch.device, *, seed: int = 0, shard: int = 0,
                 num_shards: int = 1, shuffle: bool = True, drop_last: bool = True, augment: bool = False,
                 num_workers: int = 0, max_batches: int | None = None):
        self.ds, self.batch_size, self.device = ds, batch_size, device
        self.seed, self.shard, self.num_shards = seed, shard, num_shards
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.num_workers, self.max_batches, self.epoch = num_workers, max_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.ds)
        if self.shuffle:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            idx = torch.arange(n)
        shard = idx[self.shard::self.num_shards]
        # training cuts shards to one length so every replica takes the same number of steps
        return shard[: n // self.num_shards] if self.drop_last else shard

    def __len__(self) -> int:
        n = len(self._indices())
        k = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return min(k, self.max_batches) if self.max_batches is not None else k

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        chunks = list(idx.split(self.batch_size))[: len(self)]
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + self.shard)
        if isinstance(self.ds, ImageTensors):
            batches = (self.ds.batch(c, self.device) for c in chunks)
        else:
            loader = DataLoader(self.ds, batch_sampler=[c.tolist() for c in chunks], num_workers=self.num_workers,
                                pin_memory=self.device.type == "cuda")
            batches = ((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in loader)
        for x, y in batches:
            yield (augment_batch(x, g) if self.augment else x), y
