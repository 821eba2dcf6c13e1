"""One frozen teacher for many students: a pool of Ray actors that every worker and sweep trial
calls (distill.teacher_service).

Without it, every worker and every Tune trial of an offline KD run holds its own copy of the
teacher and runs it on the same examples: 16 trials on one GPU hold 16 teachers. The service
holds the teacher once per replica, on resources of its own (distill.service_cpus / _gpus,
_precision), started by the driver of a run or of a whole sweep before any student starts.

- Batching: requests that arrive while the teacher is busy are run together in one forward
  pass (up to MAX_ROWS rows), whoever sent them.
- Once per example: without jitter an example's output never changes, so the service keeps it
  by the example's digest, and N trials on the same data cost the teacher one pass, not N.
- Prefetch: a student asks for the next batch's logits (FrozenTeacher.prefetch) while it trains
  on this one, so its step waits only for what the service has not finished yet.
- Failure: a lost actor is restarted by Ray (max_restarts) and the students' requests to it are
  retried (max_task_retries): a request is a pure function of the batch, so a retry is exact.
- Counters: forwards (examples the teacher ran on), requests, rows served, queue time and bytes
  sent back (`stats`), which the run and the bench report beside the students' step times.
"""
from __future__ import annotations

import asyncio
import os
import time

import ray
import torch
from torch import Tensor

from ..core.host import memory_format, to_format
from ..distill.form import LogitForm, example_digests

MAX_ROWS = 4096
"""Rows of one forward pass at most (requests are merged up to this)."""
NAMESPACE = "online_distill"


@ray.remote(max_restarts=-1, max_task_retries=-1)
class TeacherReplica:
    def __init__(self, copy: str, model_args: dict, form: LogitForm, precision: str, threads: int, keep: bool):
        """copy: the teacher copy file (lifecycle.write_copy) this replica reads its weights
        from, here and after every restart: nothing of the teacher goes through the object store."""

        from ..models.builders import build_model
        from ..rundir import storage
        from .weights import Ensemble, TeacherSource, load_into, read_members

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        members = read_members(storage.read_bytes(copy))
        # the students' layout (channels-last images): a conv teacher run on the other one is
        # about 2x slower on a CPU (and converts every batch)
        fmt = torch.channels_last if model_args["channels_last"] else torch.contiguous_format
        nets = []
        for m in members:
            net = build_model(m["model_name"], model_args["sample"], model_args["num_classes"],
                              label_shape=model_args["label_shape"], memory_format=fmt)
            load_into(net, m["model"], TeacherSource(m["source"], m["model_name"], m.get("peer")))
            nets.append(net.to(self.device).eval().requires_grad_(False))
        self.model = nets[0] if len(nets) == 1 else Ensemble(nets)
        self.fmt = fmt
        self.bf16 = precision == "bf16"
        self.form = form
        self.keep = keep
        self.kept: dict[bytes, object] = {}
        self.queue: list = []
        self.busy = False
        self.counters = {"forwards": 0, "requests": 0, "rows": 0, "batches": 0, "queue_s": 0.0, "bytes_out": 0,
                         "busy_s": 0.0, "started": time.time()}

    def ready(self) -> bool:
        return True

    async def logits(self, x: Tensor, step: int = 0, transient: list[int] | None = None):
        """The teacher's output for a batch as the run's form puts it on the wire (LogitForm.to_wire):
        dense float32 logits, or compact ids and log-probs; sampled draws seeded by example.
        `transient`: rows never kept (a student's own samples, which do not repeat)."""
        done = asyncio.get_running_loop().create_future()
        self.queue.append((x, step, done, time.perf_counter(), set(transient or ())))
        self.counters["requests"] += 1
        if not self.busy:
            self.busy = True
            try:
                while self.queue:
                    await asyncio.sleep(0)  # let requests that arrived meanwhile join this forward
                    self._serve()
            finally:
                self.busy = False
        return await done

    def _serve(self) -> None:
        take, rows = [], 0
        while self.queue and (not take or rows + len(self.queue[0][0]) <= MAX_ROWS):
            item = self.queue.pop(0)
            take.append(item)
            rows += len(item[0])
        t0 = time.perf_counter()
        transient, offset = set(), 0
        for x, _, _, arrived, rows_off in take:
            self.counters["queue_s"] += t0 - arrived
            transient |= {offset + r for r in rows_off}
            offset += len(x)
        xs = [item[0] for item in take]
        outs = self._outputs(torch.cat(xs), sizes=[len(x) for x in xs], transient=transient)
        self.counters["busy_s"] += time.perf_counter() - t0
        self.counters["batches"] += 1
        self.counters["rows"] += rows
        for (_, _, done, _, _), out in zip(take, outs):
            self.counters["bytes_out"] += self.form.nbytes(out)
            done.set_result(out)

    @torch.no_grad()
    def _outputs(self, x: Tensor, *, sizes: list[int], transient: set[int] = frozenset()) -> list:
        """Each request's output: the examples kept from before, the others through the teacher;
        transient rows are neither looked up nor kept."""
        keys = example_digests(x) if self.keep or self.form.kind == "sampled" else [None] * len(x)
        fresh = [i for i, k in enumerate(keys) if not self.keep or i in transient or k not in self.kept]
        rows: dict[int, object] = {}
        if fresh:
            xb = to_format(x[fresh].to(self.device), self.fmt)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                z = self.model(xb).float()
            self.counters["forwards"] += len(fresh)
            for j, i in enumerate(fresh):
                rows[i] = z[j].cpu()
                if self.keep and i not in transient:
                    self.kept[keys[i]] = rows[i]
        dense = [rows[i] if i in rows else self.kept[keys[i]] for i in range(len(x))]
        out, start = [], 0
        for size in sizes:
            z = torch.stack(dense[start:start + size])
            out.append(self.form.to_wire(self.form.output(z, digests=keys[start:start + size], teacher=0)))
            start += size
        return out

    def stats(self) -> dict:
        c = dict(self.counters)
        elapsed = max(1e-9, time.time() - c.pop("started"))
        c.update(rows_per_s=c["rows"] / elapsed, mean_queue_s=c["queue_s"] / max(1, c["requests"]),
                 param_bytes=sum(p.numel() * p.element_size() for p in self.model.parameters()),
                 rss_bytes=_resident_bytes(), pid=os.getpid())
        return c


def _resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def service_name(key: str, i: int) -> str:
    return f"teacher-{key}-{i}"


def start(cfg, copy: str, data, key: str) -> list[str]:
    """Start the pool (or find it running: one per key per Ray cluster) and wait until every
    replica has built its teacher, read from `copy` (a teacher copy file on the run's storage).
    Returns the actors' names. A replica that cannot start (no resources, a model that does not
    build) raises here, on the driver, before any student."""
    from ..config.schema import ConfigError

    d = cfg.distill
    model_args = {"sample": data.sample, "num_classes": data.num_classes, "label_shape": data.label_shape,
                  "channels_last": memory_format(data.sample, cfg.scale.channels_last) is torch.channels_last}
    form = LogitForm.of(cfg)
    free = ray.available_resources()
    running = [_running(service_name(key, i)) for i in range(d.service_replicas)]  # another run's pool is shared
    new = running.count(None)
    for kind, per in (("CPU", d.service_cpus), ("GPU", d.service_gpus)):
        if per * new > free.get(kind, 0.0) + 1e-9:
            raise ConfigError(f"distill.service_{kind.lower()}s: {new} new replica(s) of {per:g} {kind} need "
                              f"{per * new:g} {kind}, and the cluster has {free.get(kind, 0.0):g} free. "
                              f"Allowed: fewer distill.service_replicas or a smaller share", f"distill.service_{kind.lower()}s")
    names, handles = [], []
    for i, handle in enumerate(running):
        name = service_name(key, i)
        if handle is None:
            handle = TeacherReplica.options(name=name, namespace=NAMESPACE, num_cpus=d.service_cpus,
                                            num_gpus=d.service_gpus, lifetime=None).remote(
                copy, model_args, form, d.service_precision, int(max(1, d.service_cpus)), not cfg.data.augments)
        names.append(name)
        handles.append(handle)
        _HELD[name] = handle  # a named actor without a live handle is garbage-collected by Ray
    try:
        ray.get([h.ready.remote() for h in handles], timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        for h in handles:
            ray.kill(h)
        raise ConfigError(f"distill.teacher_service: the teacher's {d.service_replicas} replica(s) of "
                          f"{d.service_cpus:g} CPU, {d.service_gpus:g} GPU did not start within {START_TIMEOUT_S:.0f} s "
                          f"(the cluster has {free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU free). Allowed: "
                          "smaller distill.service_cpus / service_gpus / service_replicas", "distill.teacher_service") from None
    return names


def _running(name: str):
    """The live replica of that name, or None."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


START_TIMEOUT_S = 600.0
_HELD: dict = {}
"""The driver's handles of the services it started, held for as long as they serve."""


class ServiceClient:
    """A student's side: requests round-robin over the pool's replicas; a prefetched request is
    kept until the loop asks for that batch."""

    def __init__(self, names: list[str]):
        self.handles = [ray.get_actor(n, namespace=NAMESPACE) for n in names]
        self.next = 0
        self.pending: tuple[int, object] | None = None  # (step, ObjectRef)
        self.wait_s = 0.0

    def request(self, x: Tensor, step: int, transient: list[int] | None = None):
        handle = self.handles[self.next % len(self.handles)]
        self.next += 1
        return handle.logits.remote(x.detach().cpu(), step, transient)

    def prefetch(self, x: Tensor, step: int) -> None:
        self.pending = (step, self.request(x, step))

    def get(self, x: Tensor, step: int, transient: list[int] | None = None):
        """The output for batch x of step `step`: the prefetched one, or asked now. A batch with
        transient rows (on-policy: made after any prefetch could be) is always asked now."""
        if self.pending is not None and self.pending[0] == step and not transient:
            ref = self.pending[1]
        else:
            ref = self.request(x, step, transient)
        self.pending = None
        t0 = time.perf_counter()
        out = ray.get(ref)
        self.wait_s += time.perf_counter() - t0
        return out

    def stats(self) -> list[dict]:
        return ray.get([h.stats.remote() for h in self.handles])


def stop(names: list[str]) -> None:
    """End the pool's actors (a run's or a sweep's own service, when it ends)."""
    for name in names:
        _HELD.pop(name, None)
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # already gone
            pass
