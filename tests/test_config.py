"""Config loading, overrides and the errors a user sees (field named, what is allowed)."""
import subprocess
import sys

import pytest

from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.cli import main
from online_distill.run.checks import check


def write(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_are_a_valid_dml_cohort():
    cfg = check(C.Config())
    assert cfg.num_peers == 2 and cfg.distill.mode == "dml" and cfg.world_size == 2


def test_yaml_round_trip_and_types(tmp_path):
    cfg = CF.load(write(tmp_path, "models: [mlp, tiny_cnn]\nloss: {temperature: 2, kd_weight: 0.25}\ntrain: {epochs: 3}\n"))
    assert cfg.models == ("mlp", "tiny_cnn") and cfg.loss.temperature == 2.0 and isinstance(cfg.loss.temperature, float)
    assert C.from_dict(C.to_dict(cfg)) == cfg
    with pytest.raises(Exception):
        cfg.loss.temperature = 3.0  # frozen


def test_overrides_parse_values_as_yaml(tmp_path):
    path = write(tmp_path, "train: {epochs: 3}\n")
    cfg = CF.load(path, CF.parse_sets(["loss.temperature=4.5", "models=[mlp, mlp, mlp]", "data.train_subset=null",
                                     "scale.use_gpu=true"]))
    assert cfg.loss.temperature == 4.5 and cfg.models == ("mlp",) * 3 and cfg.data.train_subset is None
    assert cfg.scale.use_gpu is True and cfg.train.epochs == 3


@pytest.mark.parametrize("text, field, allowed", [
    ("loss: {temperature: 0}", "loss.temperature", "> 0"),
    ("loss: {temperature: -1}", "loss.temperature", "> 0"),
    ("loss: {kd_weight: 1.5}", "loss.kd_weight", "[0, 1]"),
    ("loss: {kd_weight: -0.1}", "loss.kd_weight", "[0, 1]"),
    ("loss: {multi_teacher: max}", "loss.multi_teacher", "mean_probs"),
    ("models: [small_cnn]", "models", "at least 2 peers"),
    ("models: [small_cnn, vgg99]", "models[1]", "resnet18"),
    ("data: {dataset: imagenet}", "data.dataset", "fashion_mnist"),
    ("distill: {mode: magic}", "distill.mode", "'dml'"),
    ("train: {epochs: 0}", "train.epochs", ">= 1"),
    ("train: {batch_size: many}", "train.batch_size", "an integer"),
    ("optim: {name: lbfgs}", "optim.name", "'sgd'"),
    ("optim: {schedule: linear}", "optim.schedule", "'cosine'"),
    ("scale: {replicas: 0}", "scale.replicas", ">= 1"),
    ("scale: {precision: fp8}", "scale.precision", "'bf16'"),
    ("run: {name: a/b}", "run.name", "without '/'"),
])
def test_bad_values_name_the_field_and_what_is_allowed(tmp_path, text, field, allowed):
    with pytest.raises(C.ConfigError) as e:
        check(CF.load(write(tmp_path, text)))
    assert str(e.value).startswith(field + ":") and allowed in str(e.value)


@pytest.mark.parametrize("text, where", [
    ("los: {temperature: 2}", "los: unknown section"),
    ("loss: {temp: 2}", "loss.temp: unknown field; valid: temperature, kd_weight"),
])
def test_unknown_keys_list_the_valid_ones(tmp_path, text, where):
    with pytest.raises(C.ConfigError, match=where):
        CF.load(write(tmp_path, text))


def test_unknown_override_is_refused(tmp_path):
    with pytest.raises(C.ConfigError, match="loss.tempreature: unknown field"):
        CF.load(write(tmp_path, ""), {"loss.tempreature": 3})
    with pytest.raises(C.ConfigError, match="expected section.key=value"):
        CF.parse_sets(["loss.temperature"])


def test_user_builders_extend_the_names():
    cfg = C.Config(models=("mine", "mine"))
    with pytest.raises(C.ConfigError, match=r"models\[0\]"):
        check(cfg)
    check(cfg, models={"mine": lambda c, k: None})


def test_cli_config_error_exits_2_before_starting_ray(tmp_path, capsys, no_ray):
    path = write(tmp_path, "loss: {kd_weight: 2}\n")
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert "loss.kd_weight: got 2.0; allowed: a number in [0, 1]" in err


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "online_distill.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--set" in out.stdout
