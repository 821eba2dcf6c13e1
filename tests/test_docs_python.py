"""Docs whose code runs: every ```python block in README.md, docs/ and benchmarks/ is run here.

A block runs as the script a reader pastes it into: a fresh namespace named `__main__` (Ray sends
what it defines by value, as it does a script's), in a fresh directory whose `configs/` is the
repository's (the blocks' config paths are relative to the repository root) and whose `runs/`
starts empty. Tracebacks name the page and its line. A block that calls `train(` trains: it is
an e2e test on the shared local Ray session; the others run in the fast tier, where every
`online_distill` name a block uses (what it imports, and the attributes it reads of those) and
every dotted `online_distill.x` name the pages mention must also exist, training blocks included.

A block runs as shown, except where SETUP lists it, saying why, with one or both of:
- `prepare`: run first in the block's directory and namespace, for what a fragment takes from the
  reader (their labelled texts), files it reads that earlier documented commands write, or a
  Hugging Face hub model it names, which cannot be downloaded here: the block's hub name is
  replaced by a local directory holding a stand-in of that kind (each stand-in says what it is);
- `tiny`: the overrides TINY (and every peer in one worker) on the way into `online_distill.train` (one epoch on a few hundred
  examples), for a block whose run as shown takes minutes; what the block shows is unchanged.
An entry of SETUP that matches no block fails, so the list cannot outlive the docs. The checker
is shown failing on a broken page.
"""
from __future__ import annotations

import ast
import glob
import importlib
import os
import random
import re
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

import online_distill

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted(Path(p) for p in glob.glob(str(ROOT / "docs" / "**" / "*.md"), recursive=True)),
        *sorted(Path(p) for p in glob.glob(str(ROOT / "benchmarks" / "**" / "*.md"), recursive=True))]
PYTHON_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)
TRAINS = re.compile(r"\btrain\(")
TINY = {"train.epochs": 1, "data.val_size": 64, "data.train_subset": 256, "data.test_subset": 128}
"""A training block's config, where SETUP says `tiny`: seconds instead of minutes."""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    """the line of the block's first line of code in its page"""
    source: str

    @property
    def where(self) -> str:
        return f"{_rel(self.path)}:{self.line}"

    @property
    def trains(self) -> bool:
        return bool(TRAINS.search(self.source))


def _rel(path: Path) -> str:
    return os.path.relpath(path, ROOT) if str(path).startswith(str(ROOT)) else str(path)


def blocks_in(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    return [Block(path, text[: m.start(1)].count("\n") + 1, m.group(1)) for m in PYTHON_FENCE.finditer(text)]


# ---- what the test adds to a block, and why -------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    why: str
    prepare: Callable[[dict, Path], dict[str, str]] | None = None
    """(the block's namespace, its directory) -> {text in the block: what replaces it}"""
    tiny: bool = False


def reviews_and_a_bert_tiny_stand_in(namespace: dict, workdir: Path) -> dict[str, str]:
    """The reader's labelled texts the block takes as given (train_texts, train_labels,
    test_texts, test_labels): made-up two-class reviews. And a STAND-IN for the hub model
    prajjwal1/bert-tiny, which cannot be downloaded here: a BERT of its shape (2 layers, hidden
    128, 2 heads) with random weights and a word-level tokenizer of the reviews' words, saved where
    the block's `from_pretrained` calls (tokenizer and model, in every worker) read it."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    good, bad = ["great", "lovely", "fun", "moving", "superb"], ["dull", "awful", "boring", "weak", "clumsy"]
    filler = ["the", "film", "was", "plot", "acting", "and", "really", "quite", "ending"]
    rng = random.Random(0)

    def reviews(n: int) -> tuple[list[str], list[int]]:
        labels = [rng.randrange(2) for _ in range(n)]
        return [" ".join(rng.choices(filler, k=6) + rng.choices(good if y else bad, k=2)) for y in labels], labels

    (train_texts, train_labels), (test_texts, test_labels) = reviews(600), reviews(200)
    namespace.update(train_texts=train_texts, train_labels=train_labels, test_texts=test_texts,
                     test_labels=test_labels)
    stand_in = workdir / "stand-in-for-prajjwal1-bert-tiny"
    stand_in.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *good, *bad, *filler]
    (stand_in / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(stand_in / "vocab.txt")).save_pretrained(stand_in)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=512)).save_pretrained(stand_in)
    return {'"prajjwal1/bert-tiny"': repr(str(stand_in))}


def issue3_final_csvs(namespace: dict, workdir: Path) -> dict[str, str]:
    """STAND-INS for the final.csv of the page's runs under runs/issue3 (each a real training of
    minutes): plain, ema and snapshot at seeds 0-2, with made-up numbers, written by the code a run
    writes its final.csv with (rundir.tables: final_table of the history)."""
    from online_distill.rundir.tables import final_table, history_frame

    for method in ("plain", "ema", "snapshot"):
        for seed in range(3):
            rows = [{"epoch": 3, "member": member, "model": "small_cnn", "val_acc": 0.8, "val_nll": 0.5,
                     "test_acc": 0.80 + 0.01 * seed, "test_nll": 0.5 - 0.01 * seed} for member in ("peer0", "ensemble")]
            run = workdir / "runs" / "issue3" / f"{method}_s{seed}"
            run.mkdir(parents=True)
            final_table(history_frame(rows)).to_csv(run / "final.csv", index=False)
    return {}


SETUP: dict[tuple[str, str], Setup] = {
    ("docs/your-model-and-data.md", '"models": ["my_net", "small_cnn"]'): Setup(
        "the quick start's cohort: 4 epochs on 20,000 images take minutes", tiny=True),
    ("docs/your-model-and-data.md", 'AutoTokenizer.from_pretrained("prajjwal1/bert-tiny")'): Setup(
        "a fragment: the reader's texts; a hub model; lang_dml's 4 epochs of a BERT take minutes",
        prepare=reviews_and_a_bert_tiny_stand_in, tiny=True),
    ("docs/self-distillation.md", 'glob.glob("runs/issue3/*/final.csv")'): Setup(
        "it aggregates the final.csv of the page's 18 runs", prepare=issue3_final_csvs),
}
"""(page, text of the block) -> what the test adds to the block, and why."""

EXPECT = {'glob.glob("runs/issue3/*/final.csv")': ["ema", "plain", "snapshot", "test_acc"]}
"""Text of a block -> what its output must show."""


def setup_of(block: Block) -> Setup | None:
    found = [s for (page, text), s in SETUP.items() if page == _rel(block.path) and text in block.source]
    assert len(found) <= 1, f"{block.where}: more than one SETUP entry matches"
    return found[0] if found else None


# ---- the checks ------------------------------------------------------------------------------------

def _attr(obj, name: str):
    """obj.name, where obj is a module of the package or one of its names; a submodule not yet
    imported is imported. AttributeError if there is no such name."""
    if hasattr(obj, name):
        return getattr(obj, name)
    if isinstance(obj, types.ModuleType):
        full = f"{obj.__name__}.{name}"
        try:
            return importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:
                raise
    raise AttributeError(name)


def missing_names(source: str) -> list[str]:
    """The online_distill names a block imports or reads (`config.load` after `from online_distill
    import config`) that do not exist."""
    tree = ast.parse(source)
    rebound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound: dict[str, object] = {}
    missing: list[str] = []

    def resolve(dotted: str):
        obj = online_distill
        for i, part in enumerate(dotted.split(".")[1:], 1):
            try:
                obj = _attr(obj, part)
            except AttributeError:
                missing.append(".".join(dotted.split(".")[: i + 1]))
                return None
        return obj

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "online_distill" and (module := resolve(alias.name)) is not None:
                    bound[alias.asname or "online_distill"] = module if alias.asname else online_distill
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "online_distill" and not node.level:
            module = resolve(node.module)
            for alias in node.names if module is not None else []:
                try:
                    bound[alias.asname or alias.name] = _attr(module, alias.name)
                except AttributeError:
                    missing.append(f"{node.module}.{alias.name}")
    for name in rebound:
        bound.pop(name, None)

    def value(node, qualified: list[str]):
        if isinstance(node, ast.Name) and node.id in bound:
            qualified.append(node.id)
            return bound[node.id]
        if isinstance(node, ast.Attribute):
            obj = value(node.value, qualified)
            if obj is not None:
                qualified.append(node.attr)
                try:
                    return _attr(obj, node.attr)
                except AttributeError:
                    missing.append(".".join(qualified))
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            value(node, [])
    return sorted(set(missing))


PROSE_NAME = re.compile(r"\bonline_distill(?:\.[A-Za-z_]\w*)+")


def missing_prose_names(path: Path) -> list[str]:
    """Dotted online_distill.x.y names a page mentions anywhere that do not exist."""
    out = []
    for name in sorted(set(PROSE_NAME.findall(path.read_text(encoding="utf-8")))):
        obj = online_distill
        for part in name.split(".")[1:]:
            try:
                obj = _attr(obj, part)
            except AttributeError:
                out.append(name)
                break
    return out


def run_block(block: Block, workdir: Path, setup: Setup | None = None) -> str | None:
    """Run a block as a pasted script in `workdir` (SETUP's additions first): None if it ran,
    else the error and the page's line it came from."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "configs").exists():
        (workdir / "configs").symlink_to(ROOT / "configs")
    namespace = {"__name__": "__main__"}
    source = block.source
    before = os.getcwd()
    os.chdir(workdir)
    try:
        if setup is not None and setup.prepare is not None:
            for shown, stand_in in setup.prepare(namespace, workdir).items():
                assert shown in source, f"{block.where}: SETUP replaces {shown}, which the block no longer shows"
                source = source.replace(shown, stand_in)
        code = compile("\n" * (block.line - 1) + source, str(block.path), "exec")  # tracebacks: the page's lines
        real_train = online_distill.train

        def tiny_train(cfg, **kwargs):
            # and every peer in one worker: the cohort trains in this process (a worker group's
            # start-up is the test cluster's business, not the docs')
            whole = {"scale.peers_per_worker": cfg.num_peers, "scale.replicas": 1}
            return real_train(online_distill.with_overrides(cfg, {**TINY, **whole}), **kwargs)

        with mock.patch.object(online_distill, "train", tiny_train if setup is not None and setup.tiny else real_train):
            exec(code, namespace)
    except Exception as e:  # noqa: BLE001 - any error of the block is the finding
        lines = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(block.path)]
        at = f"{_rel(block.path)}:{lines[-1].lineno}" if lines else block.where
        return f"{at}: {type(e).__name__}: {e}"
    finally:
        os.chdir(before)
    return None


# ---- the docs --------------------------------------------------------------------------------------

ALL = [b for page in DOCS for b in blocks_in(page)]


def test_the_docs_show_python_and_every_setup_entry_matches_a_block():
    assert len(ALL) >= 5 and any(b.trains for b in ALL)
    for page, text in SETUP:
        assert any(_rel(b.path) == page and text in b.source for b in ALL), \
            f"SETUP lists a block of {page} showing {text!r}, which no block of that page shows"
    for text in EXPECT:
        assert any(text in b.source for b in ALL), f"EXPECT names {text!r}, which no block shows"


@pytest.mark.parametrize("block", ALL, ids=[b.where for b in ALL])
def test_every_online_distill_name_a_block_uses_exists(block):
    assert missing_names(block.source) == [], f"{block.where}: no such name"


@pytest.mark.parametrize("page", DOCS, ids=[_rel(p) for p in DOCS])
def test_every_online_distill_name_a_page_mentions_exists(page):
    assert missing_prose_names(page) == []


@pytest.mark.parametrize("block", [pytest.param(b, marks=[pytest.mark.e2e] if b.trains else [], id=b.where)
                                   for b in ALL])
def test_the_block_runs(block, tmp_path, request, capsys):
    if block.trains:
        request.getfixturevalue("ray_session")  # the session's one local Ray, for a block whose run starts one
    capsys.readouterr()
    assert run_block(block, tmp_path / "cwd", setup_of(block)) is None
    printed = capsys.readouterr().out
    for text, shown in EXPECT.items():
        if text in block.source:
            assert all(s in printed for s in shown), f"{block.where} printed:\n{printed}"


def test_the_checker_fails_on_a_broken_page(tmp_path):
    """A page with a name that is not there (imported, read from a module, a module), a block
    that raises, and a prose name that is not there: every one is caught, at its line; a good
    block (one that rebinds a module's name, too) passes."""
    page = tmp_path / "broken.md"
    page.write_text("\n".join([
        "Prose names `online_distill.data.NoSuchThing` and `online_distill.data.Splits`.",
        "```python",
        "from online_distill import no_such_name",
        "```",
        "```python",
        "from online_distill import config",
        "cfg = config.no_such_function('configs/fmnist_dml.yaml')",
        "```",
        "```python",
        "import online_distill.no_such_module",
        "```",
        "```python",
        "import online_distill",
        "print(online_distill.load)",
        "x = 1 / 0",
        "```",
        "```python",
        "from online_distill import config",
        "from online_distill.models import hf",
        "print(config.load, hf.tokenize)",
        "config = {'models': []}  # rebound: no longer the module",
        "print(config.keys())",
        "```",
        "",
    ]))
    blocks = blocks_in(page)
    assert [b.line for b in blocks] == [3, 6, 10, 13, 18]
    assert [missing_names(b.source) for b in blocks] == [
        ["online_distill.no_such_name"], ["config.no_such_function"], ["online_distill.no_such_module"], [], []]
    errors = [run_block(b, tmp_path / f"cwd{i}") for i, b in enumerate(blocks)]
    assert errors[0].startswith(f"{page}:3: ImportError: cannot import name 'no_such_name'"), errors[0]
    assert errors[1].startswith(f"{page}:7: AttributeError"), errors[1]
    assert errors[2].startswith(f"{page}:10: ModuleNotFoundError"), errors[2]
    assert errors[3] == f"{page}:15: ZeroDivisionError: division by zero"
    assert errors[4] is None
    assert missing_prose_names(page) == ["online_distill.data.NoSuchThing", "online_distill.no_such_module"]
