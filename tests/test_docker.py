"""docker/: no Docker engine or Kubernetes runs here, so check what can be checked: the files
parse and pass real linters, the commands and configs they name exist (and the configs load
with the overrides the manifests give them), versions agree with pyproject.toml, nothing runs
as root, auth is on, storage is shared."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
APP = "/home/ray/app"  # WORKDIR of the image: configs/ and tune_configs/ are copied there
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent


def _requirement(name: str) -> Requirement:
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return req
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args() -> dict[str, str]:
    return dict(a.split("=", 1) for kind, a in _dockerfile() if kind == "ARG" and "=" in a)


def _yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _compose() -> dict:
    return _yaml(DOCKER / "docker-compose.yaml")[0]


def _rayjob() -> dict:
    return _yaml(DOCKER / "kuberay" / "rayjob-sweep.yaml")[0]


def _repo_path(image_path: str) -> Path:
    assert image_path.startswith(APP + "/"), image_path
    return REPO / image_path[len(APP) + 1:]


# --- linters ------------------------------------------------------------------------------------

def test_every_yaml_file_parses():
    files = sorted(DOCKER.rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        assert _yaml(f), f


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[lint]')")
    return path


def test_dockerfile_passes_hadolint():
    out = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_yaml_passes_yamllint():
    out = subprocess.run([_tool("yamllint"), "-c", str(DOCKER / ".yamllint"), "-f", "parsable", str(DOCKER)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the image ------------------------------------------------------------------------------------

def test_image_versions_agree_with_pyproject():
    args = _args()
    assert _requirement("ray").specifier.contains(args["RAY_VERSION"])
    assert str(_requirement("ray").specifier) == f"=={args['RAY_VERSION']}"  # the cluster and clients must match
    assert _requirement("torch").specifier.contains(args["TORCH_VERSION"])
    assert _requirement("torchvision").specifier.contains(args["TORCHVISION_VERSION"])
    # the CUDA base, pinned (never :latest), and its Python (Ubuntu 24.04: 3.12) allowed by pyproject
    base = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z-]*runtime-ubuntu24\.04", base), base
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains("3.12")
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base).groups()
    assert args["TORCH_INDEX_URL"].endswith(f"/cu{cuda[0]}{cuda[1]}")  # wheels built for the base's CUDA


def test_image_runs_as_a_numeric_non_root_user_and_installs_our_package():
    steps = _dockerfile()
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    copies = [[w for w in a.split() if not w.startswith("--")][:-1] for kind, a in steps if kind == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (REPO / src).exists(), src
    installs = " ".join(a for kind, a in steps if kind == "RUN")
    assert '"/home/ray/src[export]"' in installs and "online-distill --help" in installs
    entry = [a for kind, a in steps if kind == "ENTRYPOINT"][-1]
    assert "tini" in entry and " tini " in installs  # the entrypoint's binary is installed
    cmd = yaml.safe_load([a for kind, a in steps if kind == "CMD"][-1])
    assert cmd[0] in PYPROJECT["project"]["scripts"]
    assert "/mnt/runs" in [a for kind, a in steps if kind == "VOLUME"][-1]


def test_the_dockerignore_lets_in_what_the_image_copies():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!online_distill/", "!configs/", "!tune_configs/"):
        assert needed in ignore


# --- compose ------------------------------------------------------------------------------------

def _ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return {opt for p in start.params for opt in p.opts}


def _check_ray_start(command: list[str]) -> None:
    assert command[:2] == ["ray", "start"], command
    valid = _ray_start_options()
    for word in command[2:]:
        assert word.split("=")[0] in valid, f"`ray start` has no option {word}"


def test_compose_brings_up_a_head_and_a_worker_with_token_auth_and_a_shared_volume():
    compose = _compose()
    head, worker = compose["services"]["head"], compose["services"]["worker"]
    for svc in (head, worker):
        _check_ray_start(svc["command"])
        assert svc["environment"]["RAY_AUTH_MODE"] == "token"
        assert svc["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")  # refuses to start without one
        assert "runs:/mnt/runs" in svc["volumes"]
        assert svc["image"] == f"online-distill:{PYPROJECT['project']['version']}"
        assert (REPO / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert "--head" in head["command"]
    port = next(w.split("=")[1] for w in head["command"] if w.startswith("--port="))
    assert f"--address={head['hostname']}:{port}" in worker["command"]
    assert worker["depends_on"]["head"]["condition"] == "service_healthy"
    assert all(p.startswith("127.0.0.1:") for p in head["ports"])  # the Jobs API is not published to the network
    assert "runs" in compose["volumes"]
    gpu = _yaml(DOCKER / "docker-compose.gpu.yaml")[0]["services"]["worker"]["deploy"]["resources"]
    assert gpu["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# --- KubeRay ------------------------------------------------------------------------------------

def _ray_pods(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_rayjob_runs_a_sweep_with_gpus_token_auth_and_shared_storage():
    job = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == _args()["RAY_VERSION"]
    assert cluster["authOptions"]["mode"] == "token"
    claim = _yaml(DOCKER / "kuberay" / "storage.yaml")[0]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for pod in _ray_pods(job):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["runs"] == "/mnt/runs"
        assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert pod["containers"][0]["image"] == f"online-distill:{PYPROJECT['project']['version']}"
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
            for g in cluster["workerGroupSpecs"]]
    assert all(n >= 1 for n in gpus)


def test_rayjob_entrypoint_is_a_command_and_sweep_that_exist_and_load():
    from online_distill.config.files import parse_sets
    from online_distill.sweep.driver import load_sweep

    words = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert words[:2] == ["online-distill", "tune"] and "online-distill" in PYPROJECT["project"]["scripts"]
    path = _repo_path(words[2])
    assert path.is_file(), f"{path} (the sweep the RayJob runs) does not exist"
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    spec = load_sweep(str(path), parse_sets(sets))  # every override names a real field with a valid value
    assert spec.storage_path == "/mnt/runs/sweeps" and spec.base.scale.use_gpu


def test_every_config_the_docker_files_and_readme_name_exists():
    texts = [p.read_text() for p in DOCKER.rglob("*") if p.is_file()]
    readme = (REPO / "README.md").read_text()
    texts.append(readme[readme.index("## Scale out"):] if "## Scale out" in readme else "")
    named = {m for t in texts for m in re.findall(r"\b((?:tune_)?configs/[\w.-]+\.yaml)\b", t)}
    assert "tune_configs/cifar100_dml.yaml" in named
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"named but missing: {missing}"


def test_the_cli_has_the_subcommands_the_manifests_run():
    from online_distill import cli

    for sub in ("train", "tune"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([sub, "--help"])
        assert exit_.value.code == 0
