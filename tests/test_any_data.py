"""Any input shape: models built on the dataset's real first examples (1-D signals, token ids,
images), the built-in text dataset, the Hugging Face adapter, and user errors refused on the
driver before Ray starts."""
import math

import pytest
import torch
from torch import nn

import online_distill
from online_distill.run import launch  # noqa: F401
from online_distill.config.schema import ConfigError, DataConfig
from online_distill.data.datasets import BYTE_VOCAB, WORD_BYTES, SequenceTensors, Splits, Tensors, lang_words, load_data
from online_distill.models.builders import build_model


# ---- a 1-D signal data set and a user 1-D conv net ------------------------------------------

def waves(cfg: DataConfig, n: int = 1200, length: int = 64) -> Splits:
    """Noisy sine waves of 4 frequencies, shape (1, 64): the class is the frequency."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=g)
    t = torch.arange(length).float()
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    x = torch.sin((y.view(-1, 1).float() + 1) * 2 * math.pi * t / 32 + phase) + 0.5 * torch.randn(n, length, generator=g)
    ds = Tensors(x.unsqueeze(1), y)
    return Splits(ds.subset(torch.arange(1000)), ds.subset(torch.arange(1000, n)), num_classes=4)


def conv1d(input_shape, num_classes):
    channels, _ = input_shape
    return nn.Sequential(nn.Conv1d(channels, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                         nn.Conv1d(16, 16, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                         nn.Flatten(), nn.Linear(16, num_classes))


# ---- a token-sequence data set and a user embedding net ---------------------------------------

def three_languages(cfg: DataConfig) -> Splits:
    """English, French and German words from the built-in lang_words: token ids (24,)."""
    s = lang_words(cfg)

    def pick(ds):
        keep = torch.nonzero(ds.labels < 3).flatten()
        return ds.subset(keep)

    return Splits(pick(s.train), pick(s.test), num_classes=3, input_shape=(WORD_BYTES,))


class BagOfBigrams(nn.Module):
    """Embedded token ids, one convolution of width 2, mean over the word: a user text model."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.embed = nn.Embedding(BYTE_VOCAB, 16, padding_idx=0)
        self.conv = nn.Conv1d(16, 32, 2)
        self.head = nn.Linear(32, num_classes)

    def forward(self, ids):
        return self.head(torch.relu(self.conv(self.embed(ids).transpose(1, 2))).mean(2))


def bigrams(input_shape, num_classes):
    assert len(input_shape) == 1, input_shape
    return BagOfBigrams(num_classes)


def tiny_bert():
    """A randomly initialised 2-layer BERT (hidden 32) through the adapter: nothing is downloaded."""
    from transformers import BertConfig

    from online_distill.models import hf

    return hf.sequence_classifier(BertConfig(vocab_size=BYTE_VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=WORD_BYTES, pad_token_id=0))


# ---- unit: shapes, the text data set, the adapter ---------------------------------------------

def test_models_are_built_on_the_real_first_examples_of_any_shape():
    data = load_data(DataConfig(dataset="synthetic", val_size=100, train_subset=200), {"waves": waves})
    assert data.input_shape == (1, 28, 28) and data.sample.dtype == torch.float32
    sig = load_data(DataConfig(dataset="waves", val_size=100), {"waves": waves})
    assert sig.input_shape == (1, 64) and len(sig.sample) == 2
    assert build_model("conv1d", sig.sample, 4, {"conv1d": conv1d})(sig.sample).shape == (2, 4)
    assert build_model("mlp", sig.sample, 4)(sig.sample).shape == (2, 4)  # lazy: reads 64 inputs
    text = load_data(DataConfig(dataset="lang_words", val_size=100, train_subset=200))
    assert text.input_shape == (WORD_BYTES,) and text.sample.dtype == torch.int64
    for name in ("char_cnn", "char_cnn_wide", "char_gru"):
        assert build_model(name, text.sample, 5)(text.sample).shape == (2, 5)


def test_lang_words_is_balanced_split_by_the_words_alone_and_deterministic():
    s = lang_words(DataConfig(dataset="lang_words"))
    assert s.num_classes == 5 and s.input_shape == (WORD_BYTES,)
    counts = torch.bincount(s.train.labels)
    assert len(s.train) > 200_000 and (counts == counts[0]).all()  # balanced: chance is 0.2
    assert abs(len(s.test) / (len(s.train) + len(s.test)) - 0.1) < 0.001
    rows = lambda ds: {bytes(r.tolist()) for r in ds.x}  # noqa: E731
    assert not rows(s.train) & rows(s.test)  # no word in both splits
    from online_distill.data.datasets import WORD_LISTS, _lang_words

    fresh = _lang_words.__wrapped__(tuple((p, 0.0) for p, _ in WORD_LISTS.values()))  # read again, not cached
    assert torch.equal(fresh.test.x, s.test.x) and torch.equal(fresh.train.labels, s.train.labels)
    # a word reads as its UTF-8 bytes, 0-padded
    assert bytes(t for t in s.train.x[0].tolist() if t).decode().isalpha()


def test_missing_word_lists_name_the_field_and_the_apt_packages(monkeypatch):
    from online_distill.data import datasets as data

    monkeypatch.setitem(data.WORD_LISTS, "french", ("/nonexistent/french", "wfrench"))
    with pytest.raises(ConfigError, match=r"^data.dataset: 'lang_words' .* apt-get install wfrench$"):
        lang_words(DataConfig(dataset="lang_words"))


def test_jitter_is_refused_on_data_that_are_not_images():
    with pytest.raises(ConfigError, match=r"^data.shift: got 2; allowed: 0 for dataset 'waves', whose examples batch to "
                                          r"\(2, 1, 64\) float32"):
        load_data(DataConfig(dataset="waves", val_size=100, shift=2), {"waves": waves})
    with pytest.raises(ConfigError, match=r"^data.flip: .* \(2, 24\) int64"):
        load_data(DataConfig(dataset="lang_words", val_size=100, train_subset=100, flip=True))
    assert load_data(DataConfig(dataset="synthetic", val_size=100, shift=2, flip=True)).input_shape == (1, 28, 28)


def test_a_hugging_face_model_trains_through_the_adapter():
    data = load_data(DataConfig(dataset="lang_words", val_size=200, train_subset=1024))
    torch.manual_seed(0)
    model = build_model("bert", data.sample, 5, {"bert": tiny_bert()})
    assert type(model).__name__ == "HFClassifier" and type(model.model).__name__ == "BertForSequenceClassification"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = data.train.batch(torch.arange(1024), torch.device("cpu"))
    losses = []
    for epoch in range(3):
        for i in range(0, 1024, 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.1, losses  # it learns from token ids
    # padding is masked: extra padding after a word changes nothing
    model.eval()
    with torch.no_grad():
        short = torch.tensor([[104, 97, 117, 115, 0, 0]])
        assert torch.allclose(model(short), model(torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1)),
                              atol=1e-5)


# ---- part 3: a user's mistakes are refused on the driver, before Ray starts ---------------------

def refused(make_cfg, builders=None, datasets=None, **over) -> str:
    import ray

    was_up = ray.is_initialized()
    with pytest.raises(ConfigError) as e:
        online_distill.train(make_cfg(**over), models=builders, datasets=datasets, verbose=False)
    assert ray.is_initialized() == was_up  # nothing started (False unless an e2e test ran first)
    msg = str(e.value)
    assert "\n" not in msg  # one paragraph
    return msg


def test_logits_with_the_wrong_number_of_columns_are_refused_naming_the_builder(no_ray, make_cfg):
    five = lambda input_shape, k: nn.Sequential(nn.Flatten(), nn.LazyLinear(5))  # noqa: E731
    msg = refused(make_cfg, builders={"five": five}, **{"models": ["tiny_cnn", "five"]})
    assert msg.startswith("models[1]: model 'five' (")
    assert "on a batch of shape (2, 1, 28, 28) (examples of shape (1, 28, 28), float32) it returned shape (2, 5)" in msg
    assert "float logits of shape (2, 10)" in msg and "num_classes=10" in msg


def test_a_builder_that_fails_is_refused_with_the_shape_it_got(no_ray, make_cfg):
    def old_style(in_channels, num_classes):  # an image builder written for a channel count
        return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    msg = refused(make_cfg, builders={"old_style": old_style}, **{"models": ["old_style", "tiny_cnn"]})
    assert msg.startswith("models[0]: model 'old_style' (")
    assert "failed to build, called as builder(input_shape=(1, 28, 28), num_classes=10)" in msg
    assert "TypeError" in msg and "input_shape[0]" in msg


def test_a_forward_that_raises_is_refused_with_the_batch_it_got(no_ray, make_cfg):
    wrong = lambda input_shape, k: nn.Sequential(nn.Flatten(), nn.Linear(100, k))  # noqa: E731  (64 inputs come)
    msg = refused(make_cfg, builders={"wrong": wrong}, datasets={"waves": waves},
                  **{"models": ["wrong", "wrong"], "data.dataset": "waves", "data.val_size": 100,
                     "data.train_subset": None, "data.test_subset": None})
    assert msg.startswith("models[0]: model 'wrong' (")
    assert "its forward raised on the dataset's first 2 training examples, a batch of shape (2, 1, 64)" in msg
    assert "RuntimeError" in msg


def test_labels_outside_the_classes_are_refused_naming_the_dataset_builder(no_ray, make_cfg):
    def off_by_one(cfg):  # labels 1..4 for a dataset that says 4 classes
        s = waves(cfg)
        return Splits(Tensors(s.train.x, s.train.labels + 1), s.test, num_classes=4)

    msg = refused(make_cfg, datasets={"off": off_by_one},
                  **{"models": ["mlp", "mlp"], "data.dataset": "off", "data.val_size": 100})
    assert msg.startswith("data.dataset: the dataset builder 'off' (")
    assert "train split: labels range over [1, 4], but num_classes=4; allowed: class indices in [0, 3]" in msg

    def float_labels(cfg):  # any torch Dataset: its first batch is checked
        s = waves(cfg)
        return Splits(torch.utils.data.TensorDataset(s.train.x, s.train.labels.float()), s.test, num_classes=4)

    msg = refused(make_cfg, datasets={"floats": float_labels},
                  **{"models": ["mlp", "mlp"], "data.dataset": "floats", "data.val_size": 100})
    assert "train split: labels batch to (1000,) float32; allowed: int64 class indices" in msg


def test_a_dataset_builder_that_raises_or_breaks_its_promise_is_refused(no_ray, make_cfg):
    def broken(cfg):
        raise FileNotFoundError("/data/my_signals.npy")

    msg = refused(make_cfg, datasets={"broken": broken}, **{"data.dataset": "broken"})
    assert msg.startswith("data.dataset: the dataset builder 'broken' (") and \
        "raised FileNotFoundError: /data/my_signals.npy" in msg

    def liar(cfg):
        s = waves(cfg)
        return Splits(s.train, s.test, 4, input_shape=(1, 28, 28))

    msg = refused(make_cfg, datasets={"liar": liar}, **{"data.dataset": "liar", "data.val_size": 100})
    assert "promised input_shape=(1, 28, 28), but its first training examples batch to (2, 1, 64) float32" in msg


# ---- bits per byte of a user's token sequences: Splits.bytes_per_token is where they come from ---

def subword_windows(n: int, seed: int) -> SequenceTensors:
    """Next-token windows (16 tokens + 1) of a made-up subword vocabulary of ids 1..47: each counts
    up from a random start, so a model has something to learn."""
    start = torch.randint(0, 47, (n, 1), generator=torch.Generator().manual_seed(seed))
    return SequenceTensors(((start + torch.arange(17)) % 47 + 1).to(torch.uint8))


def subwords(cfg: DataConfig) -> Splits:
    """As docs/language-models.md says a user's text dataset gives its bytes of text per token."""
    return Splits(subword_windows(512, 0), subword_windows(128, 1), num_classes=48, bytes_per_token=3.5)


def test_a_users_token_sequences_report_bits_per_byte_from_their_splits(make_cfg):
    cfg = make_cfg(models=["gpt(dim=16, layers=1, heads=2)"], distill__mode="independent", data__dataset="subwords",
                   data__val_size=64, data__train_subset=None, data__test_subset=None, train__epochs=1,
                   train__batch_size=32, optim__name="adamw", optim__lr=0.003, run__name="subwords")
    res = online_distill.train(cfg, datasets={"subwords": subwords}, verbose=False)
    final = res.final.set_index("member").loc["peer0"]
    assert final["test_bpb"] == pytest.approx(final["test_nll"] / math.log(2) / 3.5)
    assert final["val_bpb"] == pytest.approx(final["val_nll"] / math.log(2) / 3.5)
    assert res.metrics["peer0/val_bpb"] == pytest.approx(final["val_bpb"])


def test_bytes_per_token_anywhere_but_the_splits_or_not_a_positive_number_is_refused(no_ray, make_cfg):
    class OnTheDataset(SequenceTensors):
        bytes_per_token = 3.5  # where an older docstring put it: a run never read it there

    over = dict(models=["gpt(dim=16, layers=1, heads=2)"], distill__mode="independent", data__val_size=64,
                data__train_subset=None, data__test_subset=None)
    on_dataset = lambda cfg: Splits(OnTheDataset(subword_windows(512, 0).x), subword_windows(128, 1), num_classes=48)  # noqa: E731
    msg = refused(make_cfg, datasets={"mine": on_dataset}, data__dataset="mine", **over)
    assert "its train dataset has a bytes_per_token, which a run does not read" in msg
    assert "Splits(..., bytes_per_token=...)" in msg
    for bad in (0, -1.0, float("nan"), "3.5", True):
        bad_splits = lambda cfg, bad=bad: Splits(subword_windows(512, 0), subword_windows(128, 1), num_classes=48,  # noqa: E731
                                                  bytes_per_token=bad)
        msg = refused(make_cfg, datasets={"mine": bad_splits}, data__dataset="mine", **over)
        assert f"returned bytes_per_token={bad!r}; allowed: a positive number" in msg, msg


def test_a_token_batch_given_to_an_image_model_is_refused(no_ray, make_cfg):
    msg = refused(make_cfg, **{"data.dataset": "lang_words", "data.val_size": 100, "data.train_subset": 500,
                               "models": ["char_cnn", "tiny_cnn"]})
    assert msg.startswith("models[1]: model 'tiny_cnn' (tiny_cnn) failed to build") and "(24,)" in msg


# ---- end to end: DML on a 1-D data set and on token sequences, through the Python API ----------

@pytest.fixture
def by_value():
    """The builders above live in this test module, which Ray's workers cannot import: send them
    by value, as cloudpickle sends what a user's script defines in __main__."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.e2e
def test_dml_on_1d_signals_with_a_user_conv1d_net(ray_session, by_value, make_cfg):
    cfg = make_cfg(models=["conv1d", "mlp"], data__dataset="waves", data__val_size=200, data__train_subset=None,
                   data__test_subset=None, train__epochs=2, train__batch_size=32, optim__lr=0.05, run__name="waves")
    res = online_distill.train(cfg, models={"conv1d": conv1d}, datasets={"waves": waves}, verbose=False)
    final = res.final.set_index("member")
    assert (final["test_acc"] > 0.5).all(), final  # chance is 0.25 (measured: conv1d 0.735, mlp 1.0)
    assert res.metrics["peer0/train_kd"] > 0 and res.metrics["peer1/train_kd"] > 0


@pytest.mark.e2e
def test_dml_on_token_sequences_with_a_user_net_and_a_hugging_face_bert(ray_session, by_value, make_cfg):
    cfg = make_cfg(models=["bigrams", "bert", "char_cnn"], data__dataset="three_languages", data__val_size=300,
                   data__train_subset=1536, data__test_subset=600, train__epochs=2, train__batch_size=64,
                   optim__name="adamw", optim__lr=0.003, optim__weight_decay=0.0, run__name="tokens",
                   # the three peers in one Ray Train worker (still a worker, so the user's net and the
                   # BERT go by value): one process imports transformers, not three; the 1-D test above
                   # exchanges logits between workers
                   scale__peers_per_worker=3, run__in_process="never")
    res = online_distill.train(cfg, models={"bigrams": bigrams, "bert": tiny_bert()},
                               datasets={"three_languages": three_languages}, verbose=False)
    final = res.final.set_index("member")
    assert (final["test_acc"] > 0.42).all(), final  # chance is 1/3 (measured: 0.53, 0.73, 0.79)
    assert all(res.metrics[f"peer{p}/train_kd"] > 0 for p in range(3))


def test_the_preflight_builds_every_model_with_the_users_builders(make_cfg):
    from online_distill.run.plan import read_data

    with pytest.raises(ConfigError, match=r"^models\[0\]: unknown model 'users_own'; allowed: .*package.module:builder"):
        read_data(make_cfg(models=["users_own", "tiny_cnn"]))
    with pytest.raises(ConfigError, match=r"^models\[1\]: model 'five'"):
        read_data(make_cfg(models=["tiny_cnn", "five"]), {"five": lambda shape, k: nn.Sequential(nn.Flatten(), nn.LazyLinear(5))})
