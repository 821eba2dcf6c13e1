"""Where a rerun of a run directory resumes: the newest checkpoint in it that is complete and
loads, whoever wrote it (a Ray Train worker group, or a cohort trained in the driver's own
process: run/in_process.py). Checked on the driver, before anything starts.

- complete: every rank that saved into it left its manifest (checkpoint.write_manifest), and
  every file a manifest lists is there at that size. A checkpoint whose manifests do not say how
  many ranks saved into it (written before they did) counts as complete when Ray lists it.
- loads: every file a resume reads loads as the resume reads it (torch.load(weights_only=True)).

Newer checkpoint directories that fail are moved aside, never deleted, so the rerun can write
those names again: `damaged-...` (complete once) or `incomplete-...` (a save that never
finished). When none loads among checkpoints that were once complete, the rerun is refused.

Ray Train V2 resumes a run by itself from its own record, `checkpoint_manager_snapshot.json`:
the controller's CheckpointManager (ray/train/v2/_internal/execution/checkpoint/
checkpoint_manager.py, `_maybe_load_state_from_storage`) hands its `latest_checkpoint_result` to
every worker as `ray.train.get_checkpoint()`, refuses a record that lists a directory that is
gone (`_assert_checkpoints_exist`), and knows nothing of checkpoints written outside a worker
group. So a rerun sets that record aside (`superseded-checkpoint_manager_snapshot.json`) and
hands the loop the checkpoint chosen here (`resume_from`); Ray's new record covers this attempt
only, so a worker that fails in it is retried from this attempt's newest checkpoint, as before.
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
# Prefixes for what is moved aside. Not "checkpoint_...": our tools (export, a frozen teacher,
# report) take the newest checkpoint_* directory of a run by name.
DAMAGED, INCOMPLETE, SUPERSEDED = "damaged-", "incomplete-", "superseded-"


def verify(directory: str, num_peers: int, *, listed: bool = True) -> list[str]:
    """What is wrong with one checkpoint directory (local or a pyarrow URI), one line per file;
    [] when it is complete and every file a resume reads loads. Required: `peer{p}.pt` for every
    p < num_peers and `history.json`. Every `rng_rank{r}.pt` present must load too; a missing one
    is tolerated (restore keeps fresh RNG state; the world size may change) unless a rank's
    manifest lists it. `listed`: Ray's record lists it (what makes a checkpoint whose manifests
    do not give the world size complete)."""
    return [f"{name}: {what}" for name, what in sorted(_problems(directory, num_peers, listed)[0].items())]


def _problems(directory: str, num_peers: int, listed: bool) -> tuple[dict[str, str], bool]:
    """(file -> what is wrong with it, whether every rank finished saving)."""
    sizes = storage.listing(directory, files=True)
    if sizes is None:
        return {"(directory)": "missing"}, False
    problems: dict[str, str] = {}
    manifests = sorted(n for n in sizes if _is_manifest(n))
    worlds = set()
    for name in manifests:
        try:
            manifest = json.loads(_read(directory, name))
            listed_files = manifest["files"]
        except Exception as e:  # noqa: BLE001 - whatever fails to read is damage
            problems[name] = f"unreadable ({_short(e)})"
            continue
        if "world_size" in manifest:
            worlds.add(int(manifest["world_size"]))
        for f, size in listed_files.items():
            if f not in sizes:
                problems.setdefault(f, f"missing ({name} lists it)")
            elif sizes[f] != size:
                problems.setdefault(f, f"{sizes[f]} bytes where {name} says {size}"
                                         + (" (cut short)" if sizes[f] < size else ""))
    finished = listed
    if worlds:
        world = max(worlds)
        absent = [r for r in range(world) if MANIFEST.format(rank=r) not in sizes]
        for r in absent:
            problems[MANIFEST.format(rank=r)] = f"missing: rank {r} of the {world} saving into it never finished"
        finished = not absent
    elif not listed:
        problems["(manifests)"] = "none says how many ranks saved into it, and Ray's record does not list it"

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
    return problems, finished


@dataclass
class ResumePoint:
    """Where a rerun of a run directory resumes, and what stands in the way."""
    checkpoint: str | None = None  # the checkpoint directory it resumes from; None: from scratch
    damaged: dict[str, list[str]] = field(default_factory=dict)  # newer complete checkpoints that do not load
    incomplete: dict[str, list[str]] = field(default_factory=dict)  # newer saves that never finished
    snapshot: bool = False  # Ray's record of an earlier attempt is there

    @property
    def needs_fallback(self) -> bool:
        return bool(self.damaged or self.incomplete)

    @property
    def refused(self) -> bool:  # checkpoints were complete once, and none of them loads
        return self.checkpoint is None and bool(self.damaged)


def find_resume_point(run_dir: str, num_peers: int) -> ResumePoint:
    """Check the run's checkpoint directories, newest first, until one is complete and loads.
    Changes nothing."""
    listed = _listed_by_ray(run_dir)
    on_disk = storage.listing(run_dir, files=False) or {}
    point = ResumePoint(snapshot=listed is not None)
    # newest first: a checkpoint's name carries its epoch (checkpoint_epoch_0003)
    for name in sorted((n for n in on_disk if n.startswith("checkpoint_")), reverse=True):
        problems, finished = _problems(storage.join(run_dir, name), num_peers, name in (listed or ()))
        if not problems:
            point.checkpoint = name
            break
        (point.damaged if finished else point.incomplete)[name] = \
            [f"{n}: {what}" for n, what in sorted(problems.items())]
    return point


def _listed_by_ray(run_dir: str) -> set[str] | None:
    """The checkpoint directories Ray's record lists; None without a record."""
    path = storage.join(run_dir, SNAPSHOT)
    text = storage.read_text(path)
    if text is None:
        return None
    try:
        return {r["checkpoint_dir_name"] for r in json.loads(text)["checkpoint_results"]}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"run.name: Ray's list of this run's checkpoints, {path}, is unreadable ({_short(e)}). "
                          f"Allowed: {_start_over(run_dir)}") from None


def set_aside(run_dir: str, point: ResumePoint) -> str | None:
    """Move the newer damaged and incomplete directories aside and Ray's record of the earlier
    attempt with them; return the one line that says what was moved (None when nothing was)."""
    moved = {name: _move_aside(run_dir, name, DAMAGED) for name in point.damaged}
    moved_incomplete = {name: _move_aside(run_dir, name, INCOMPLETE) for name in point.incomplete}
    if point.snapshot:  # replaces an older one
        storage.move(storage.join(run_dir, SNAPSHOT), storage.join(run_dir, SUPERSEDED + SNAPSHOT))
    if not point.needs_fallback:
        return None
    said = [f"{name} is damaged ({'; '.join(point.damaged[name])}), moved to {moved[name]}" for name in point.damaged]
    said += [f"{name} was never completed, moved to {moved_incomplete[name]}" for name in point.incomplete]
    where = f"resuming from {point.checkpoint}" if point.checkpoint else "starting from scratch"
    return f"resume: {'; '.join(said)}; {where} in {run_dir}"


def refusal(cfg: Config, run_dir: str, point: ResumePoint) -> str:
    said = [f"{name}: {'; '.join(problems)}" for name, problems in {**point.damaged, **point.incomplete}.items()]
    return (f"run.name: {cfg.run.name!r} cannot resume, no checkpoint in {run_dir} loads ({' | '.join(said)}). "
            f"Allowed: {_start_over(run_dir, cfg.run.name)}")


def check_resume(cfg: Config, run_dir: str) -> tuple[str | None, str | None]:
    """On the driver, before anything starts: refuse a run none of whose checkpoints loads
    (ConfigError), else set aside what stands in the way. Returns the line to print (None when
    nothing was moved) and the checkpoint directory the run resumes from (None: from scratch)."""
    point = find_resume_point(run_dir, cfg.num_peers)
    if point.refused:
        raise ConfigError(refusal(cfg, run_dir, point))
    line = set_aside(run_dir, point)
    return line, (storage.join(run_dir, point.checkpoint) if point.checkpoint else None)


# --- small helpers over local paths and pyarrow URIs ---------------------------------------------

def _start_over(run_dir: str, name: str | None = None) -> str:
    new = f"--set run.name={name}-2" if name else "--set run.name=<a new name>"
    # moving it away comes first: it is also right for a born-again generation, whose name the user did not choose
    return f"move {run_dir} away and rerun the same command, or start over under a new run.name ({new})"


def _is_manifest(name: str) -> bool:
    prefix, suffix = MANIFEST.split("{rank}")
    return name.startswith(prefix) and name.endswith(suffix)


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
