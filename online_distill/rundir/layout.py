"""The run directory: the only module that knows the names on disk, and the way every file of a
run is written.

    runs/NAME/
      config.yaml              the resolved config (a rerun must match it to resume)
      .lock                    held by the run's driver for its life (RunLock)
      checkpoint_epoch_0003/   one per epoch, the newest run.checkpoints_to_keep kept:
        peer0.pt ...             a peer's model, optimizer, schedule and teacher state
        rng_rank0.pt ...         each rank's RNG state
        history.json             the metrics table so far (rank 0)
        metrics.json             the epoch's flat metrics (rank 0)
        predictions.pt           last epoch: every peer's validation and test logits (rank 0)
        manifest_rank0.json ...  each rank's last file: what it wrote, and the world size
      .saving-checkpoint_...   a checkpoint being written; renamed to its name when complete
      teacher.pt               a frozen teacher, copied in once per run (not per checkpoint)
      metrics.csv  metrics.parquet  final.csv  per_class.csv  curves.png  compression.csv
      predictions.pt           the last epoch's logits (from the last checkpoint)
      result.json              written last: the run finished
      run.log                  tracebacks and details the terminal leaves out
      trackers.json  tensorboard/  wandb/   experiment trackers (run.loggers)
      damaged-* incomplete-* superseded-*   moved aside on a rerun, never deleted
      gen0/ gen1/ ...          born-again generations, each a run directory of its own
      .train/                  Ray Train's own records of a worker group (we never read them)

Every write is to a temporary name then a rename (storage.py), and an OSError a retry cannot
fix is one StorageError line naming the path, the reason and the free space.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

from ..errors import RunLocked
from . import storage

CONFIG, RESULT, LOG, LOCK, LEASE = "config.yaml", "result.json", "run.log", ".lock", ".lease"
METRICS_CSV, METRICS_PARQUET, FINAL, CURVES = "metrics.csv", "metrics.parquet", "final.csv", "curves.png"
PER_CLASS, PREDICTIONS, COMPRESSION, GENERATIONS = "per_class.csv", "predictions.pt", "compression.csv", "generations.csv"
TEACHER = "teacher.pt"
SAMPLES = "samples"
"""Continuations the students wrote on validation prompts, one text file per epoch (on-policy runs)."""
TRACKERS = "trackers.json"
"""Tracker run ids (TensorBoard, MLflow, W&B), so a resumed run continues the same tracker runs."""
TB_DIR = "tensorboard"
"""TensorBoard's event files, inside the run directory."""
MLFLOW_DB, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"
"""MLflow's local store and artifacts, beside the run directories (one per storage_path: the runs
of one sweep are one MLflow experiment), unless MLFLOW_TRACKING_URI says where."""
RAY_TRAIN = ".train"
"""Where a worker group's Ray Train keeps its own records (RunConfig.name under this run directory)."""

CHECKPOINT_PREFIX = "checkpoint_epoch_"
SAVING = ".saving-"
DAMAGED, INCOMPLETE, SUPERSEDED = "damaged-", "incomplete-", "superseded-"
"""Prefixes of what a rerun moves aside. Not "checkpoint_...": the newest checkpoint_* of a run is
found by name (export, a frozen teacher, report)."""

# inside a checkpoint directory
HISTORY, EPOCH_METRICS = "history.json", "metrics.json"
_PEER = re.compile(r"^peer(\d+)\.pt$")
_RNG = re.compile(r"^rng_rank(\d+)\.pt$")
_MANIFEST = re.compile(r"^manifest_rank(\d+)\.json$")
_GENERATION = re.compile(r"^gen(\d+)$")


def peer_file(p: int) -> str:
    return f"peer{p}.pt"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def manifest_file(rank: int) -> str:
    return f"manifest_rank{rank}.json"


def peer_files(names) -> list[int]:
    """Peer indices of the peer{p}.pt names among `names`."""
    return sorted(int(m.group(1)) for n in names if (m := _PEER.match(n)))


def is_manifest(name: str) -> bool:
    return bool(_MANIFEST.match(name))


def is_rng_file(name: str) -> bool:
    return bool(_RNG.match(name))


def samples_file(epoch: int) -> str:
    """The samples written at the end of epoch `epoch` (0-based), inside the run directory."""
    return f"{SAMPLES}/epoch_{epoch + 1:04d}.txt"


def checkpoint_name(epoch: int) -> str:
    """The directory of the checkpoint saved after 0-based epoch `epoch`: checkpoint_epoch_0003."""
    return f"{CHECKPOINT_PREFIX}{epoch + 1:04d}"


def is_checkpoint(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX)


def generation_name(g: int) -> str:
    return f"gen{g}"


class RunDir:
    """A run directory (local path or URI). Paths of its files, and the writes to them."""

    def __init__(self, path: str):
        self.path = storage.absolute(os.fspath(path))

    @classmethod
    def of(cls, cfg) -> RunDir:
        return cls(storage.join(cfg.run.storage, cfg.run.name))

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def __str__(self) -> str:
        return self.path

    def file(self, *names: str) -> str:
        return storage.join(self.path, *names)

    def exists(self, *names: str) -> bool:
        return storage.exists(self.file(*names))

    # --- whole files ------------------------------------------------------------------------

    def read_text(self, name: str) -> str | None:
        return storage.read_text(self.file(name))

    def read_bytes(self, name: str) -> bytes | None:
        return storage.read_bytes(self.file(name))

    def write(self, name: str, data: bytes | str) -> str:
        path = self.file(name)
        storage.write_bytes(path, data.encode() if isinstance(data, str) else data)
        return path

    def append(self, name: str, text: str) -> str:
        """Add text at the end of a log file of the run (run.log)."""
        path = self.file(name)
        storage.append_text(path, text)
        return path

    def write_json(self, name: str, obj) -> str:
        return self.write(name, json.dumps(obj, indent=1))

    def read_json(self, name: str):
        text = self.read_text(name)
        return None if text is None else json.loads(text)

    @property
    def finished(self) -> bool:
        return self.exists(RESULT)

    def generation(self, g: int) -> RunDir:
        return RunDir(self.file(generation_name(g)))

    def generations(self) -> list[int]:
        return sorted(int(m.group(1)) for n in (storage.listing(self.path, files=False) or {})
                      if (m := _GENERATION.match(n)))

    # --- checkpoints ------------------------------------------------------------------------

    def checkpoints(self) -> list[str]:
        """Names of the checkpoint directories, oldest first (a name carries its epoch)."""
        return sorted(n for n in storage.listing(self.path, files=False) or {} if is_checkpoint(n))

    def latest(self) -> str | None:
        names = self.checkpoints()
        return self.file(names[-1]) if names else None

    def saving_dir(self, name: str) -> str:
        """Where a rank writes its files of checkpoint `name`. On a local disk (or NFS) a hidden
        `.saving-<name>` that commit() renames once every rank is done, so no reader ever takes a
        half-written checkpoint for one; an object store has no rename, so there the files go
        under the real name and the manifests tell a complete checkpoint from a cut-short one."""
        return self.file(name if storage.is_uri(self.path) else SAVING + name)

    def begin_checkpoint(self, name: str) -> str:
        """Rank 0, before any rank writes: clear what an earlier, crashed save of this name left."""
        where = self.saving_dir(name)
        if storage.exists(where):
            storage.delete_dir(where)
        storage.make_dir(where)
        return where

    def commit_checkpoint(self, name: str) -> str:
        """Rank 0, after every rank wrote its files: give the checkpoint its name."""
        final = self.file(name)
        if not storage.is_uri(self.path):
            if storage.exists(final):  # a checkpoint of this epoch from an attempt that is being redone
                storage.move(final, self.file(self._aside_name(name, SUPERSEDED)))
            os.rename(self.saving_dir(name), final)
        return final

    def prune(self, keep: int) -> list[str]:
        """Remove all but the newest `keep` checkpoints (never one moved aside)."""
        old = self.checkpoints()[:-keep]
        for name in old:
            storage.delete_dir(self.file(name))
        return old

    def clean_partial(self) -> list[str]:
        """Remove what an interrupted write left: `.saving-*` directories and `*.tmp-*` files."""
        removed = []
        for name in storage.listing(self.path, files=False) or {}:
            if name.startswith(SAVING):
                storage.delete_dir(self.file(name))
                removed.append(name)
        for name in storage.listing(self.path, files=True) or {}:
            if storage.TEMP_MARK in name:
                storage.delete_file(self.file(name))
                removed.append(name)
        return removed

    def move_aside(self, name: str, prefix: str) -> str:
        """Rename `name` to `<prefix><name>` (or `-2`, `-3`, ...); never deletes. Returns the new name."""
        new = self._aside_name(name, prefix)
        storage.move(self.file(name), self.file(new))
        return new

    def _aside_name(self, name: str, prefix: str) -> str:
        new, k = prefix + name, 2
        while self.exists(new):
            new, k = f"{prefix}{name}-{k}", k + 1
        return new

    def lock(self) -> RunLock:
        return RunLock(self)


def checkpoint_dir_of(path: str) -> str | None:
    """The checkpoint directory a path names: itself if it holds peer files, else the newest
    checkpoint of a run directory, else (a born-again run) its last generation's newest."""
    listing = {**(storage.listing(path, files=True) or {}), **(storage.listing(path, files=False) or {})}
    if peer_files(listing):
        return path
    run = RunDir(path)
    if run.checkpoints():
        return run.latest()
    gens = run.generations()
    return checkpoint_dir_of(run.generation(gens[-1]).path) if gens else None


def run_dir_of(checkpoint_dir: str) -> RunDir | None:
    """The run a checkpoint directory belongs to: the nearest directory, it or up to two levels
    up (a Tune trial keeps its checkpoints one level deeper), that holds a config.yaml."""
    d = checkpoint_dir
    for _ in range(3):
        if storage.exists(storage.join(d, CONFIG)):
            return RunDir(d)
        up = storage.parent(d)
        if up == d:
            break
        d = up
    return None


# --- the run's lock ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: float

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.time())

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"


class RunLock:
    """One live process per run directory. On a local disk (and NFS) an advisory lock on `.lock`
    (flock): the kernel releases it when the holder dies, however it dies. On an object store,
    where nothing can be locked, a lease file renewed by a heartbeat thread, taken over once it
    has not been renewed for LEASE_S. The holder's host and pid are written into the file, so a
    refusal can name them, and a lock left by a process that died says so when it is taken over."""

    LEASE_S = 60.0

    def __init__(self, run: RunDir):
        self.run = run
        self._fd: int | None = None
        self._stop: threading.Event | None = None
        self._found: tuple[bool, list[str]] | None = None
        """At acquire: whether the run directory was there, and the files it held."""
        self._made: list[str] = []
        """The directories taking the lock made (the run's, and parents that were not there), deepest first."""

    def acquire(self) -> str | None:
        """Take the lock or raise RunLocked (one line naming the holder). Returns a line to print
        when it took over a lock a dead process left, else None."""
        before = storage.listing(self.run.path, files=True)
        self._found = (before is not None, sorted(before or {}))
        self._made = [] if storage.is_uri(self.run.path) else _missing_dirs(self.run.path)
        storage.make_dir(self.run.path)
        if storage.is_uri(self.run.path):
            return self._acquire_lease()
        import fcntl

        path = self.run.file(LOCK)
        while True:
            storage.make_dir(self.run.path)  # again: a refused run's release may have just removed it
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_of(fd)
                os.close(fd)
                raise RunLocked(self._refusal(holder)) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # locked a file that a refused run's release removed meanwhile: lock the one there now
        left = _read_holder(os.pread(fd, 4096, 0))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(Holder.me().__dict__).encode(), 0)
        self._fd = fd
        if left is not None and not (left.pid == os.getpid() and left.host == socket.gethostname()):
            return f"run {self._name()!r}: taking over the lock left by {left.describe()}, which is no longer running"
        return None

    def holder(self) -> Holder | None:
        """Who holds the lock now (None: nobody), without taking it: what a dry run checks."""
        if storage.is_uri(self.run.path):
            lease = self._read_lease()
            return lease[0] if lease and lease[1] > time.time() else None
        import fcntl

        path = self.run.file(LOCK)
        if not os.path.exists(path):
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_of(fd) or Holder("?", -1, 0)
        finally:
            os.close(fd)  # closing drops a lock we took
        return None

    def refusal(self, holder: Holder) -> str:
        return self._refusal(holder)

    def release(self) -> None:
        """Let the run directory go. A run that wrote nothing there (refused after it took the
        lock) leaves nothing either: the lock file, and the directory, if taking the lock made them."""
        if self._fd is not None:
            import fcntl

            os.ftruncate(self._fd, 0)  # an empty lock file: released cleanly, nothing to take over
            if self._wrote_nothing():
                _remove(self.run.file(LOCK))  # while still locked: a taker checks it locked the file that is there
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            try:
                storage.delete_file(self.run.file(LEASE))
            except OSError:
                pass
        for made in self._made:  # the directories taking the lock made, while they are empty
            try:
                os.rmdir(made)
            except OSError:
                break
        self._found, self._made = None, []

    def _wrote_nothing(self) -> bool:
        """The run directory holds what it held before the lock was taken (and the lock file)."""
        if self._found is None or LOCK in self._found[1]:
            return False
        now = sorted(n for n in (storage.listing(self.run.path, files=True) or {}) if n != LOCK)
        dirs = storage.listing(self.run.path, files=False) or {}
        return now == self._found[1] and (self._found[0] or not dirs)

    def __enter__(self) -> RunLock:
        self.taken_over = self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # --- object stores: a lease ------------------------------------------------------------

    def _read_lease(self) -> tuple[Holder, float] | None:
        data = storage.read_bytes(self.run.file(LEASE))
        if not data:
            return None
        try:
            d = json.loads(data)
            return Holder(d["host"], int(d["pid"]), float(d["since"])), float(d["expires"])
        except (ValueError, KeyError, TypeError):
            return None

    def _write_lease(self, me: Holder) -> None:
        self.run.write(LEASE, json.dumps({**me.__dict__, "expires": time.time() + self.LEASE_S}))

    def _acquire_lease(self) -> str | None:
        lease, me = self._read_lease(), Holder.me()
        if lease is not None and lease[1] > time.time():
            raise RunLocked(self._refusal(lease[0]))
        self._write_lease(me)
        time.sleep(0.2)  # two takers at once: the last write wins, and the other sees it here
        now = self._read_lease()
        if now is None or (now[0].pid, now[0].host) != (me.pid, me.host):
            raise RunLocked(self._refusal(now[0] if now else Holder("?", -1, 0)))
        self._stop = threading.Event()
        stop = self._stop

        def renew() -> None:
            while not stop.wait(self.LEASE_S / 3):
                try:
                    self._write_lease(me)
                except Exception:  # noqa: BLE001 - a missed renewal is retried at the next beat
                    pass

        threading.Thread(target=renew, name="run-lease", daemon=True).start()
        if lease is not None:
            return f"run {self._name()!r}: taking over the lease left by {lease[0].describe()}, not renewed since"
        return None

    def _name(self) -> str:
        return storage.basename(self.run.path)

    def _refusal(self, holder: Holder | None) -> str:
        who = holder.describe() if holder is not None and holder.pid >= 0 else "another process"
        return (f"run.name: run {self._name()!r} is in use by {who} ({self.run.path}). Allowed: wait until it "
                f"ends, or another run.name (--set run.name={self._name()}-2)")


def _missing_dirs(path: str) -> list[str]:
    """`path` and its parents that do not exist, deepest first."""
    missing = []
    while path and not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _same_file(fd: int, path: str) -> bool:
    """Whether the open file is the one at `path` now (a released lock file may be removed)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _holder_of(fd: int) -> Holder | None:
    """The holder a locked file names; a holder that has just taken the lock writes its name a
    moment later, so an empty file is read again for up to half a second."""
    for _ in range(25):
        holder = _read_holder(os.pread(fd, 4096, 0))
        if holder is not None:
            return holder
        time.sleep(0.02)
    return None


def _read_holder(data: bytes) -> Holder | None:
    try:
        d = json.loads(data.decode() or "null")
        return Holder(d["host"], int(d["pid"]), float(d["since"])) if d else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
