"""What a user sees for a bad config file or --set item: the real CLI, run as a subprocess, exits 2
with one line that names the file and line (or the --set item) and no traceback, before torch
or Ray are imported. Fast tier: no Ray session, no training."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.sweep import spec as S
from online_distill.run.checks import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
OK = "models: [small_cnn, small_cnn]\ntrain: {epochs: 1}\n"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "online_distill.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=120)


def refused(out: subprocess.CompletedProcess) -> str:
    """The one line a refusal prints, after checking it is one line, exit 2 and no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("online-distill: config error: ")
    return lines[0]


def put(tmp_path, content: str | bytes, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


# (file content, --set items, what the line must say besides the file or item)
FILE_CASES = {
    "binary": (bytes(range(256)) * 4, [], ["line 2, column 118", "not UTF-8 text (byte 0x80)"]),
    "latin-1": ("train: {epochs: 1}\nrun: {name: café}\n".encode("latin-1"), [], ["line 2, column 16", "not UTF-8 text (byte 0xe9)"]),
    "nul byte": (b"train: {epochs: 1}\nrun: {name: a\x00}\n", [], ["line 2, column 14", "unacceptable character"]),
    "malformed": ("loss: {temperature: 2\ntrain: {epochs: 1}\n", [], ["line 2, column 6", "expected ',' or '}'"]),
    "bad indentation": ("loss:\n  temperature: 2\n kd_weight: 0.5\n", [], ["line 3, column 2", "expected <block end>"]),
    "duplicate section": ("loss: {temperature: 2}\ntrain: {epochs: 1}\nloss: {kd_weight: 0.3}\n", [],
                          ["line 3, column 1", "duplicate key 'loss' (first at line 1)"]),
    "duplicate nested key": ("loss:\n  temperature: 2\n  kd_weight: 0.3\n  temperature: 3\n", [],
                             ["line 4, column 3", "duplicate key 'temperature' (first at line 2)"]),
    "top-level list": ("- small_cnn\n- small_cnn\n", [], ["line 1", "top level must be a mapping", "got a list"]),
    "top-level scalar": ("42\n", [], ["line 1", "top level must be a mapping", "got a number"]),
    "top-level string": ("loss.temperature=4\n", [], ["line 1", "top level must be a mapping", "got a string"]),
    "python tag": ("!!python/object/apply:os.system [echo hi]\n", [], ["line 1", "could not determine a constructor"]),
    "unknown section": (OK + "los: {temperature: 2}\n", [], ["line 3", "los: unknown section"]),
    "unknown field": (OK + "loss:\n  temprature: 2\n", [], ["line 4", "loss.temprature: unknown field; valid: temperature"]),
    "bad value in file": (OK + "loss:\n  kd_weight: 2\n", [], ["line 4", "loss.kd_weight: got 2.0; allowed: a number in [0, 1]"]),
    "bad type in file": ("train: {batch_size: many}\n", [], ["line 1", "train.batch_size: got 'many'; allowed: an integer"]),
}
SET_CASES = {
    "malformed --set": (["models=[small_cnn"], ["column 11 of the value", "expected ',' or ']'"]),
    "duplicate key in --set": (["loss={a: 1, a: 2}"], ["duplicate key 'a'"]),
    "--set without =": (["loss.temperature"], ["expected section.key=value"]),
    "bad value in --set": (["train.epochs=2", "loss.temperature=-1"], ["loss.temperature: got -1.0; allowed: a number > 0"]),
    "unknown field in --set": (["loss.tempreature=3"], ["loss.tempreature: unknown field"]),
    "unknown mode in --set": (["distill.mode=magic"], ["distill.mode: got 'magic'; allowed: 'born_again'"]),
    "too few peers in --set": (["models=[small_cnn]"], ["models: got ['small_cnn']; allowed: at least 2 peers"]),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_file_is_one_line_naming_the_file_and_line(tmp_path, case):
    content, sets, says = FILE_CASES[case]
    path = put(tmp_path, content)
    line = refused(cli("train", path, *sum((["--set", s] for s in sets), [])))
    assert f"config file {path!r}" in line
    for s in says:
        assert s in line, line


@pytest.mark.parametrize("case", SET_CASES)
def test_bad_set_item_is_one_line_naming_the_item(tmp_path, case):
    sets, says = SET_CASES[case]
    path = put(tmp_path, OK)
    line = refused(cli("train", path, *sum((["--set", s] for s in sets), [])))
    assert f"--set {sets[-1]!r}" in line and path not in line
    for s in says:
        assert s in line, line


def test_missing_and_unreadable_files(tmp_path):
    line = refused(cli("train", str(tmp_path / "nope.yaml")))
    assert f"config file {str(tmp_path / 'nope.yaml')!r} does not exist" in line
    line = refused(cli("train", str(tmp_path)))
    assert f"config file {str(tmp_path)!r} cannot be read" in line


def test_sweep_files_get_the_same_treatment(tmp_path):
    sweep = "name: s\nbase:\n  models: [tiny_cnn, tiny_cnn]\n  train: {epochs: 2}\nspace:\n  loss.temperature: {grid: [1, 2]}\n"
    line = refused(cli("tune", put(tmp_path, sweep + "name: t\n", "dup.yaml")))
    assert f"sweep file {str(tmp_path / 'dup.yaml')!r}, line 7, column 1: duplicate key 'name' (first at line 1)" in line
    line = refused(cli("tune", put(tmp_path, b"name: s\xff\n", "bin.yaml")))
    assert f"sweep file {str(tmp_path / 'bin.yaml')!r}, line 1, column 8: not UTF-8" in line
    line = refused(cli("tune", put(tmp_path, "- a\n", "list.yaml")))
    assert f"sweep file {str(tmp_path / 'list.yaml')!r}, line 1: the top level must be a mapping" in line
    path = put(tmp_path, sweep, "s.yaml")
    line = refused(cli("tune", path, "--set", "space.loss.kd_weight={uniform: [0.2"))
    assert "--set 'space.loss.kd_weight={uniform: [0.2'" in line and "not valid YAML" in line
    line = refused(cli("tune", path, "--set", "loss.kd_weight=2"))
    assert f"sweep file {path!r} with --set 'loss.kd_weight=2': " in line and "loss.kd_weight: got 2.0" in line
    line = refused(cli("tune", put(tmp_path, sweep.replace("{grid: [1, 2]}", "{grid: [1, -2]}"), "v.yaml")))
    assert "space.loss.temperature: loss.temperature: got -2.0; allowed: a number > 0" in line


def test_refusals_come_before_torch_and_ray_are_imported(tmp_path):
    """The CLI's field checks (and the Python API's reading of configs and sweeps) are pure
    Python: a refusal costs Python's start-up, not torch's and Ray's (several seconds)."""
    path = put(tmp_path, OK)
    sweep = put(tmp_path, "name: s\nbase: c.yaml\nspace:\n  loss.temperature: {grid: [1, 2]}\n", "s.yaml")
    code = f"""
import sys
from online_distill.config import files as config
from online_distill.sweep import spec as sweep_config
from online_distill.cli import main
config.load({path!r}).check_fields()
config.load_checked({path!r}, ["loss.temperature=2"])
sweep_config.load({sweep!r}, names=False)
rc = main(["train", {path!r}, "--set", "loss.temperature=-1"])
rc2 = main(["tune", {sweep!r}, "--set", "num_samples=0"])
heavy = sorted(m for m in ("torch", "torchvision", "ray", "pandas") if m in sys.modules)
assert not heavy and rc == rc2 == 2, (heavy, rc, rc2)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stderr.splitlines()) == 2 and "num_samples: got 0" in out.stderr


def test_registry_errors_keep_their_message_and_name_where_the_value_came_from(tmp_path, capsys, no_ray):
    from online_distill.cli import main

    path = put(tmp_path, "models: [small_cnn,\n  vgg99]\n")
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert f"config file {path!r}, line 2: models[1]: unknown model 'vgg99'; allowed: " in err and "small_cnn" in err
    assert main(["train", path, "--set", "models=[small_cnn, small_cnn]", "--set", "data.dataset=imagenet"]) == 2
    assert "--set 'data.dataset=imagenet': data.dataset: unknown dataset 'imagenet'; allowed: " in capsys.readouterr().err


def test_mode_names_match_the_teacher_sources():
    from online_distill.teachers import TEACHERS

    assert C.DISTILL_MODES == tuple(sorted(TEACHERS))


def test_python_api_keeps_its_messages_and_refuses_duplicates(tmp_path):
    with pytest.raises(C.ConfigError) as e:
        CF.load(put(tmp_path, "loss: {temperature: 1}\nloss: {temperature: 2}\n"))
    assert "line 2, column 1: duplicate key 'loss'" in str(e.value)
    with pytest.raises(C.ConfigError) as e:
        check(CF.load(put(tmp_path, "loss: {temperature: -1}\n")))
    assert str(e.value).startswith("loss.temperature: got -1.0") and e.value.field == "loss.temperature"
    with pytest.raises(C.ConfigError, match="--set 'x=\\[1': the value is not valid YAML"):
        CF.parse_sets(["x=[1"])
    # still plain safe_load otherwise: merge keys, anchors, a BOM, an empty file
    merged = put(tmp_path, "\ufeffx: &t {temperature: 2, kd_weight: 0.2}\nloss:\n  <<: *t\n  temperature: 3\n")
    assert CF.read_yaml(merged, "f")["loss"] == {"temperature": 3, "kd_weight": 0.2}
    assert CF.read_yaml_lines(merged, "f")[1]["loss.temperature"] == 4
    assert CF.load(put(tmp_path, "# only a comment\n")) == C.Config()
    with pytest.raises(C.ConfigError, match="sweep file .* duplicate key 'space'"):
        S.load(put(tmp_path, "name: s\nspace: {}\nspace: {}\n", "s.yaml"))


def test_refusal_benchmark_prints_its_median():
    out = subprocess.run([sys.executable, "-m", "benchmarks.tools.refusal", "-n", "2"], capture_output=True,
                         text=True, env=ENV, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("median refusal time: ") and "(bar < 2 s)" in out.stdout
