"""Export round trips: the written TorchScript / ONNX file, loaded back, gives the trained model's
outputs; dynamic int8 quantization reports its accuracy and size. The run directory is made by
the real training loop (without Ray: one rank, checkpoints written by the reporter every rank uses)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from online_distill.rundir import checkpoint as ckpt
from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.cli import main
from online_distill.data.datasets import load_data
from online_distill.run.export import export
from online_distill.training.loop import run
from online_distill.models.builders import build_model
from online_distill.training.reporting import CheckpointReporter
from online_distill.rundir.layout import RunDir

IMAGES = torch.zeros(2, 1, 28, 28)  # what models are built for: a batch like the 1x28x28 data

# TorchScript is deprecated in torch 2.x but still the way to run a model without Python
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*:FutureWarning")


def train_run(d: str, model: str) -> str:
    """A finished one-epoch run of `model` on tiny synthetic data: config.yaml and checkpoints."""
    cfg = C.from_dict({"models": [model], "distill": {"mode": "independent"},
                       "data": {"dataset": "synthetic", "val_size": 200, "train_subset": 512, "test_subset": 300},
                       "optim": {"lr": 0.05, "schedule": "constant"}, "train": {"epochs": 1, "batch_size": 64}})
    os.makedirs(d)
    with open(os.path.join(d, "config.yaml"), "w") as f:
        f.write(CF.dump(cfg))

    run(cfg, 0, torch.device("cpu"), reporter=CheckpointReporter(RunDir(d), cfg, 0), verbose=False)
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    before = torch.get_num_threads()
    base = tmp_path_factory.mktemp("export")
    yield {m: train_run(str(base / m), m) for m in ("tiny_cnn", "mlp")}
    torch.set_num_threads(before)  # the loop set one thread per worker


def trained(run_dir: str) -> tuple[torch.nn.Module, torch.Tensor]:
    cfg = CF.load(os.path.join(run_dir, "config.yaml"))
    data = load_data(cfg.data)
    model = build_model(cfg.models[0], IMAGES, 10)
    model.load_state_dict(ckpt.load_peer(os.path.join(run_dir, "checkpoint_epoch_0001"), 0)["model"])
    x, _ = data.test.batch(torch.arange(64), torch.device("cpu"))
    return model.eval(), x


def test_torchscript_export_loads_back_and_matches_the_trained_peer(runs):
    run_dir = runs["tiny_cnn"]
    report = export(run_dir, peer=0, fmt="torchscript", verbose=False)
    assert report.path == os.path.join(run_dir, "export", "peer0.pt") and report.model == "tiny_cnn"
    assert report.max_abs_diff < 1e-4 and report.argmax_agreement == 1.0
    model, x = trained(run_dir)
    loaded = torch.jit.load(report.path)  # independent of export's own check
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    with open(os.path.join(run_dir, "export", "peer0.report.json")) as f:
        assert json.load(f)["test_acc"] == pytest.approx(report.test_acc)


def test_onnx_export_runs_and_matches_the_trained_peer(runs, tmp_path):
    pytest.importorskip("onnxscript")  # the torch.onnx exporter (dynamo) needs it
    import onnx
    from onnx.reference import ReferenceEvaluator

    out = str(tmp_path / "student.onnx")
    report = export(runs["mlp"], fmt="onnx", out=out, verbose=False)
    assert report.max_abs_diff < 1e-4 and report.model == "mlp"
    model, x = trained(runs["mlp"])
    proto = onnx.load(out)
    got = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x[:7].numpy()})[0]  # any batch size
    torch.testing.assert_close(torch.from_numpy(got), model(x[:7]), rtol=1e-4, atol=1e-4)


def test_int8_quantization_reports_accuracy_and_size(runs, tmp_path):
    report = export(runs["mlp"], fmt="torchscript", quantize=True, out=str(tmp_path / "mlp.pt"), verbose=False)
    assert report.int8_layers == 3  # the MLP's three nn.Linear layers
    assert report.int8_size_ratio < 0.4  # int8 weights: about a quarter of fp32
    assert report.int8_agreement > 0.9 and abs(report.int8_test_acc - report.test_acc) < 0.05
    int8 = torch.jit.load(report.int8_path)
    model, x = trained(runs["mlp"])
    assert (int8(x).argmax(1) == model(x).argmax(1)).float().mean() > 0.9
    # a CNN keeps its convolutions in fp32 under dynamic quantization: only its classifier is int8
    cnn = export(runs["tiny_cnn"], quantize=True, out=str(tmp_path / "cnn.pt"), verbose=False)
    assert cnn.int8_layers == 1


def test_export_refuses_bad_input(runs, tmp_path):
    run_dir = runs["mlp"]
    with pytest.raises(C.ConfigError, match=r"--peer: got 2; allowed: 0..0"):
        export(run_dir, peer=2, verbose=False)
    with pytest.raises(C.ConfigError, match=r"--format: got 'tflite'"):
        export(run_dir, fmt="tflite", verbose=False)
    with pytest.raises(C.ConfigError, match=r"RUN_DIR: .* has no config.yaml"):
        export(str(tmp_path), verbose=False)
    assert main(["export", run_dir, "--peer", "7"]) == 2  # the CLI turns it into one line and status 2


def test_cli_export_writes_the_file(runs, tmp_path, capsys):
    out = tmp_path / "cli.pt"
    assert main(["export", runs["tiny_cnn"], "--peer", "0", "--out", str(out)]) == 0
    assert out.exists() and "argmax agreement 1.0000" in capsys.readouterr().out
