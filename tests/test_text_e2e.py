"""Text end to end on the built-in lang_words dataset (token ids in, language out): deep mutual
learning from configs/lang_dml.yaml, offline KD from a larger text teacher, and an EMA teacher."""
import os

import pytest

from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.run import train

pytestmark = pytest.mark.e2e
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "lang_dml.yaml")
CHANCE = 0.2  # five balanced languages


def tiny(cfg: C.Config, tmp_path, **over) -> C.Config:
    """The config at test size: 2k training words, 2 short epochs, results under tmp_path."""
    return C.with_overrides(cfg, {"data.train_subset": 2048, "data.val_size": 500, "data.test_subset": 1000,
                                  "train.epochs": 2, "train.batch_size": 64, "run.max_failures": 0,
                                  "run.storage_path": str(tmp_path / "runs"), **over})


@pytest.fixture(scope="module")
def dml_run(ray_session, tmp_path_factory):
    """A DML cohort of a larger GRU (183k parameters) and a char CNN (27k) on lang_words."""
    cfg = tiny(CF.load(CONFIG), tmp_path_factory.mktemp("text"), models=["char_gru", "char_cnn"])
    return train(cfg, verbose=False)


def test_dml_on_words_learns_the_language(dml_run):
    final = dml_run.final.set_index("member")
    assert final.loc["peer0", "model"] == "char_gru" and final.loc["peer1", "model"] == "char_cnn"
    assert (final["test_acc"] > CHANCE + 0.3).all(), final
    assert dml_run.metrics["peer0/train_kd"] > 0 and dml_run.metrics["peer1/train_kd"] > 0
    # compression.csv measured the text models on token ids
    assert os.path.getsize(os.path.join(dml_run.run_dir, "compression.csv")) > 100


def test_offline_kd_from_a_larger_text_teacher(dml_run, tmp_path):
    cfg = tiny(CF.load(CONFIG), tmp_path, models=["char_cnn"], **{
        "distill.mode": "offline", "distill.teacher_checkpoint": dml_run.run_dir, "distill.teacher_peer": 0,
        "loss.kd_weight": 0.7, "run.name": "lang_kd"})
    res = train(cfg, verbose=False)
    assert res.metrics["peer0/test_acc"] > CHANCE + 0.3, res.final
    assert res.metrics["peer0/train_kd"] > 0
    assert "teacher (offline)" in open(os.path.join(res.run_dir, "compression.csv")).read()


def test_ema_self_distillation_on_words(ray_session, tmp_path):
    cfg = tiny(CF.load(CONFIG), tmp_path, models=["char_cnn"], **{
        "distill.mode": "ema", "distill.ema_decay": 0.99, "run.name": "lang_ema"})
    res = train(cfg, verbose=False)
    assert res.metrics["peer0/test_acc"] > CHANCE + 0.3, res.final
    assert res.metrics["peer0/train_kd"] > 0
