"""Datasets and the batch iterator that knows about peers and replicas.

Built-in datasets are held in memory as uint8 tensors and normalised per batch on the device,
so feeding a small model costs an index and a copy, not a Python loop per sample. Users may
pass their own dataset builders (any torch Dataset works, through a DataLoader).

Deep mutual learning needs every peer to see the same batch at the same step: the batch order
depends only on (seed, epoch) and the replica index, never on the peer.
"""
from __future__ import annotations

import copy
import functools
import gzip
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import specs
from ..config.schema import ConfigError, DataConfig
from ..core.host import to_format

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class Tensors(Dataset):
    """Examples as one in-memory tensor (N, ...) with int64 labels. A batch costs an index and a
    copy; `convert` turns the stored rows into what the model takes (floats, token ids)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        if len(x) != len(labels):
            raise ValueError(f"{len(x)} examples but {len(labels)} labels")
        self.x, self.labels = x, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def convert(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.convert(self.x[idx].to(device, non_blocking=True))
        return x, self.labels[idx].to(device, non_blocking=True)

    def subset(self, idx: torch.Tensor) -> Tensors:
        out = copy.copy(self)
        out.x, out.labels = self.x[idx], self.labels[idx]
        return out

    def __getitem__(self, i: int):
        x, y = self.batch(torch.tensor([i]), torch.device("cpu"))
        return x[0], y[0]


class ImageTensors(Tensors):
    """Images as a uint8 (N, C, H, W) tensor with int64 labels; normalised when batched."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        super().__init__(images, labels)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255.0

    @property
    def images(self) -> torch.Tensor:
        return self.x

    def convert(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean.to(x.device)) / self.std.to(x.device)


class TokenTensors(Tensors):
    """Token sequences as an (N, L) tensor of ids, 0 for padding (stored small, e.g. uint8);
    batches are int64 ids, what nn.Embedding takes."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError("tokens must be an integer tensor of shape (N, L)")
        super().__init__(tokens, labels)

    def convert(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()


class SequenceTensors(Tensors):
    """Next-token prediction on token windows held as one (N, L + 1) tensor of ids (stored small,
    e.g. uint8), 0 for padding at the right. A batch is x = tokens[:, :-1] and y = tokens[:, 1:]
    as int64, y = IGNORE_INDEX (-100) where the predicted token is padding; x holds 0 only where
    it is padding itself, which a causal model never lets a real position see. `labels` (N, L)
    are derived from the tokens, not stored (they would take 8x the memory). Bits per byte need
    the bytes of text per token: the dataset builder gives them as Splits(bytes_per_token=...),
    not here."""

    def __init__(self, tokens: torch.Tensor):
        if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.is_floating_point():
            raise ValueError(f"tokens must be an integer tensor of shape (N, L + 1) with L >= 1, got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        self.x = tokens  # not Tensors.__init__: the labels are the tokens shifted by one

    def __len__(self) -> int:
        return len(self.x)

    @staticmethod
    def _next_token(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = tokens.long()
        y = t[:, 1:]
        return t[:, :-1], torch.where(y == 0, torch.full_like(y, IGNORE_INDEX), y)

    @property
    def labels(self) -> torch.Tensor:
        return self._next_token(self.x)[1]

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self._next_token(self.x[idx].to(device, non_blocking=True))  # widened on the device: 8x less to copy

    def subset(self, idx: torch.Tensor) -> SequenceTensors:
        out = copy.copy(self)
        out.x = self.x[idx]
        return out


@dataclass(frozen=True)
class Splits:
    """What a dataset builder returns. `train` is split into train/validation by us.

    A model is built and checked with a real sample of `train` (its first examples), so any
    input works: images (C, H, W), 1-D signals (C, L), tables (F,), token ids (L,).
    `input_shape`, when given, is the shape of one example (without the batch dimension) that the
    builder promises; the first example is checked against it. None: whatever the data holds."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...] | None = None
    bytes_per_token: float | None = None
    """Token sequences: bytes of text per token, for bits per byte (val_bpb, test_bpb): 1.0 for
    byte-level tokens (fortunes), the corpus's bytes over its token count for a subword tokenizer.
    The one place a run reads it (load_data); None: no bits per byte."""


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
        num_classes=10, input_shape=(1, 28, 28),
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

        return Splits(tensors(tr), tensors(te), num_classes=num_classes, input_shape=(3, 32, 32))

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

    return Splits(make(n_train, 1), make(n_test, 2), num_classes=num_classes, input_shape=(1, 28, 28))


# ---- language of a word (text) -----------------------------------------------------------------

WORD_LISTS = {  # language -> (Debian word list, the apt package that installs it)
    "english": ("/usr/share/dict/british-english", "wbritish"),
    "french": ("/usr/share/dict/french", "wfrench"),
    "german": ("/usr/share/dict/ngerman", "wngerman"),
    "spanish": ("/usr/share/dict/spanish", "wspanish"),
    "italian": ("/usr/share/dict/italian", "witalian"),
}
WORD_BYTES = 24
"""Words are cut to this many UTF-8 bytes (all but 0.1% fit) and 0-padded."""
BYTE_VOCAB = 256
"""Token ids of the text datasets: a word's UTF-8 bytes (1..255; 0 is padding). A fixed
vocabulary: any text maps into it, and the built-in char_* models embed exactly these ids."""


def encode_bytes(words: list[str], length: int = WORD_BYTES) -> torch.Tensor:
    """(N, length) uint8 token ids: each word's UTF-8 bytes, cut to `length`, 0-padded."""
    buf = bytearray(len(words) * length)
    for i, w in enumerate(words):
        b = w.encode("utf-8")[:length]
        buf[i * length: i * length + len(b)] = b
    return torch.frombuffer(buf, dtype=torch.uint8).view(len(words), length).clone()


def lang_words(cfg: DataConfig) -> Splits:
    """Which of five languages a word is: characters in (UTF-8 byte ids), language out.

    From Debian's word lists (packages wbritish wfrench wngerman wspanish witalian): words are
    lower-cased and cut to WORD_BYTES bytes; words with an apostrophe (English possessives,
    Italian elisions give the answer away) and words found in more than one list are dropped. Each language keeps as many
    words as the smallest list has left (balanced classes: chance is 0.2), picked by a CRC32 of
    the word, and every 10th of them in that order is a test word. The split depends on the
    words alone, never on the lists' order or on a seed: the same lists give the same split.
    """
    missing = [pkg for path, pkg in WORD_LISTS.values() if not os.path.exists(path)]
    if missing:
        raise ConfigError(f"data.dataset: 'lang_words' reads Debian's word lists in /usr/share/dict, and "
                          f"{len(missing)} of them are missing; install them: apt-get install {' '.join(missing)}")
    # a few seconds to read 1M words: kept per process (the driver checks the data more than once)
    key = tuple((path, os.path.getmtime(path)) for path, _ in WORD_LISTS.values())
    return _lang_words(key)


@functools.lru_cache(maxsize=1)
def _lang_words(lists: tuple[tuple[str, float], ...]) -> Splits:
    words: dict[str, set[str]] = {}
    for lang, (path, _) in zip(WORD_LISTS, lists):
        with open(path, encoding="utf-8") as f:
            # cut to WORD_BYTES first, so that two long words the model cannot tell apart are one word
            words[lang] = {w.encode()[:WORD_BYTES].decode("utf-8", "ignore")
                           for w in (line.strip().lower() for line in f) if len(w) >= 2 and "'" not in w}
    seen: dict[str, int] = {}
    for ws in words.values():
        for w in ws:
            seen[w] = seen.get(w, 0) + 1
    kept = {lang: sorted((w for w in ws if seen[w] == 1), key=lambda w: (zlib.crc32(w.encode()), w))
            for lang, ws in words.items()}
    per_class = min(len(ws) for ws in kept.values())
    train_words, train_y, test_words, test_y = [], [], [], []
    for label, ws in enumerate(kept.values()):
        for i, w in enumerate(ws[:per_class]):
            (test_words if i % 10 == 0 else train_words).append(w)
            (test_y if i % 10 == 0 else train_y).append(label)
    return Splits(TokenTensors(encode_bytes(train_words), torch.tensor(train_y)),
                  TokenTensors(encode_bytes(test_words), torch.tensor(test_y)),
                  num_classes=len(WORD_LISTS), input_shape=(WORD_BYTES,))


def fortunes(cfg: DataConfig) -> Splits:
    """Next-byte prediction on Debian's fortunes (apt-get install fortunes; online_distill.data.corpus
    reads and splits it, by document): windows of data.seq_len bytes (default 128), vocabulary 256."""
    from .corpus import SEQ_LEN, fortunes_tokens

    seq_len = int(getattr(cfg, "seq_len", None) or SEQ_LEN)
    train, test = fortunes_tokens(seq_len)
    return Splits(SequenceTensors(train), SequenceTensors(test), num_classes=BYTE_VOCAB, input_shape=(seq_len,),
                  bytes_per_token=1.0)  # byte-level tokens


def addition(cfg: DataConfig) -> Splits:
    """Three-digit addition as next-byte prediction (data/tasks.py: answers of several tokens,
    exactly checkable), one problem per window: data.seq_len must be 12."""
    from .tasks import ADDITION_LEN, addition_problems

    if cfg.seq_len != ADDITION_LEN - 1:
        raise ConfigError(f"data.seq_len: got {cfg.seq_len}; allowed: {ADDITION_LEN - 1} with data.dataset "
                          f"'addition' (a window holds one {ADDITION_LEN}-byte problem)", "data.seq_len")
    train, test = addition_problems()
    return Splits(SequenceTensors(train), SequenceTensors(test), num_classes=BYTE_VOCAB,
                  input_shape=(ADDITION_LEN - 1,), bytes_per_token=1.0)


DATASETS: dict[str, DatasetBuilder] = {
    "fashion_mnist": fashion_mnist,
    "cifar10": _cifar("CIFAR10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _cifar("CIFAR100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": synthetic,
    "lang_words": lang_words,
    "fortunes": fortunes,
    "addition": addition,
}


# ---- splits and batches ----------------------------------------------------------------------

@dataclass
class Data:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    sample: torch.Tensor
    """The first SAMPLE_ROWS examples of the training split, batched as the loop batches them:
    every model is built and checked with it (lazy layers take their shapes from it)."""
    label_shape: tuple[int, ...] = ()
    """One example's label shape: () for a class, (L,) for a next token at each of L positions."""
    bytes_per_token: float | None = None
    """Splits.bytes_per_token, as the dataset builder gave it."""

    @property
    def is_sequence(self) -> bool:
        return len(self.label_shape) > 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.sample.shape[1:])


SAMPLE_ROWS = 2


def describe(x: torch.Tensor) -> str:
    """'(2, 1, 28, 28) float32': how error messages name a batch."""
    return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"


def _take(ds: Dataset, idx: torch.Tensor) -> Dataset:
    return ds.subset(idx) if isinstance(ds, Tensors) else Subset(ds, idx.tolist())


def _builder_name(builder) -> str:
    return getattr(builder, "__qualname__", None) or repr(builder)


def resolve_dataset(spec: str, builders: dict[str, DatasetBuilder] | None = None) -> DatasetBuilder:
    """The dataset builder data.dataset names (a name, an import path, either with arguments:
    online_distill.config.specs), or a ConfigError of one line naming data.dataset."""
    try:
        return specs.resolve(spec, DATASETS, builders, fixed=1, what="dataset")
    except specs.SpecError as e:
        raise ConfigError(f"data.dataset: {e}", "data.dataset") from None


IGNORE_INDEX = -100
"""A label that counts nowhere (padding of a token sequence), as torch's cross_entropy has it."""


def load_data(cfg: DataConfig, builders: dict[str, DatasetBuilder] | None = None) -> Data:
    """Build the dataset, hold a validation split out of its training set, take the run's
    training examples (data.exclude_classes, data.train_subset, data.subset_seed) and check its
    first examples: a builder that fails, a label outside [0, num_classes), examples unlike the
    promised input_shape, or jitter on data that are not images are a ConfigError naming the
    builder and what it returned."""
    builder = resolve_dataset(cfg.dataset, builders)
    who = f"data.dataset: the dataset builder {cfg.dataset!r} ({_builder_name(builder)})"
    try:
        splits = builder(cfg)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{who} raised {type(e).__name__}: {e}") from e
    if not isinstance(splits, Splits):
        raise ConfigError(f"{who} returned {type(splits).__name__}; allowed: an online_distill.data.datasets.Splits"
                          "(train, test, num_classes, input_shape=None)")
    if not isinstance(splits.num_classes, int) or splits.num_classes < 2:
        raise ConfigError(f"{who} returned num_classes={splits.num_classes!r}; allowed: an integer >= 2")
    _check_bytes_per_token(splits, who)
    n = len(splits.train)
    if cfg.val_size >= n:
        raise ConfigError(f"data.val_size: got {cfg.val_size}; allowed: fewer than the {n} training examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, train_idx = perm[: cfg.val_size], perm[cfg.val_size:]
    train_idx = _training_examples(cfg, splits, train_idx)
    test = splits.test
    if cfg.test_subset is not None and cfg.test_subset < len(test):
        test_perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.split_seed))
        test = _take(test, test_perm[: cfg.test_subset])
    train = _take(splits.train, train_idx)
    try:
        sample, labels = next(iter(Batches(train, SAMPLE_ROWS, torch.device("cpu"), shuffle=False, drop_last=False)))
    except Exception as e:
        raise ConfigError(f"{who}: batching its first {SAMPLE_ROWS} training examples raised {type(e).__name__}: "
                          f"{e}; allowed: a Dataset whose items are (input tensor, integer label)") from e
    if not isinstance(sample, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ConfigError(f"{who}: its examples batch to ({type(sample).__name__}, {type(labels).__name__}); "
                          "allowed: (input tensor, integer label) pairs")
    if splits.input_shape is not None and tuple(sample.shape[1:]) != tuple(splits.input_shape):
        raise ConfigError(f"{who} promised input_shape={tuple(splits.input_shape)}, but its first training examples "
                          f"batch to {describe(sample)}; allowed: examples of the promised shape, or input_shape=None")
    for split, ds in (("train", splits.train), ("test", splits.test)):
        _check_labels(ds, labels if split == "train" else None, splits.num_classes, f"{who}, {split} split")
    if cfg.augments and not (sample.dim() == 4 and sample.is_floating_point()):
        field = "data.shift" if cfg.shift else "data.flip"
        raise ConfigError(f"{field}: got {getattr(cfg, field[5:])!r}; allowed: {0 if cfg.shift else False} for dataset "
                          f"{cfg.dataset!r}, whose examples batch to {describe(sample)}: jitter and flips are for "
                          "images (B, C, H, W)", field)
    return Data(train, _take(splits.train, val_idx), test, splits.num_classes, sample, tuple(labels.shape[1:]),
                splits.bytes_per_token)


def _check_bytes_per_token(splits: Splits, who: str) -> None:
    """Bits per byte come from Splits.bytes_per_token alone: a positive number, or None. One set on
    the train or test dataset instead would never be read, so it is refused, naming the field."""
    bpt = splits.bytes_per_token
    if bpt is not None and (isinstance(bpt, bool) or not isinstance(bpt, (int, float)) or not 0 < bpt < float("inf")):
        raise ConfigError(f"{who} returned bytes_per_token={bpt!r}; allowed: a positive number (bytes of text per "
                          "token, for bits per byte) or None")
    for split in ("train", "test"):
        if bpt is None and getattr(getattr(splits, split), "bytes_per_token", None) is not None:
            raise ConfigError(f"{who}: its {split} dataset has a bytes_per_token, which a run does not read; allowed: "
                              "Splits(..., bytes_per_token=...), the one place bits per byte take it from")


def labels_of(ds: Dataset) -> torch.Tensor | None:
    """Every label of a dataset without reading its inputs, where the dataset keeps them apart:
    our in-memory tensors, a TensorDataset, a torchvision dataset (`targets`, through its
    `target_transform`), or a Subset of one of these; None for any other Dataset (reading all of
    it could take long), and for one whose own __getitem__ gives other labels than its `targets`
    (a joint `transforms`, a subclass that remaps them): its labels are then checked in every batch."""
    if isinstance(ds, Tensors):
        return ds.labels
    if isinstance(ds, Subset):
        inner = labels_of(ds.dataset)
        return None if inner is None else inner[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[1]
    targets = getattr(ds, "targets", None)
    if targets is None or len(targets) != len(ds):
        return None
    transform = getattr(ds, "target_transform", None)
    if transform is not None:  # what __getitem__ returns is the transformed label
        try:
            targets = [transform(t) for t in (targets.tolist() if isinstance(targets, torch.Tensor) else targets)]
        except Exception:  # noqa: BLE001 - a transform that needs more than the label: read through __getitem__
            return None
    try:
        labels = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError):
        return None
    return labels if _agrees_with_getitem(ds, labels) else None


SAMPLED_LABELS = 16
"""Examples read through a dataset's own __getitem__, spread over it, to see that the labels
read apart from them (`targets`) are the labels it returns."""


def _agrees_with_getitem(ds: Dataset, labels: torch.Tensor) -> bool:
    idx = _spread(len(ds), SAMPLED_LABELS)
    got = _labels_read(ds, idx)
    return got is not None and got.shape == labels[idx].shape and bool((got == labels[idx]).all())


def _spread(n: int, k: int) -> torch.Tensor:
    """k indices spread evenly over range(n), the first and last included (fewer when n < k)."""
    return torch.linspace(0, max(n - 1, 0), min(k, n)).round().long().unique()


def _labels_read(ds: Dataset, idx: torch.Tensor) -> torch.Tensor | None:
    """The labels ds[i] returns for these indices (None when they do not make one tensor)."""
    try:
        return torch.stack([torch.as_tensor(ds[int(i)][1]) for i in idx])
    except Exception:  # noqa: BLE001 - the first batch's check names what is wrong with such items
        return None


def _training_examples(cfg: DataConfig, splits: Splits, train_idx: torch.Tensor) -> torch.Tensor:
    """The run's training examples among `train_idx` (the split left after validation): without
    the excluded classes, then train_subset of them, the first ones or drawn with subset_seed."""
    if cfg.exclude_classes:
        bad = [c for c in cfg.exclude_classes if c >= splits.num_classes]
        if bad:
            raise ConfigError(f"data.exclude_classes: got {list(cfg.exclude_classes)}; allowed: class indices in "
                              f"[0, {splits.num_classes - 1}] (the dataset has {splits.num_classes} classes)",
                              "data.exclude_classes")
        labels = labels_of(splits.train)
        if labels is None or labels.dim() != 1:
            raise ConfigError(f"data.exclude_classes: dataset {cfg.dataset!r} does not expose one label per example "
                              "(an online_distill.data.datasets.Tensors, a TensorDataset or a dataset with `targets`); allowed: "
                              "[] for it", "data.exclude_classes")
        keep = ~torch.isin(labels[train_idx], torch.tensor(cfg.exclude_classes))
        train_idx = train_idx[keep]
        if len(train_idx) == 0:
            raise ConfigError(f"data.exclude_classes: {list(cfg.exclude_classes)} leaves no training example",
                              "data.exclude_classes")
    if cfg.train_subset is not None:
        if cfg.subset_seed is not None:
            order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.subset_seed))
            train_idx = train_idx[order]
        train_idx = train_idx[: cfg.train_subset]
    return train_idx


def _check_labels(ds: Dataset, first: torch.Tensor | None, num_classes: int, who: str) -> None:
    """Labels are class indices in [0, num_classes) (or IGNORE_INDEX where a position counts
    nowhere, e.g. a sequence's padding): all of them where the dataset keeps its labels apart
    (labels_of), the first batch's for any other Dataset (the loop checks each batch it trains
    on: loop.check_labels)."""
    y = labels_of(ds)
    if y is None and len(ds):  # read through its own __getitem__: the first batch, and examples over the whole set
        _check_label_range(_labels_read(ds, _spread(len(ds), SAMPLED_ACROSS)), num_classes, who)
    y = first if y is None else y
    if y is None or len(y) == 0:
        return
    if y.dtype != torch.int64:  # what cross_entropy takes as class indices
        raise ConfigError(f"{who}: labels batch to {describe(y)}; allowed: int64 class indices (Python ints or "
                          "torch.long), one per example or one per position")
    _check_label_range(y, num_classes, who)


SAMPLED_ACROSS = 256
"""Examples read through __getitem__, spread over a dataset whose labels are not kept apart, to
refuse bad labels before training (every batch is checked too)."""


def _check_label_range(y: torch.Tensor | None, num_classes: int, who: str) -> None:
    real = None if y is None else y[y != IGNORE_INDEX]
    if real is None or len(real) == 0 or real.is_floating_point():
        return
    lo, hi = int(real.min()), int(real.max())
    if lo < 0 or hi >= num_classes:
        raise ConfigError(f"{who}: labels range over [{lo}, {hi}], but num_classes={num_classes}; allowed: class "
                          f"indices in [0, {num_classes - 1}] (set num_classes to the number of classes)")


@dataclass(frozen=True)
class Jitter:
    """Random shifts (and flips) of a batch of images, the training-time jitter of Hinton et al.
    2015 (their teacher: "jittered by up to two pixels in any direction"). Drawn from a generator
    seeded by (seed, epoch, shard), so every peer of a cohort sees the same jittered batch.

    `pad` fills the border a shift uncovers: 'background' with each image's own top-left pixel
    (black for MNIST-like images: the zero padding of normalised images would add grey edges),
    'zero' with 0 (after normalisation: the mean), 'edge' with the nearest pixel, 'reflect'."""

    shift: int = 0
    flip: bool = False
    pad: str = "background"

    @classmethod
    def of(cls, cfg: DataConfig) -> Jitter | None:
        return cls(cfg.shift, cfg.flip, cfg.pad) if cfg.augments else None

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.flip:
            flip = torch.rand(b, generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
        k = self.shift
        if k == 0:
            return x
        dx = torch.randint(0, 2 * k + 1, (b,), generator=g)  # the crop's corner in the padded image:
        dy = torch.randint(0, 2 * k + 1, (b,), generator=g)  # k means no shift
        padded = _pad(x, k, self.pad)
        rows = (dy.view(-1, 1) + torch.arange(h)).to(x.device)  # (B, H)
        cols = (dx.view(-1, 1) + torch.arange(w)).to(x.device)  # (B, W)
        bi = torch.arange(b, device=x.device).view(-1, 1, 1)
        out = padded.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)
        return out.contiguous()


def _pad(x: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    F = torch.nn.functional
    if mode == "background":  # each image's corner pixel, per channel
        b, c, h, w = x.shape
        padded = x[:, :, :1, :1].expand(b, c, h + 2 * k, w + 2 * k).clone()
        padded[:, :, k:k + h, k:k + w] = x
        return padded
    if mode == "zero":
        return F.pad(x, (k, k, k, k))
    return F.pad(x, (k, k, k, k), mode={"edge": "replicate", "reflect": "reflect"}[mode])


class Batches:
    """Batches of one replica's shard, in an order set by (seed, epoch) alone.

    Every replica gets the same number of batches (the shard is cut to an equal length) so
    that collectives inside the loop stay in step. Images come in `memory_format` (the run's
    layout: host.memory_format).
    """

    def __init__(self, ds: Dataset, batch_size: int, device: torch.device, *, seed: int = 0, shard: int = 0,
                 num_shards: int = 1, shuffle: bool = True, drop_last: bool = True, jitter: Jitter | None = None,
                 num_workers: int = 0, max_batches: int | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.ds, self.batch_size, self.device, self.memory_format = ds, batch_size, device, memory_format
        self.seed, self.shard, self.num_shards = seed, shard, num_shards
        self.shuffle, self.drop_last, self.jitter = shuffle, drop_last, jitter
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

    def indices(self) -> torch.Tensor:
        """The examples this shard yields in an epoch, in order (indices into the dataset)."""
        return self._indices()[: len(self) * self.batch_size]

    def __len__(self) -> int:
        n = len(self._indices())
        k = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return min(k, self.max_batches) if self.max_batches is not None else k

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        chunks = list(idx.split(self.batch_size))[: len(self)]
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + self.shard)
        if isinstance(self.ds, Tensors):
            batches = (self.ds.batch(c, self.device) for c in chunks)
        else:
            loader = DataLoader(self.ds, batch_sampler=[c.tolist() for c in chunks], num_workers=self.num_workers,
                                pin_memory=self.device.type == "cuda")
            batches = ((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in loader)
        for x, y in batches:
            yield to_format(self.jitter(x, g) if self.jitter is not None else x, self.memory_format), y
