"""The package's layout shows its design: no module imports one that imports it back (a walk of
every import statement, function-level ones included), and the public API is at the top."""
from __future__ import annotations

import ast
import os

import online_distill

PKG_DIR = os.path.dirname(online_distill.__file__)


def modules() -> dict[str, str]:
    out = {}
    for dp, _, files in os.walk(PKG_DIR):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dp, f), os.path.dirname(PKG_DIR))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(dp, f)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from X import y`: an edge to module X.y where that is a module, else to X
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 50  # the walk sees the package's imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_subpackages_show_the_architecture_and_the_api_is_at_the_top():
    mods = modules()
    for sub in ("online_distill.teachers", "online_distill.run", "online_distill.sweep"):
        assert sub in mods and any(m.startswith(sub + ".") for m in mods), sub
    for name in ("Config", "ConfigError", "load", "with_overrides", "check", "train", "load_sweep", "run_sweep"):
        assert hasattr(online_distill, name), name


ENTRY_POINTS = {"online_distill", "online_distill.cli"}
"""What a person calls: the public API and the command line. They may import any layer."""
LAYERS = ["online_distill.sweep", "online_distill.run", "online_distill.training", "online_distill.teachers",
          "online_distill.rundir", "online_distill.distill", "online_distill.models", "online_distill.data",
          "online_distill.core", "online_distill.config", "online_distill.errors"]
"""From the top down: a sweep is many runs; a run drives the workers' loop; the loop asks its
teachers; teachers read the run directory, the distillation math and the models; models and
data stand on the core (topology, host, optimizers) and the config; errors is the floor. A
module may import its own folder and the ones below it, never one above (sweep/ above run/:
run/ never imports sweep/)."""
MAX_TOP_LEVEL = 10


def layer(mod: str) -> int:
    for i, pkg in enumerate(LAYERS):
        if mod == pkg or mod.startswith(pkg + "."):
            return i
    raise AssertionError(f"{mod} is in no layer: add its folder to LAYERS")


def test_every_module_is_in_a_layer_and_few_sit_at_the_top():
    mods = modules()
    for mod in mods:
        if mod not in ENTRY_POINTS:
            layer(mod)
    top = [f for f in os.listdir(PKG_DIR) if f.endswith(".py")]
    assert len(top) <= MAX_TOP_LEVEL, sorted(top)


def test_no_module_imports_upward():
    graph = import_graph()
    upward = [f"{mod} -> {t}" for mod, targets in graph.items() if mod not in ENTRY_POINTS
              for t in targets if t not in ENTRY_POINTS and layer(t) < layer(mod)]
    assert upward == []
    assert not [f"{mod} -> {t}" for mod, targets in graph.items() if mod not in ENTRY_POINTS
                for t in targets if t in ENTRY_POINTS], "only the entry points import the entry points"


def _folder(mod: str) -> str:
    return ".".join(mod.split(".")[:2])


def test_no_private_name_crosses_a_folder():
    """`from ..x.y import _name` reaches into another folder's insides: use its public name."""
    mods = modules()
    crossings = []
    for mod, path in mods.items():
        pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                if base.startswith("online_distill") and _folder(base) != _folder(mod):
                    crossings += [f"{mod}: {base}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert crossings == []


def test_every_folder_has_a_face():
    """Each folder's __init__ says what the folder holds (a docstring) a reader can name."""
    for entry in sorted(os.listdir(PKG_DIR)):
        init = os.path.join(PKG_DIR, entry, "__init__.py")
        if os.path.isdir(os.path.join(PKG_DIR, entry)) and entry != "__pycache__":
            assert os.path.exists(init), entry
            assert ast.get_docstring(ast.parse(open(init).read())), f"{entry}/__init__.py has no docstring"


def test_benchmark_scripts_and_the_test_cluster_are_not_installed():
    mods = modules()
    assert not [m for m in mods if m.startswith("online_distill.run.bench.")], "benchmark scripts live in benchmarks/tools"
    assert "online_distill.run.cluster" not in mods, "the local test cluster lives in tests/cluster.py"
    root = os.path.dirname(PKG_DIR)
    assert os.path.exists(os.path.join(root, "benchmarks", "tools", "claims.py"))
    assert os.path.exists(os.path.join(root, "tests", "cluster.py"))


def test_the_config_schema_and_its_yaml_reading_are_apart():
    schema = open(os.path.join(PKG_DIR, "config", "schema.py")).read()
    assert "import yaml" not in schema and "safe_load" not in schema
    assert "yaml.SafeLoader" in open(os.path.join(PKG_DIR, "config", "files.py")).read()


def test_run_and_sweep_reach_the_teachers_through_their_face():
    """A frozen teacher's lifecycle (copy, cache, service) is teachers/lifecycle.py's, re-exported by
    the teachers package: run/ and sweep/ never import the files that implement it."""
    graph = import_graph()
    inside = [f"{m} -> {t}" for m, targets in graph.items()
              if m.startswith(("online_distill.run", "online_distill.sweep"))
              for t in targets if t.startswith("online_distill.teachers.")]
    assert inside == []
