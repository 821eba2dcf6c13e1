"""A frozen teacher's life on the driver, behind one door: its weights copied into the run (or a
sweep's) directory once, its outputs filled into a disk cache before any worker starts, its
service of Ray actors started and stopped, and what the service did. run/ and sweep/ ask these
functions (through the teachers package's face) and never the files that implement them
(frozen.py, cache.py, service.py, weights.py).

    members = check_teacher(cfg, models, datasets, data)    # [(TeacherSource, state dict), ...]
    write_copy(run, members)                                 # runs/NAME/teacher.pt
    line = fill_cache(cfg, data, members)                    # distill.teacher_cache_dir
    names = start_service(cfg, data, members, copy_path)     # distill.teacher_service (Ray is up)
    ...; service_summary(names); stop_service(names)
"""
from __future__ import annotations

import io

from ..config.schema import Config
from ..distill.form import LogitForm
from ..rundir.layout import TEACHER, RunDir


def copy_bytes(members: list) -> bytes:
    """The teacher copy file: the teacher's weights with its model and source (each member's, for
    an ensemble). A run keeps it as rundir.TEACHER; a sweep's service reads one from the sweep's
    directory. `members`: (TeacherSource, state dict) of the teacher or each ensemble member."""
    import torch

    rows = [{"model": weights, "model_name": src.model_name, "source": src.path, "peer": src.peer}
            for src, weights in members]
    buf = io.BytesIO()
    torch.save({**rows[0], **({"members": rows} if len(rows) > 1 else {})}, buf)
    return buf.getvalue()


def write_copy(run: RunDir, members: list) -> None:
    """The frozen teacher, once per run: every checkpoint names it instead of storing it again,
    and a resumed run goes on with this copy even if its source has changed since."""
    run.write(TEACHER, copy_bytes(members))


def fill_cache(cfg: Config, data, members: list, models=None) -> str:
    """The frozen teacher's outputs for every training example, in the disk cache, before any
    worker starts; the line that says what it cost (the teacher's runs) and where it is."""
    from .frozen import fill_disk_cache

    computed, total = fill_disk_cache(cfg, data, members, models)
    where, form = cfg.distill.teacher_cache_dir, LogitForm.of(cfg).describe()
    if computed:
        return (f"teacher cache {where}: the teacher ran on {computed} of {total} training examples, once; this run "
                f"and every later one with the same teacher, data and logits ({form}) read them")
    return f"teacher cache {where}: all {total} training examples there: the teacher runs 0 times"


def start_service(cfg: Config, data, members: list, copy: str) -> list[str]:
    """The teacher's actor pool on the running Ray (one per teacher, data and form: a pool already
    running for the same is shared), its replicas reading the teacher from `copy` (copy_bytes'
    file). Returns the actors' names; refuses, on the driver, what the cluster cannot start."""
    from .cache import cache_key
    from .service import start

    return start(cfg, copy, data, cache_key(cfg, [(s.model_name, w) for s, w in members]))


def stop_service(names: list[str]) -> None:
    """End a run's or a sweep's own teacher service: its resources go back."""
    from .service import stop

    stop(names)


def service_summary(names: list[str]) -> dict[str, float]:
    """The teacher service's counters, summed over its replicas (service.TeacherReplica.stats)."""
    from .service import ServiceClient

    stats = ServiceClient(names).stats()
    keys = ("forwards", "requests", "rows", "batches", "bytes_out", "queue_s", "rss_bytes")
    out = {f"service/{k}": float(sum(s[k] for s in stats)) for k in keys}
    out["service/mean_queue_s"] = out["service/queue_s"] / max(1.0, out["service/requests"])
    return out


def copy_members(data: bytes | None) -> list[dict]:
    """The members (model_name, model weights, source, peer) of a teacher copy file's bytes; []
    for None (a run without a frozen teacher)."""
    from .weights import read_members

    return [] if data is None else read_members(data)
