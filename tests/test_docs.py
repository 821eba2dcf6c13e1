"""Docs that cannot rot: every command shown in README.md, docs/ and benchmarks/ still works as written.

Each `online-distill ...` line in a fenced code block, and each such command in inline code, is parsed by the real CLI parser; `train`
and `tune` commands run with `--dry-run` (the config resolved and fully checked, nothing
started), and must succeed unless the docs show them being refused (a `$ ` line followed by
the `online-distill: config error:` it prints). A command that reads what an earlier documented
command writes (a file under runs/: a sweep's best_config.yaml, a teacher run) must get as far
as that missing file. `bash quickstart.sh train ARGS` is the train
command of the quick start. `python -m MODULE` must name a module that exists. Every config and
sweep file in the repo is checked the same way. The checker is shown failing on a broken copy.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import os
import re
import shlex
import tempfile
from dataclasses import dataclass

import pytest
import yaml

from online_distill import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)),
        *sorted(glob.glob(os.path.join(ROOT, "benchmarks", "**", "*.md"), recursive=True))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Command:
    where: str
    """file:line, for the failure message"""
    argv: tuple[str, ...]
    """what follows the program name; or ('-m', module) for python -m"""
    refused: bool
    """the docs show this command refused with a config error"""


def commands_in(path: str) -> list[Command]:
    text = open(path, encoding="utf-8").read()
    out = []
    for block in FENCE.finditer(text):
        lines = block.group(1).splitlines()
        first_line = text[: block.start(1)].count("\n") + 1
        for i, raw in enumerate(lines):
            line = raw.strip()
            shown_refused = line.startswith("$ ") and i + 1 < len(lines) and "config error:" in lines[i + 1]
            line = line.removeprefix("$ ")
            if "#" in line:  # a trailing comment (no '#' appears inside our commands)
                line = line[: line.index("#")].strip()
            for part in line.split("&&"):
                cmd = _command(part, f"{os.path.relpath(path, ROOT)}:{first_line + i}", shown_refused)
                if cmd is not None:
                    out.append(cmd)
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keep line numbers
    for m in INLINE.finditer(prose):
        if SYNOPSIS.search(m.group(1)) or len(m.group(1).split()) < 3:
            continue  # a usage synopsis (`online-distill export RUN_DIR [--quantize]`) or a bare name
        cmd = _command(m.group(1), f"{os.path.relpath(path, ROOT)}:{prose[: m.start()].count(chr(10)) + 1}", False)
        if cmd is not None:
            out.append(cmd)
    return out


SYNOPSIS = re.compile(r"[\[|]|\b[A-Z][A-Z_]{2,}\b")
INLINE = re.compile(r"`((?:\.venv/bin/)?online-distill [^`]+|python3? -m (?:online_distill|benchmarks\.)[^`]*|"
                    r"bash quickstart\.sh train[^`]*)`")


def _command(line: str, where: str, shown_refused: bool) -> Command | None:
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # RAY_ADDRESS=... online-distill ...
        words = words[1:]
    if not words:
        return None
    prog = os.path.basename(words[0])
    if prog == "online-distill" and len(words) > 1:
        return Command(where, tuple(words[1:]), shown_refused)
    if words[:3] == ["bash", "quickstart.sh", "train"]:
        return Command(where, ("train", "configs/fmnist_dml.yaml", *words[3:]), shown_refused)
    if prog.startswith("python") and len(words) > 2 and words[1] == "-m" and words[2].startswith(("online_distill", "benchmarks.")):
        return Command(where, ("-m", words[2]), shown_refused)
    return None




def check(cmd: Command) -> str | None:
    """None if the command works as the docs say, else what is wrong."""
    if cmd.argv[0] == "-m":
        return None if importlib.util.find_spec(cmd.argv[1]) else f"no module {cmd.argv[1]}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = cli.build_parser().parse_args(list(cmd.argv))
    except SystemExit:
        return f"the CLI does not accept it: {err.getvalue().strip().splitlines()[-1:]}"
    if args.command not in ("train", "tune"):
        return None
    out = io.StringIO()
    # the run directories of a fresh clone: none (runs this checkout made earlier do not count)
    fresh = ["--set", f"run.storage_path={tempfile.mkdtemp(prefix='od-docs-')}"] if args.command == "train" else []
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([*cmd.argv, *fresh, "--dry-run"])
    if rc == 0 and not cmd.refused:
        return None
    if rc == 2 and cmd.refused:
        return None
    if rc == 2 and not cmd.refused and EARLIER_OUTPUT.search(err.getvalue()):
        return None  # everything up to the file an earlier command writes checks
    if rc == 2 and not cmd.refused and NO_GPU.search(err.getvalue()) and _asks_for_gpus(cmd):
        return None  # a command for a machine (or cluster) with GPUs: everything up to the resources checks here
    return f"exit {rc} with --dry-run: {err.getvalue().strip()}"


NO_GPU = re.compile(r"this machine has no GPU that torch can use|"  # a cohort in this process
                    r"the CPUs of the largest node|need [\d.]+ (CPUs|GPUs); the cluster has")  # a sweep's, or workers'
"""A dry run's refusal of what this machine cannot give (a sweep's dry run checks its trials' resources)."""


def _asks_for_gpus(cmd: Command) -> bool:
    """The command, or the config or sweep file it runs, sets scale.use_gpu: it is for a GPU machine."""
    if "scale.use_gpu=true" in cmd.argv:
        return True
    try:
        raw = yaml.safe_load(open(os.path.join(ROOT, cmd.argv[1]), encoding="utf-8"))
    except (OSError, IndexError, yaml.YAMLError):
        return False
    base = raw.get("base") if isinstance(raw, dict) and isinstance(raw.get("base"), dict) else raw
    return isinstance(base, dict) and bool((base.get("scale") or {}).get("use_gpu"))
EARLIER_OUTPUT = re.compile(r"'(%s/)?runs/[^']*' does not exist" % re.escape(ROOT))


ALL = [c for path in DOCS for c in commands_in(path)]


def test_the_docs_show_commands():
    words = len(open(DOCS[0], encoding="utf-8").read().split())
    print(f"\nREADME.md: {words} words; {len(ALL)} commands in {len(DOCS)} files")
    assert words <= 1200, "the README is read in five minutes: task pages go in docs/"
    assert any(c.argv[:1] == ("train",) for c in ALL) and any(c.argv[:1] == ("tune",) for c in ALL)


@pytest.mark.parametrize("cmd", ALL, ids=[f"{c.where} {' '.join(c.argv)[:60]}" for c in ALL])
def test_documented_command_works(cmd, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert check(cmd) is None, f"{cmd.where}: online-distill {' '.join(cmd.argv)}: {check(cmd)}"


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
SWEEPS = sorted(glob.glob(os.path.join(ROOT, "tune_configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS + SWEEPS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_and_sweep_file_checks(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rel = os.path.relpath(path, ROOT)
    what = "tune" if rel.startswith("tune_configs") else "train"
    assert check(Command(rel, (what, rel), refused=False)) is None


def test_the_checker_fails_on_a_broken_copy(tmp_path, monkeypatch):
    """A copy of the docs with a renamed flag, a missing file, a bad field and a module that is
    not there: every one is caught."""
    monkeypatch.chdir(ROOT)
    broken = tmp_path / "README.md"
    broken.write_text("\n".join([
        "```bash",
        "online-distill bench --workers 3",
        "online-distill train configs/no_such_file.yaml",
        "online-distill train configs/fmnist_dml.yaml --set loss.temprature=2",
        "bash quickstart.sh train --set scale.peers_per_worker=3",
        "python -m online_distill.no_such_module",
        "online-distill tune tune_configs/tiny.yaml --set scheduler.name=hyperband",
        "$ online-distill train configs/fmnist_dml.yaml --set loss.kd_weight=0.5",
        "online-distill: config error: (shown refused, but it is not)",
        "```",
        "```bash",
        "online-distill train configs/fmnist_dml.yaml --set run.name=fine   # this one works",
        "```",
    ]))
    found = commands_in(str(broken))
    assert len(found) == 8, found
    problems = [check(c) for c in found]
    assert all(p is not None for p in problems[:7]), problems
    assert problems[7] is None


TIMING = re.compile(r"\d+(\.\d+)? (ms/step|samples/s)")
"""Step times and throughput: what a machine changes."""
LATENCY = re.compile(r"^(\S+ (student|teacher).* \d+\.\d) \S+ \S+ (0\.\d{4})$")
"""The size table's rows: their two CPU latency columns are what a machine changes."""


def _normal(line: str) -> str:
    line = re.sub(r"-> \S*runs/fmnist_dml", "-> runs/fmnist_dml", line.rstrip())
    line = re.sub(r"\(\S*runs/fmnist_dml\)", "(runs/fmnist_dml)", line)
    line = " ".join(TIMING.sub("T", line).split())  # table columns pad to their widest value
    return LATENCY.sub(r"\1 T T \3", line)


METRIC = re.compile(r"(?<![\d.])\d+\.\d{4}(?![\d.])")
"""Accuracies, losses and NLLs (four decimals): another CPU's vector width sums floats in another
order, so a run there drifts a little from the one the README shows (on an AVX-512 Xeon: up to
0.012 at epoch 1, 0.0004 at epoch 4)."""
DRIFT = 0.03


def _same_line(shown: str, printed: str) -> bool:
    """The same text and the same other numbers; metrics within DRIFT of the README's."""
    if METRIC.sub("M", shown) != METRIC.sub("M", printed):
        return False
    return all(abs(float(a) - float(b)) <= DRIFT for a, b in zip(METRIC.findall(shown), METRIC.findall(printed)))


def test_the_quick_start_comparison_allows_drift_in_metrics_only():
    line = "epoch 1/4 val acc: p0 0.7730 p1 0.7690 ens 0.7744 | ce 1.0462 kd 0.0035 | T T"
    assert _same_line(line, line.replace("0.7730", "0.7848").replace("0.0035", "0.0031"))
    assert not _same_line(line, line.replace("0.7730", "0.8130"))  # a real change of result
    assert not _same_line(line, line.replace("1/4", "2/4")) and not _same_line(line, line.replace("ens", "ensemble"))
    row = _normal("  peer0  student  small_cnn  94186  375.9  1.21  35.0  0.8581")
    assert row == "peer0 student small_cnn 94186 375.9 T T 0.8581"
    assert not _same_line(row, row.replace("94186", "94187"))
    final = _normal("   peer0           small_cnn   0.8596   0.4098    0.8586    0.4185")
    assert final == "peer0 small_cnn 0.8596 0.4098 0.8586 0.4185"  # no column of the results is masked


@pytest.mark.e2e
def test_the_readme_shows_the_quick_starts_output_as_printed(tmp_path, monkeypatch, capsys):
    """The README's output block is what `bash quickstart.sh train` prints: each of its lines (but
    `...`, which stands for lines left out) comes out of a real run, in that order, timings aside
    and metrics within the drift another CPU makes (DRIFT)."""
    readme = open(DOCS[0], encoding="utf-8").read()
    block = next(m.group(1) for m in FENCE.finditer(readme) if m.group(1).startswith("starting run 'fmnist_dml'"))
    shown = [_normal(line) for line in block.splitlines() if line.strip() and line.strip() != "..."]
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert cli.main(["train", "configs/fmnist_dml.yaml", "--set", f"run.storage_path={tmp_path}/runs"]) == 0
    printed = [_normal(line) for line in capsys.readouterr().out.splitlines()]
    at = 0
    for line in shown:
        match = next((i for i in range(at, len(printed)) if _same_line(line, printed[i])), None)
        assert match is not None, f"the README shows {line!r}, the run printed:\n" + "\n".join(printed)
        at = match + 1
