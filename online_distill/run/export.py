"""`online-distill export RUN_DIR --peer P --format torchscript|onnx [--quantize] [--out F]`

Writes one trained peer (or student) of a finished run for deployment, then loads the written
file back and checks that its outputs match the trained model's on real test examples. With
--quantize, a dynamically quantized int8 copy (weights of nn.Linear/LSTM/GRU layers in int8,
activations quantized on the fly) is written too, and its accuracy, size and CPU latency are
reported next to the fp32 model's: distillation combined with quantization. Dynamic
quantization leaves convolutions in fp32, so a CNN shrinks only by its classifier's share.

The report is printed and saved as JSON beside the exported file.
"""
from __future__ import annotations

import copy
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..config.schema import ConfigError
from .compression import accuracy, cpu_latency

FORMATS = ("torchscript", "onnx")
QUANTIZABLE = {nn.Linear, nn.LSTM, nn.GRU}


@dataclass(frozen=True)
class ExportReport:
    path: str
    format: str
    model: str
    peer: int
    checkpoint: str
    check_samples: int
    max_abs_diff: float
    """Largest |exported - trained| logit over the check samples."""
    argmax_agreement: float
    test_acc: float
    """Accuracy of the trained fp32 model on the run's test split."""
    size_kb: float
    latency_ms: float
    """Median time of one sample (batch 1, 1 CPU thread) through the fp32 TorchScript module."""
    int8_path: str | None = None
    int8_layers: int | None = None
    """Layers dynamic quantization replaced (0: the model has none it can quantize)."""
    int8_test_acc: float | None = None
    int8_agreement: float | None = None
    """Share of test examples where the int8 model predicts the fp32 model's class."""
    int8_size_kb: float | None = None
    int8_size_ratio: float | None = None
    """int8 TorchScript bytes / fp32 TorchScript bytes (like for like, whatever --format is)."""
    int8_latency_ms: float | None = None


def _script(model: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # TorchScript is in maintenance in torch 2.x; it still loads without Python
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return torch.jit.script(model)
        except Exception:  # models with Python control flow TorchScript cannot compile: trace the one path
            return torch.jit.trace(model, example)


def _save_torchscript(model: nn.Module, example: Tensor, path) -> nn.Module:
    """Write TorchScript to a path (or a file object) and load it back from there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(_script(model, example), path)
        if not isinstance(path, str):
            path.seek(0)
        return torch.jit.load(path)


def _save_onnx(model: nn.Module, example: Tensor, path: str):
    """One self-contained ONNX file (weights inside: fine below protobuf's 2 GB) with a dynamic
    batch dimension; returns a function that runs the written file."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=({0: batch},), external_data=False,
                      verbose=False)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    name = proto.graph.input[0].name
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    except ImportError:  # the reference evaluator of the onnx package needs nothing else, but is slow:
        from onnx.reference import ReferenceEvaluator  # numpy convolutions, so it checks 32 examples

        ref = ReferenceEvaluator(proto)
        return lambda x: torch.from_numpy(ref.run(None, {name: x[:32].numpy()})[0])


def load_trained(run_dir: str, peer: int, *, models=None, datasets=None):
    """(config, checkpoint directory, the peer's trained model in eval mode, data) of a run. Its
    models are rebuilt from the run's config.yaml: a name, or an import path (online_distill.config.specs)."""
    from ..config.files import load
    from ..data.datasets import load_data
    from ..models.builders import build_model
    from ..rundir.checkpoint import load_peer
    from ..rundir.layout import CONFIG, RunDir, checkpoint_dir_of

    run = RunDir(run_dir)
    if not run.exists(CONFIG):
        raise ConfigError(f"RUN_DIR: {run_dir!r} has no {CONFIG}; allowed: a run directory made by "
                          "online-distill train")
    cfg = load(run.file(CONFIG))
    if not 0 <= peer < cfg.num_peers:
        raise ConfigError(f"--peer: got {peer}; allowed: 0..{cfg.num_peers - 1} "
                          f"(the run's peers: {', '.join(cfg.models)})")
    ckpt = checkpoint_dir_of(run.path)
    if ckpt is None:
        raise ConfigError(f"RUN_DIR: {run_dir!r} holds no checkpoint; allowed: a run with at least one epoch done")
    data = load_data(cfg.data, datasets)
    model = build_model(cfg.models[peer], data.sample, data.num_classes, models, field=f"models[{peer}] of {run.file(CONFIG)}",
                        label_shape=data.label_shape)
    model.load_state_dict(load_peer(ckpt, peer)["model"])
    return cfg, ckpt, model.eval(), data


def export(run_dir: str, *, peer: int = 0, fmt: str = "torchscript", quantize: bool = False, out: str | None = None,
           check_samples: int = 256, models=None, datasets=None, verbose: bool = True) -> ExportReport:
    """Write peer `peer` of the run in `run_dir` as `fmt`, load it back and check it; with
    `quantize`, also an int8 copy. `models` / `datasets`: user builders, as for train()."""
    from ..data.datasets import Batches

    if fmt not in FORMATS:
        raise ConfigError(f"--format: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    cfg, ckpt, model, data = load_trained(run_dir, peer, models=models, datasets=datasets)
    test = lambda: Batches(data.test, 512, torch.device("cpu"), shuffle=False, drop_last=False)  # noqa: E731
    x_check = torch.cat([x for x, _ in test()])[:check_samples]
    example = x_check[:2]
    default = os.path.join(run_dir, "export", f"peer{peer}" + (".pt" if fmt == "torchscript" else ".onnx"))
    out = os.path.abspath(out) if out else default
    os.makedirs(os.path.dirname(out), exist_ok=True)

    with torch.no_grad():
        written = _save_torchscript(model, example, out) if fmt == "torchscript" else _save_onnx(model, example, out)
        got = written(x_check)
        x_check = x_check[: len(got)]
        expected = model(x_check)
    diff = (got - expected).abs().max().item()
    agree = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    # an fp32 export reproduces the trained model up to float rounding; anything more is a broken export
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"export check failed: {out} differs from the trained model by up to {diff:.3g} "
                           f"(argmax agreement {agree:.4f} on {len(x_check)} test examples)")
    fields = dict(path=out, format=fmt, model=cfg.models[peer], peer=peer, checkpoint=ckpt, check_samples=len(x_check),
                  max_abs_diff=diff, argmax_agreement=agree, test_acc=accuracy(model, test()),
                  size_kb=os.path.getsize(out) / 1024)

    # latency of TorchScript modules, fp32 and int8 side by side: like for like, without Python overhead
    fp32_file = io.BytesIO()
    measured = [_save_torchscript(model, example, fp32_file)]
    if quantize:
        int8, int8_fields = _quantized(model, out, example, test, fp32_bytes=len(fp32_file.getvalue()))
        fields.update(int8_fields)
        measured.append(int8)
    speed = cpu_latency(measured, example)
    fields["latency_ms"] = speed[0]["latency_ms"]
    if quantize:
        fields["int8_latency_ms"] = speed[1]["latency_ms"]

    report = ExportReport(**fields)
    with open(os.path.splitext(out)[0] + ".report.json", "w") as f:
        json.dump(asdict(report), f, indent=1)
    if verbose:
        print(format_export(report), flush=True)
    return report


def _quantized(model: nn.Module, out: str, example: Tensor, test, *, fp32_bytes: int) -> tuple[nn.Module, dict]:
    """Dynamic int8 quantization of a copy, written as TorchScript (the ONNX exporter does not
    take dynamically quantized ops), checked against the fp32 model on the whole test split."""
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, still shipped
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), QUANTIZABLE, dtype=torch.qint8)
    layers = sum(1 for m in q.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic"))
    path = os.path.splitext(out)[0] + ".int8.pt"
    loaded = _save_torchscript(q, example, path)
    with torch.no_grad():
        same = total = 0
        for x, _ in test():
            same += (loaded(x).argmax(1) == model(x).argmax(1)).sum().item()
            total += len(x)
    return loaded, dict(int8_path=path, int8_layers=layers, int8_test_acc=accuracy(loaded, test()),
                        int8_agreement=same / total, int8_size_kb=os.path.getsize(path) / 1024,
                        int8_size_ratio=os.path.getsize(path) / fp32_bytes)


def format_export(r: ExportReport) -> str:
    lines = [f"exported peer{r.peer} ({r.model}) from {r.checkpoint}",
             f"  {r.format}: {r.path}  {r.size_kb:.1f} KiB",
             f"  check: max |exported - trained| = {r.max_abs_diff:.2e} over {r.check_samples} test examples, "
             f"argmax agreement {r.argmax_agreement:.4f}",
             f"  fp32: test acc {r.test_acc:.4f}, latency {r.latency_ms:.3f} ms/sample "
             "(TorchScript, batch 1, 1 thread)"]
    if r.int8_path:
        lines.append(f"  int8 (dynamic, {r.int8_layers} layers quantized): {r.int8_path}  {r.int8_size_kb:.1f} KiB "
                     f"({r.int8_size_ratio:.2f}x the fp32 TorchScript file), test acc {r.int8_test_acc:.4f}, "
                     "agreement with fp32 "
                     f"{r.int8_agreement:.4f}, latency {r.int8_latency_ms:.3f} ms/sample")
    return "\n".join(lines)
