"""The built-in fortunes corpus (online_distill.data.corpus, data.fortunes, data.SequenceTensors): a
split by document, next-byte batches with padding ignored, and bytes that decode back to the text."""
import types

import pytest
import torch

from online_distill.data import corpus, datasets as data
from online_distill.config.schema import ConfigError

needs_fortunes = pytest.mark.skipif(not corpus.fortune_files(),
                                    reason=f"Debian's fortunes package is not installed ({corpus.FORTUNES_DIR}); "
                                           "apt-get install fortunes")


def cfg(seq_len=None):
    return types.SimpleNamespace(seq_len=seq_len) if seq_len else types.SimpleNamespace()


def test_windows_predict_every_byte_but_the_first_exactly_once():
    doc = bytes(range(1, 12))  # 11 bytes
    ws = corpus.windows(doc, 4)
    assert ws == [bytes([1, 2, 3, 4, 5]), bytes([5, 6, 7, 8, 9]), bytes([9, 10, 11])]
    assert [b for w in ws for b in w[1:]] == list(doc[1:])
    assert corpus.windows(b"a", 4) == [] and corpus.windows(b"ab", 4) == [b"ab"]
    assert corpus.windows(bytes(range(1, 10)), 4) == [bytes([1, 2, 3, 4, 5]), bytes([5, 6, 7, 8, 9])]  # exact fit


def test_documents_are_split_on_percent_lines_only():
    text = b"one\nline two\n%\n  \n%\n100% sure\n%\nlast\n"
    assert corpus.split_documents(text) == [b"one\nline two\n", b"100% sure\n", b"last\n"]


def test_sequence_tensors_batch_next_bytes_with_padding_ignored():
    tokens = corpus.encode_windows([b"hello world", b"hi"], 4)
    assert tokens.dtype == torch.uint8 and tokens.shape == (4, 5)
    ds = data.SequenceTensors(tokens)
    x, y = ds.batch(torch.arange(len(ds)), torch.device("cpu"))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 4)
    assert bytes(x[0].tolist()) == b"hell" and bytes(y[0].tolist()) == b"ello"
    assert x[3].tolist() == [ord("h"), ord("i"), 0, 0] and y[3].tolist() == [ord("i"), -100, -100, -100]
    assert torch.equal(ds.labels, y)
    sub = ds.subset(torch.tensor([3, 0]))
    assert isinstance(sub, data.SequenceTensors) and isinstance(sub, data.Tensors) and len(sub) == 2
    assert torch.equal(sub.batch(torch.tensor([0]), torch.device("cpu"))[1], y[3:4])
    with pytest.raises(ValueError, match="tokens must be"):
        data.SequenceTensors(torch.zeros(3, 1, dtype=torch.uint8))


@needs_fortunes
def test_no_document_is_in_both_splits_and_the_split_is_by_crc32():
    train, test = corpus.documents()
    assert not set(train) & set(test)
    assert all(corpus.is_test(d) for d in test) and not any(corpus.is_test(d) for d in train)
    assert 0.07 < len(test) / (len(train) + len(test)) < 0.13
    assert not any(b"\x00" in d for d in train + test)


@needs_fortunes
def test_fortunes_splits_padding_and_round_trip():
    splits = data.fortunes(cfg(64))
    assert splits.num_classes == 256 and splits.input_shape == (64,) and splits.bytes_per_token == 1.0
    for ds in (splits.train, splits.test):
        x, y = ds.batch(torch.arange(len(ds)), torch.device("cpu"))
        pad_x, pad_y = x == 0, y == -100
        assert not (y == 0).any() and ((y >= 1) & (y <= 255) | pad_y).all()
        assert (pad_x <= pad_y).all()  # x is 0 only where y is padding too (right padding)
        # the padding is one run at the end of each row
        assert torch.equal(pad_y, pad_y.long().cummax(1).values.bool())
    # the windows put back together are the documents, byte for byte
    _, test_docs = corpus.documents()
    rows = splits.test.x.tolist()
    rebuilt, i = [], 0
    for doc in test_docs:
        n = len(corpus.windows(doc, 64))
        parts = [bytes(b for b in r if b) for r in rows[i: i + n]]
        rebuilt.append(parts[0] + b"".join(p[1:] for p in parts[1:]) if parts else doc[:1])
        i += n
    assert rebuilt == test_docs and i == len(rows)
    assert rebuilt[0].decode("utf-8", "replace").strip()  # it is text
    real = int((splits.train.labels != -100).sum()) + int((splits.test.labels != -100).sum())
    print(f"fortunes at L=64: {len(splits.train)} train / {len(splits.test)} test windows, {real} predicted bytes")


@needs_fortunes
def test_fortunes_default_length_is_cached_and_registered():
    a = data.DATASETS["fortunes"](cfg())
    assert a.input_shape == (128,) and a.num_classes == 256
    assert data.fortunes(cfg()).train.x is a.train.x  # read once per process
    assert corpus.fortunes_tokens(128)[0] is a.train.x


def test_missing_package_is_a_config_error_naming_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "FORTUNES_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="data.dataset.*apt-get install fortunes"):
        data.fortunes(cfg())
