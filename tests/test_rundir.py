"""One owner for the run directory (rundir.py): the names on disk are spelled in one module, a run
holds its directory, a full disk is said plainly and spends no retry, errors a retry cannot fix
end the run at once, and the driver's preflight is made once and refuses what the run refuses."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
import torch

import online_distill
import online_distill.rundir.checkpoint
from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.rundir import storage
from online_distill.cli import main
from online_distill.errors import LabelError, NonFiniteError, RunLocked, StorageError
from online_distill.rundir.layout import RunDir
from online_distill.run import train

PKG = os.path.dirname(online_distill.__file__)
ROOT = os.path.dirname(PKG)
NAMES = ["checkpoint_epoch", "config.yaml", "result.json", "history.json", "metrics.json", "manifest_rank", "rng_rank",
         ".saving-", "damaged-", "incomplete-", "superseded-", "teacher.pt", "predictions.pt", "per_class.csv",
         "final.csv", "metrics.csv", "metrics.parquet", "compression.csv", "curves.png", "generations.csv", "run.log"]


def test_the_names_on_disk_are_spelled_in_one_module():
    """Only rundir/layout.py spells the names of a run directory (docstrings may mention them)."""
    offenders = []
    for dp, _, files in os.walk(PKG):
        for f in files:
            path = os.path.join(dp, f)
            if not f.endswith(".py") or path == os.path.join(PKG, "rundir", "layout.py"):
                continue
            code = _without_docstrings(open(path).read())
            for name in NAMES:
                pattern = r"([\"'])[^\"'\n]*(?<![\w.])" + re.escape(name) + r"(?![\w])[^\"'\n]*\1"
                for m in re.finditer(pattern, code):
                    offenders.append(f"{os.path.relpath(path, ROOT)}: {m.group(0)}")
    assert offenders == []


def _without_docstrings(code: str) -> str:
    import ast

    tree = ast.parse(code)
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                spans.append((first.lineno, first.end_lineno))
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            spans.append((node.lineno, node.end_lineno))  # attribute docstrings
    lines = code.splitlines()
    for a, b in spans:
        for i in range(a - 1, b):
            lines[i] = ""
    return "\n".join(line.split("#")[0] for line in lines)  # and comments


# --- the lock -------------------------------------------------------------------------------------

def test_a_run_directory_has_one_live_holder(tmp_path):
    run = RunDir(tmp_path / "r")
    code = ("import sys, time; sys.path.insert(0, %r); from online_distill.rundir.layout import RunDir; "
            "l = RunDir(%r).lock(); l.acquire(); print('held', flush=True); time.sleep(60)") % (ROOT, run.path)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"^run.name: run 'r' is in use by pid {holder.pid} on host .*Allowed: wait"):
            run.lock().acquire()
        assert run.lock().holder().pid == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # the kernel released it with the process; the file still names the dead holder: taken over, said once
    lock = run.lock()
    said = lock.acquire()
    assert said == f"run 'r': taking over the lock left by " + said.split("left by ")[1] and f"pid {holder.pid}" in said
    assert "no longer running" in said
    lock.release()
    again = run.lock()
    assert again.acquire() is None  # released cleanly: nothing to take over
    again.release()


def test_a_run_that_wrote_nothing_leaves_nothing(tmp_path):
    fresh = RunDir(tmp_path / "new" / "runs" / "r")  # neither the run's directory nor its parents are there
    lock = fresh.lock()
    lock.acquire()
    assert os.path.exists(fresh.file(".lock"))
    lock.release()  # refused after the lock: nothing written
    assert os.listdir(tmp_path) == []
    lock = fresh.lock()
    lock.acquire()
    fresh.write("config.yaml", "x: 1\n")  # a run that wrote something keeps its (empty) lock file
    lock.release()
    assert sorted(os.listdir(fresh.path)) == [".lock", "config.yaml"]
    again = fresh.lock()
    assert again.acquire() is None  # released cleanly: nothing to take over
    again.release()
    assert sorted(os.listdir(fresh.path)) == [".lock", "config.yaml"]


def test_the_same_run_started_twice_at_once_trains_once(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CF.dump(C.from_dict({
        "models": ["tiny_cnn", "tiny_cnn"], "data": {"dataset": "synthetic", "val_size": 200, "train_subset": 512,
                                                      "test_subset": 200},
        "optim": {"lr": 0.05}, "train": {"epochs": 3, "batch_size": 64},
        "scale": {"peers_per_worker": 2, "cpus_per_worker": 1},
        "run": {"name": "twice", "storage_path": str(tmp_path / "runs")}})))
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "online_distill.cli", "train", str(cfg)]
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    ends = {}
    while len(ends) < 2:
        for i, p in enumerate(procs):
            if i not in ends and p.poll() is not None:
                ends[i] = time.monotonic() - started
        time.sleep(0.05)
    outs = [p.communicate() for p in procs]
    codes = sorted((p.returncode, i) for i, p in enumerate(procs))
    assert [c for c, _ in codes] == [0, 2], outs
    loser = codes[1][1]
    err = outs[loser][1].strip().splitlines()
    assert len(err) == 1 and "run.name: run 'twice' is in use by pid" in err[0], err
    assert ends[loser] < 3.0, ends  # refused before torch is imported (2 s on an idle machine)
    run = RunDir(tmp_path / "runs" / "twice")
    assert run.finished and run.checkpoints() == ["checkpoint_epoch_0002", "checkpoint_epoch_0003"]
    assert json.loads(run.read_text("result.json"))["metrics"]["epoch"] == 3


# --- failed writes ---------------------------------------------------------------------------------

class FullDisk:
    """A local filesystem that has `budget` bytes left: a write past it fails as a full disk
    does (what fitted is written, then ENOSPC)."""

    def __init__(self, budget: int):
        self.fs, self.left = pafs.LocalFileSystem(), budget

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_output_stream(self, path, *a, **k):
        disk, stream = self, self.fs.open_output_stream(path, *a, **k)

        class Out:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                stream.close()

            def write(self, data):
                if len(data) > disk.left:
                    stream.write(data[: disk.left])
                    disk.left = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
                disk.left -= len(data)
                stream.write(data)

        return Out()


def tiny(make_cfg, **over):
    return make_cfg(**{"models": ["mlp", "mlp"], "train__epochs": 4, "scale__peers_per_worker": 2,
                       "run__max_failures": 2, **over})


def test_a_full_disk_ends_the_run_in_one_line_spends_no_retry_and_keeps_the_last_checkpoint(make_cfg, monkeypatch,
                                                                                              capsys):
    cfg = tiny(make_cfg, run__name="full")
    run = RunDir.of(cfg)
    sizes = []
    real_save = online_distill.rundir.checkpoint.save

    def measure(directory, epoch):  # how big one checkpoint is, to leave room for two
        real_save(directory, epoch)
        sizes.append(sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)))

    monkeypatch.setattr(online_distill.rundir.checkpoint, "save", measure)
    probe = tiny(make_cfg, run__name="probe", train__epochs=1)
    train(probe, verbose=False)
    monkeypatch.setattr(online_distill.rundir.checkpoint, "save", real_save)
    disk = FullDisk(int(2.5 * sizes[0]))
    real_resolve = storage.resolve
    monkeypatch.setattr(storage, "resolve", lambda path: (disk, real_resolve(path)[1]))
    capsys.readouterr()
    with pytest.raises(StorageError) as e:
        train(cfg, verbose=False)
    msg = str(e.value)
    assert "No space left on device" in msg and run.path in msg and "\n" not in msg
    assert "retry" not in capsys.readouterr().err  # none spent
    monkeypatch.setattr(storage, "resolve", real_resolve)
    names = os.listdir(run.path)
    assert not [n for n in names if n.startswith(".saving-") or ".tmp-" in n], names  # nothing half-named
    assert run.checkpoints() == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]
    from online_distill.rundir.checkpoint import find_resume_point

    assert find_resume_point(run, 2).checkpoint.endswith("checkpoint_epoch_0002")
    # the CLI says it in one line and exits 1
    path = cfg_file(cfg, run.path + "-cli")
    disk = FullDisk(int(2.5 * sizes[0]))
    monkeypatch.setattr(storage, "resolve", lambda path: (disk, real_resolve(path)[1]))
    assert main(["train", path]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("online-distill: StorageError: storage: writing ") and "No space left" in err[-1]


def cfg_file(cfg, run_path: str) -> str:
    name = os.path.basename(run_path)
    out = C.with_overrides(cfg, {"run.name": name})
    path = os.path.join(os.path.dirname(run_path), f"{name}.yaml")
    with open(path, "w") as f:
        f.write(CF.dump(out))
    return path


@pytest.mark.e2e
def test_a_real_full_disk(make_cfg, tmp_path, capsys):
    """On a 3 MiB tmpfs: the checkpoint that does not fit ends the run; the one before stays."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected full disk above covers the logic")
    try:
        cfg = make_cfg(models=["mlp(hidden=[256, 256])"], distill__mode="independent", train__epochs=6, run__name="tmpfs",
                       run__storage_path=str(mnt), run__max_failures=2, run__checkpoints_to_keep=3)
        with pytest.raises(StorageError, match="No space left on device"):
            train(cfg, verbose=False)
        run = RunDir.of(cfg)
        names = os.listdir(run.path)
        assert not [n for n in names if n.startswith(".saving-") or ".tmp-" in n], names
        from online_distill.rundir.checkpoint import find_resume_point

        point = find_resume_point(run, 1)
        assert point.checkpoint is not None and point.checkpoint.endswith(run.checkpoints()[-1])
        assert "retry" not in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# --- errors a retry cannot fix -----------------------------------------------------------------------

def test_a_run_made_to_diverge_stops_in_its_first_epoch_and_saves_no_nan(make_cfg, capsys):
    cfg = tiny(make_cfg, run__name="diverges", optim__lr=1000.0, train__epochs=3)
    t0 = time.perf_counter()
    with pytest.raises(NonFiniteError) as e:
        train(cfg, verbose=False)
    msg = str(e.value)
    assert msg.startswith("non-finite loss in peer ") and "at epoch 1, step " in msg and "\n" not in msg
    assert "loss.temperature=3" in msg and "optim.lr=1000" in msg and "Nothing was saved" in msg
    assert "retry" not in capsys.readouterr().err and time.perf_counter() - t0 < 60
    run = RunDir.of(cfg)
    assert run.checkpoints() == [] and not run.finished  # no checkpoint from that state, no NaN saved


def test_grad_clip_keeps_the_gradient_norm_and_is_searchable(make_cfg):
    from online_distill.sweep.spec import from_dict

    cfg = make_cfg(optim__grad_clip=1.0, scale__peers_per_worker=2)
    assert cfg.check_fields().optim.grad_clip == 1.0
    with pytest.raises(C.ConfigError, match=r"^optim.grad_clip: got -1.0; allowed: null \(no clipping\) or a number > 0"):
        make_cfg(optim__grad_clip=-1.0).check_fields()
    spec = from_dict({"name": "s", "base": C.to_dict(cfg), "space": {"optim.grad_clip": {"grid": [0.5, 5.0]}}},
                     base_dir=".", check=False)
    assert [t["optim.grad_clip"] for t in spec.trials()] == [0.5, 5.0]
    # the loop clips each peer's gradient to that global norm before its step
    from online_distill.training.loop import run as run_loop

    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        norm = real(params, max_norm, *a, **k)
        seen.append((float(norm), max_norm))
        return norm

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        run_loop(C.with_overrides(cfg, {"train.epochs": 1, "train.max_steps_per_epoch": 3}), 0, torch.device("cpu"),
                 verbose=False)
    finally:
        torch.nn.utils.clip_grad_norm_ = real
    assert len(seen) == 2 * 3 and all(m == 1.0 for _, m in seen)


def test_labels_outside_the_classes_in_a_tensor_dataset_are_refused_on_the_driver(make_cfg, no_ray):
    from torch.utils.data import TensorDataset

    from online_distill.data.datasets import Splits

    def shifted(cfg):  # labels 1..10 for 10 classes, in a plain TensorDataset
        x, y = torch.randn(300, 1, 8, 8), torch.arange(300) % 10 + 1
        return Splits(TensorDataset(x, y), TensorDataset(x[:50], y[:50]), num_classes=10)

    cfg = make_cfg(models=["mlp"], distill__mode="independent", data__dataset="shifted", data__val_size=50,
                   run__max_failures=2)
    with pytest.raises(C.ConfigError, match=r"^data.dataset: the dataset builder 'shifted' .* labels range over \[1, 10\], "
                                            r"but num_classes=10"):
        train(cfg, datasets={"shifted": shifted}, verbose=False)


class Hidden(torch.utils.data.Dataset):
    """Labels known only by reading each example; from its `bad_after`-th read on, they are 10..19."""

    def __init__(self, n, bad_from, bad_after=0):
        self.n, self.bad_from, self.bad_after, self.reads = n, bad_from, bad_after, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        bad = i >= self.bad_from and self.reads > self.bad_after
        return torch.full((1, 8, 8), float(i % 7)), (i % 10) + (10 if bad else 0)


def test_labels_a_torchvision_target_transform_makes_are_refused_before_training_in_one_line(tmp_path):
    """An ImageFolder whose target_transform makes labels 1..10 for 10 classes: its `targets` are
    0..9, its items say 1..10. Refused by the CLI in one line, before Ray starts; no file left."""
    from PIL import Image

    for c in range(10):
        os.makedirs(tmp_path / "imgs" / f"c{c}")
        for i in range(3):
            Image.new("L", (8, 8), color=20 * c + i).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    (tmp_path / "folders.py").write_text(
        "from torchvision import datasets, transforms\nfrom online_distill.data import Splits\n\n"
        "def shifted(data_cfg):\n"
        f"    ds = datasets.ImageFolder({str(tmp_path / 'imgs')!r}, transform=transforms.Compose(\n"
        "        [transforms.Grayscale(), transforms.ToTensor()]), target_transform=lambda y: y + 1)\n"
        "    return Splits(ds, ds, num_classes=10)\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CF.dump(C.from_dict({
        "models": ["mlp", "mlp"], "data": {"dataset": "folders:shifted", "val_size": 5}, "train": {"batch_size": 8},
        "run": {"name": "tv", "storage_path": str(tmp_path / "runs"), "max_failures": 3}})))
    out = subprocess.run([sys.executable, "-m", "online_distill.cli", "train", str(cfg)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(tmp_path)])})
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.count("\n") == 1 and "train split: labels range over [1, 10], but num_classes=10" in out.stderr
    assert not os.path.exists(tmp_path / "runs")  # not even the lock file


def test_bad_labels_a_dataset_hides_in_its_items_are_refused_before_training(make_cfg, no_ray):
    from online_distill.data.datasets import Splits

    def hidden(cfg):  # the last 10 of 600 examples are bad: the driver reads examples over the whole set
        return Splits(Hidden(600, 590), Hidden(100, 10**9), num_classes=10)

    cfg = make_cfg(models=["mlp"], distill__mode="independent", data__dataset="hidden", data__val_size=10,
                   data__test_subset=None, data__train_subset=None, run__max_failures=2, train__batch_size=64)
    with pytest.raises(C.ConfigError, match=r"^data.dataset: the dataset builder 'hidden' .*, train split: labels range "
                                            r"over \[0, 1\d\], but num_classes=10"):
        train(cfg, datasets={"hidden": hidden}, verbose=False)


def test_a_bad_label_found_in_a_batch_ends_the_run_without_a_retry(make_cfg, capsys):
    from online_distill.data.datasets import Splits

    def hidden(cfg):  # every label good while the driver looks (~260 reads), bad ones from the 400th read on
        return Splits(Hidden(600, 0, bad_after=400), Hidden(100, 10**9), num_classes=10)

    cfg = make_cfg(models=["mlp"], distill__mode="independent", data__dataset="hidden", data__val_size=10,
                   data__test_subset=None, data__train_subset=None, run__max_failures=2, train__batch_size=64)
    with pytest.raises(LabelError, match=r"^data.dataset: a training batch of 'hidden' \(epoch \d, step \d+\) has labels "
                                         r"in \[\d+, 1\d\], but the dataset says num_classes=10"):
        train(cfg, datasets={"hidden": hidden}, verbose=False)
    assert "retry" not in capsys.readouterr().err


def test_the_users_errors_are_told_from_a_lost_peer_where_they_happen():
    """training/blame.py: what the user's code raises becomes a UserCodeError (no retry); what a
    rank sees of a lost peer (a collective's error, even inside the user's forward), Ray's own
    errors and running out of memory pass as they are (a retry may fix them)."""
    import torch.distributed as dist

    from online_distill.errors import UserCodeError
    from online_distill.training.blame import user_code

    def raised(fn) -> BaseException:
        try:
            with user_code("the forward of peer 0 (m)", "on rank 0, epoch 1, step 6 of 16", "a forward that works"):
                fn()
        except BaseException as e:  # noqa: BLE001
            return e
        raise AssertionError("nothing raised")

    def in_place():  # autograd's own error: the user's forward changed what the backward needs
        w = torch.ones(3, requires_grad=True)
        y = w.sigmoid()
        y.mul_(2)
        y.sum().backward()

    for fn, name in [(lambda: torch.ones(64, 3) @ torch.ones(4, 10), "RuntimeError: mat1 and mat2 shapes"),
                     (in_place, "RuntimeError: one of the variables needed for gradient computation"),
                     (lambda: open("/nonexistent/only-on-the-driver.npz"), "FileNotFoundError: ")]:
        e = raised(fn)
        assert isinstance(e, UserCodeError), e
        assert str(e).startswith(f"the forward of peer 0 (m) raised {name}") and "(on rank 0, epoch 1, step 6 of 16)" in str(e)
    lost = [dist.DistNetworkError("Connection closed by peer"),
            RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:22157: Connection "
                         "reset by peer"), MemoryError(), torch.cuda.OutOfMemoryError("CUDA out of memory")]
    for e in lost:
        def boom(e=e):
            raise e

        assert raised(boom) is e


# --- one preflight ------------------------------------------------------------------------------------

def test_the_quick_starts_dataset_is_read_once(monkeypatch, tmp_path):
    from online_distill.data import datasets as data_mod

    calls = []
    real = data_mod.fashion_mnist

    def counted(cfg):
        calls.append(1)
        return real(cfg)

    monkeypatch.setitem(data_mod.DATASETS, "fashion_mnist", counted)
    cfg = CF.load(os.path.join(ROOT, "configs", "fmnist_dml.yaml"))
    cfg = C.with_overrides(cfg, {"train.epochs": 1, "train.max_steps_per_epoch": 3, "data.test_subset": 500,
                                 "run.storage_path": str(tmp_path)})
    train(cfg, verbose=False)
    assert len(calls) == 1


def test_a_dry_run_refuses_what_the_run_refuses(make_cfg, tmp_path, capsys):
    cfg = make_cfg(models=["mlp"], distill__mode="independent", train__epochs=1, run__name="done")
    train(cfg, verbose=False)
    path = cfg_file(cfg, os.path.join(cfg.run.storage, "done"))
    capsys.readouterr()
    assert main(["train", path, "--dry-run"]) == 2
    assert main(["train", path]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and errs[0] == errs[1] and "run 'done' already finished" in errs[0]


def test_a_rerun_of_a_run_killed_before_its_first_checkpoint_says_it_starts_over(make_cfg, capsys):
    from online_distill.run.plan import make_plan

    cfg = make_cfg(models=["mlp"], distill__mode="independent", train__epochs=1, run__name="killed")
    plan = make_plan(cfg)
    plan.prepare()  # config.yaml written, as a run killed in its first epoch leaves it
    plan.release()
    again = make_plan(cfg)
    assert again.resuming and again.resume.checkpoint is None
    assert again.header().startswith("restarting run 'killed' from scratch (its earlier attempt saved no checkpoint)")
