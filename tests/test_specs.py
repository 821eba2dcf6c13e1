"""Models and datasets by spec: a name, an import path `package.module:builder`, either with
keyword arguments; parsed, never evaluated; refused in one line naming the field. A model given
by import path trains from the command line, exports, and teaches a later KD run."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch
from torch import nn

from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.config import specs
from online_distill.cli import main
from online_distill.models.builders import build_model, constraints, mlp

IMAGES = torch.zeros(2, 1, 28, 28)


def test_specs_parse_literals_only_and_split_on_top_level_commas():
    s = specs.parse("mlp(hidden=[800, 800], dropout=0.5, max_norm=None)")
    assert s.target == "mlp" and dict(s.kwargs) == {"hidden": [800, 800], "dropout": 0.5, "max_norm": None}
    assert specs.parse("my_pkg.nets:wide_mlp").is_import_path
    assert specs.split("mlp(hidden=[8, 8]),small_cnn, my.mod:f(a=1, b=2)") == \
        ["mlp(hidden=[8, 8])", "small_cnn", "my.mod:f(a=1, b=2)"]
    for bad, why in (("mlp(__import__('os'))", "keyword=value only"), ("mlp(x=open('f'))", "must be a literal"),
                     ("mlp(**k)", "'\\*\\*' is not allowed"), ("1mlp", "not a builder name")):
        with pytest.raises(specs.SpecError, match=why):
            specs.parse(bad)
    with pytest.raises(C.ConfigError, match=r"^models\[1\]: 'mlp\(hidden=': the arguments must end"):
        C.from_dict({"models": ["mlp", "mlp(hidden="]}).check_fields()


def test_a_builder_given_arguments_it_does_not_take_is_refused_naming_them():
    with pytest.raises(C.ConfigError, match=r"^models\[0\]: mlp\(hiden=3\): got an unexpected keyword argument 'hiden'; "
                                            r"mlp takes 2 positional argument\(s\) from the framework and the keywords "
                                            r"hidden, dropout, input_dropout, max_norm"):
        build_model("mlp(hiden=3)", IMAGES, 10, field="models[0]")
    with pytest.raises(C.ConfigError, match=r"^models\[0\]: 'no_such_pkg.nets:f' does not import \(ModuleNotFoundError"):
        build_model("no_such_pkg.nets:f", IMAGES, 10, field="models[0]")
    with pytest.raises(C.ConfigError, match=r"^models\[0\]: os:sep is a str, not a model builder"):
        build_model("os:sep", IMAGES, 10, field="models[0]")


def test_hintons_mlp_has_dropout_and_a_max_norm_constraint_the_loop_applies():
    torch.manual_seed(0)
    plain, again = mlp((1, 28, 28), 10, hidden=(64, 64)), mlp((1, 28, 28), 10, hidden=(64, 64))
    plain(IMAGES), again(IMAGES)
    assert list(plain.state_dict()) == ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    m = build_model("mlp(hidden=[32, 16], dropout=0.5, input_dropout=0.2, max_norm=0.5)", IMAGES, 10)
    assert sum(isinstance(x, nn.Dropout) for x in m.modules()) == 3
    hidden = [x for x in m.modules() if isinstance(x, nn.Linear)][:-1]
    with torch.no_grad():
        for x in hidden:
            x.weight.mul_(100)
    for c in constraints(m):
        c()
    for x in hidden:
        assert (x.weight.norm(dim=1) <= 0.5 + 1e-5).all()
    out = [x for x in m.modules() if isinstance(x, nn.Linear)][-1]
    assert out.weight.norm(dim=1).max() > 0  # the output layer is not constrained
    with pytest.raises(C.ConfigError, match="dropout: got 1.5; allowed: a probability in"):
        build_model("mlp(dropout=1.5)", IMAGES, 10)


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent('''
        from torch import nn

        def wide(input_shape, num_classes, width=32):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(width), nn.ReLU(), nn.Linear(width, num_classes))
    '''))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("mynets.nets", None)
    sys.modules.pop("mynets", None)


def test_a_model_by_import_path_trains_exports_and_teaches(user_package, capsys):
    tmp = user_package
    base = C.from_dict({
        "models": ["mynets.nets:wide(width=24)"], "distill": {"mode": "independent"},
        "data": {"dataset": "synthetic", "val_size": 200, "train_subset": 512, "test_subset": 200},
        "optim": {"lr": 0.05, "schedule": "constant"}, "train": {"epochs": 1, "batch_size": 64},
        "scale": {"cpus_per_worker": 1}, "run": {"name": "mine", "storage_path": str(tmp / "runs")}})
    (tmp / "mine.yaml").write_text(CF.dump(base))
    assert main(["train", "mine.yaml"]) == 0
    saved = CF.load(str(tmp / "runs" / "mine" / "config.yaml"))
    assert saved.models == ("mynets.nets:wide(width=24)",)  # the path is kept: later commands rebuild it
    assert main(["export", str(tmp / "runs" / "mine")]) == 0
    assert os.path.exists(tmp / "runs" / "mine" / "export" / "peer0.pt")
    kd = C.with_overrides(base, {"models": ["mlp(hidden=[16])"], "distill.mode": "offline",
                                 "distill.teacher_checkpoint": str(tmp / "runs" / "mine"), "run.name": "kd"})
    (tmp / "kd.yaml").write_text(CF.dump(kd))
    assert main(["train", "kd.yaml"]) == 0
    assert "mynets.nets:wide(width=24)" in open(tmp / "runs" / "kd" / "compression.csv").read()
    capsys.readouterr()
    bad = C.with_overrides(base, {"models": ["mynets.nets:nope"], "run.name": "bad"})
    (tmp / "bad.yaml").write_text(CF.dump(bad))
    assert main(["train", "bad.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models[0]: 'mynets.nets:nope': module 'mynets.nets' has no attribute 'nope'" in err[0]
