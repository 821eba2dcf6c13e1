"""Before a rerun resumes a run: check on the driver that the checkpoint Ray Train will hand the
workers loads, and when it does not, make Ray resume from the newest one that does.

How Train V2 (ray 2.60) picks the checkpoint: the controller's CheckpointManager
(ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py) reads
`checkpoint_manager_snapshot.json` in the run directory (`_maybe_load_state_from_storage` ->
`_load_state`) and hands every worker its `latest_checkpoint_result` (`before_init_train_context`)
as `ray.train.get_checkpoint()`. The directories on disk play no part in the choice, except that
`_assert_checkpoints_exist` refuses a snapshot listing a directory that is gone. So a fallback
does both: it moves the damaged directory aside (kept, renamed) and rewrites the snapshot without
it, with the intact checkpoint as `latest_checkpoint_result`.
"""
from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import torch

from .. import storage
from ..checkpoint import MANIFEST
from ..config import Config, ConfigError

SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
# Prefixes for directories moved aside. Not "checkpoint_...": our tools (export, a frozen teacher,
# report) take the newest checkpoint_* directory of a run by name.
DAMAGED, INCOMPLETE = "damaged-", "incomplete-"


def verify(directory: str, num_peers: int) -> list[str]:
    """What is wrong with one checkpoint directory (local or a pyarrow URI), one line per file;
    [] when every file a resume reads loads. Required: `peer{p}.pt` for every p < num_peers and
    `history.json`. Every `rng_rank{r}.pt` present must load too; a missing one is tolerated
    (restore keeps fresh RNG state; the world size may change) unless a rank's manifest lists it.
    Files are read as a resume reads them: torch.load(weights_only=True), json."""
    sizes = _list(directory, files=True)
    if sizes is None:
        return ["the directory is missing"]
    problems: dict[str, str] = {}
    manifests = sorted(n for n in sizes if _is_manifest(n))
    for name in manifests:
        try:
            listed = json.loads(_read(directory, name))["files"]
        except Exception as e:  # noqa: BLE001 - whatever fails to read is damage
            problems[name] = f"unreadable ({_short(e)})"
            continue
        for f, size in listed.items():
            if f not in sizes:
                problems.setdefault(f, f"missing ({name} lists it)")
            elif sizes[f] != size:
                problems.setdefault(f, f"{sizes[f]} bytes where {name} says {size}"
                                         + (" (cut short)" if sizes[f] < size else ""))

    epochs = {}
    required = [f"peer{p}.pt" for p in range(num_peers)] + ["history.json"]
    rngs = sorted(n for n in sizes if n.startswith("rng_rank") and n.endswith(".pt"))
    for name in required + rngs:
        if name in problems:
            continue
        if name not in sizes:
            problems[name] = "missing"
            continue
        try:
            data = _read(directory, name)
            if name.endswith(".json"):
                epochs[name] = json.loads(data)["epoch"]
                continue
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if name.startswith("peer"):
                epochs[name] = state["epoch"]
        except Exception as e:  # noqa: BLE001 - a cut-short zip, a bad pickle, a missing key: all damage
            problems[name] = f"unreadable ({_short(e)})"
    if len(set(epochs.values())) > 1:  # two saves' files mixed in one directory
        problems["(all files)"] = "from different epochs: " + ", ".join(f"{n} {e}" for n, e in sorted(epochs.items()))
    return [f"{name}: {what}" for name, what in sorted(problems.items())]


@dataclass
class ResumePoint:
    """Where a rerun of a run directory resumes, and what stands in the way."""
    checkpoint: str | None = None  # the checkpoint directory it resumes from; None: from scratch
    damaged: dict[str, list[str]] = field(default_factory=dict)  # newer listed checkpoints that do not load
    gone: list[str] = field(default_factory=list)  # listed in Ray's snapshot, no longer on disk
    leftovers: list[str] = field(default_factory=list)  # newer checkpoint_* dirs Ray never registered
    snapshot: dict | None = None

    @property
    def needs_fallback(self) -> bool:
        return bool(self.damaged or self.gone or self.leftovers)

    @property
    def refused(self) -> bool:  # Ray listed checkpoints, and none of them loads
        return self.checkpoint is None and bool(self.damaged or self.gone)


def find_resume_point(run_dir: str, num_peers: int) -> ResumePoint:
    """Check the checkpoints Ray's snapshot lists, newest first, until one loads. Changes nothing."""
    text = storage.read_text(storage.join(run_dir, SNAPSHOT))
    if text is None:  # Ray starts from scratch
        return ResumePoint()
    try:
        snap = json.loads(text)
        results = snap["checkpoint_results"]
        names = [r["checkpoint_dir_name"] for r in results]
        order = [n for _, n in sorted(zip(snap["checkpoint_report_indices"], names), reverse=True)]
        latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"run.name: Ray's list of this run's checkpoints, {storage.join(run_dir, SNAPSHOT)}, is "
                          f"unreadable ({_short(e)}). Allowed: {_start_over(run_dir)}") from None
    point = ResumePoint(snapshot=snap)
    if latest is None:  # nothing reported yet: Ray starts from scratch
        return point
    on_disk = _list(run_dir, files=False) or {}
    point.gone = [n for n in names if n not in on_disk]
    if latest not in names:  # Ray keeps its latest among the listed ones; take no other view
        raise ConfigError(f"run.name: Ray's list of this run's checkpoints, {storage.join(run_dir, SNAPSHOT)}, names "
                          f"{latest} as the latest but does not list it. Allowed: {_start_over(run_dir)}")
    for name in [latest] + [n for n in order if n != latest]:  # Ray's choice first, then newest first
        if name in point.gone:
            continue
        problems = verify(storage.join(run_dir, name), num_peers)
        if not problems:
            point.checkpoint = name
            break
        point.damaged[name] = problems
    if point.checkpoint is not None:
        # a save that never finished leaves a directory Ray never listed; the rerun writes that
        # name again and would mix its files with the old ones
        point.leftovers = sorted(n for n in on_disk if n.startswith("checkpoint_") and n not in names
                                 and n > point.checkpoint)
    return point


def fall_back(run_dir: str, point: ResumePoint) -> str:
    """Move the damaged (and never registered) directories aside, rewrite Ray's snapshot so that
    Ray resumes from point.checkpoint, and return the one line that says so."""
    moved = {name: _move_aside(run_dir, name, DAMAGED) for name in point.damaged}
    moved_leftovers = {name: _move_aside(run_dir, name, INCOMPLETE) for name in point.leftovers}
    dropped = set(point.damaged) | set(point.gone)
    snap = dict(point.snapshot)
    keep = [i for i, r in enumerate(snap["checkpoint_results"]) if r["checkpoint_dir_name"] not in dropped]
    snap["checkpoint_results"] = [snap["checkpoint_results"][i] for i in keep]
    snap["checkpoint_report_indices"] = [snap["checkpoint_report_indices"][i] for i in keep]
    snap["latest_checkpoint_result"] = next(r for r in snap["checkpoint_results"]
                                            if r["checkpoint_dir_name"] == point.checkpoint)
    pending = list(zip(snap.get("pending_training_results", []), snap.get("pending_validation_specs", [])))
    pending = [(r, v) for r, v in pending if r["checkpoint_dir_name"] not in dropped]
    snap["pending_training_results"] = [r for r, _ in pending]
    snap["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in snap:
            snap[key] = [n for n in snap[key] if n not in dropped]
    storage.write_text(storage.join(run_dir, SNAPSHOT), json.dumps(snap))

    said = [f"{name} is damaged ({'; '.join(point.damaged[name])}), moved to {moved[name]}" for name in point.damaged]
    said += [f"{name} is gone from disk" for name in point.gone]
    said += [f"{name} was never completed, moved to {moved_leftovers[name]}" for name in point.leftovers]
    return f"resume: {'; '.join(said)}; resuming from {point.checkpoint} in {run_dir}"


def refusal(cfg: Config, run_dir: str, point: ResumePoint) -> str:
    said = [f"{name}: {'; '.join(problems)}" for name, problems in point.damaged.items()]
    said += [f"{name}: gone from disk" for name in point.gone]
    return (f"run.name: {cfg.run.name!r} cannot resume, no checkpoint in {run_dir} loads ({' | '.join(said)}). "
            f"Allowed: {_start_over(run_dir, cfg.run.name)}")


def check_resume(cfg: Config, run_dir: str) -> str | None:
    """On the driver, before fit(): refuse a run none of whose checkpoints loads (ConfigError), or
    fall back to the newest checkpoint that loads. Returns the line to print after a fallback."""
    point = find_resume_point(run_dir, cfg.num_peers)
    if point.refused:
        raise ConfigError(refusal(cfg, run_dir, point))
    return fall_back(run_dir, point) if point.needs_fallback else None


# --- small helpers over local paths and pyarrow URIs ---------------------------------------------

def _start_over(run_dir: str, name: str | None = None) -> str:
    new = f"--set run.name={name}-2" if name else "--set run.name=<a new name>"
    # moving it away comes first: it is also right for a born-again generation, whose name the user did not choose
    return f"move {run_dir} away and rerun the same command, or start over under a new run.name ({new})"


def _is_manifest(name: str) -> bool:
    prefix, suffix = MANIFEST.split("{rank}")
    return name.startswith(prefix) and name.endswith(suffix)


def _list(directory: str, *, files: bool) -> dict[str, int] | None:
    """Name -> size of the files (files=True) or name -> 0 of the directories in a directory;
    None when it does not exist."""
    fs, path = storage._resolve(directory)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    want = pafs.FileType.File if files else pafs.FileType.Directory
    return {i.base_name: (i.size or 0) for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == want}


def _read(directory: str, name: str) -> bytes:
    data = storage.read_bytes(storage.join(directory, name))
    if data is None:
        raise FileNotFoundError(name)
    return data


def _move_aside(run_dir: str, name: str, prefix: str) -> str:
    """Rename run_dir/name to run_dir/<prefix><name> (or <prefix><name>-2, ...); never deletes."""
    fs, base = storage._resolve(run_dir)
    join = posixpath.join if "://" in run_dir else storage.join
    new, k = prefix + name, 2
    while fs.get_file_info(join(base, new)).type != pafs.FileType.NotFound:
        new, k = f"{prefix}{name}-{k}", k + 1
    src, dst = join(base, name), join(base, new)
    try:
        fs.move(src, dst)
    except OSError:  # object stores cannot rename a directory: copy, then remove the original
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)
    return new


def _short(e: BaseException) -> str:
    first = str(e).strip().split("\n")[0].split(". ")[0][:120]  # torch's zip errors run on for lines
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
