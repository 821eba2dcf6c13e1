"""The package passes ruff with the rules of pyproject.toml's [tool.ruff] (pyflakes: unused and
undefined names; pycodestyle; import order; bugbear; pyupgrade to Python 3.10). CI runs the test
suite (`bash quickstart.sh test`), so CI runs ruff; ruff comes with the `test` extra."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("ruff") is not None:
        cmd = [sys.executable, "-m", "ruff"]
    elif shutil.which("ruff"):
        cmd = [shutil.which("ruff")]
    else:
        pytest.skip("ruff is not installed here: pip install -e '.[test]' (bash quickstart.sh test does)")
    return subprocess.run([*cmd, "check", "--no-cache", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_package_passes_ruff():
    r = ruff("online_distill")
    assert r.returncode == 0, f"ruff check online_distill:\n{r.stdout}{r.stderr}"


def test_ruff_reads_the_projects_rules_and_fails_on_a_bad_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("\n".join([
        "from __future__ import annotations",
        "",
        "import sys",
        "import os",
        "from typing import Callable",
        "",
        "",
        "def f(x: Callable, seen=[]) -> 'int':",
        f"    return len(seen)  # {'a comment past the 150 characters E501 allows ' * 3}",
        "",
    ]))
    r = ruff("--config", os.path.join(ROOT, "pyproject.toml"), "--output-format", "concise", str(bad), cwd=str(tmp_path))
    assert r.returncode == 1
    # import order, an unused import, typing.Callable, a quoted annotation, a mutable default, a long line
    for rule in ("I001", "F401", "UP035", "UP037", "B006", "E501"):
        assert rule in r.stdout, r.stdout
