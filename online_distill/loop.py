"""The one training loop, run by every Ray Train worker. Read it top to bottom.

Each worker holds one replica of one or more peers of the cohort (scale.peers_per_worker),
all on the same batch. Per step: every peer's forward, ask the teacher source for teacher
logits, then per peer the Hinton loss, backward, optimizer step; let the teacher update.
Per epoch: validate every peer and the ensemble, gather the numbers to rank 0, and report
them to Ray together with a checkpoint that every rank writes its own files into.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .config import Config
from .data import Batches, load_data
from .host import keep_freed_memory, memory_format
from .losses import distill_loss
from .metrics import format_epoch, merge_rank_stats
from .models import build_model
from .optim import kd_weight_at, make_optimizer, make_scheduler
from .teachers import TeacherContext, build_teacher
from .timing import Clock
from .topology import Topology, build_topology, train_shard


def train_loop_per_worker(config: dict) -> None:
    """Entry point of a Ray Train worker, or of Train's local mode (one worker, in the calling
    process: a Tune trial's). `config` carries the Config, user builders and, in local mode, the
    reporter to use (local mode keeps reports in memory only, and inside a Tune trial the
    ray.train context calls are Tune's to answer)."""
    cfg: Config = config["cfg"]
    builders = dict(model_builders=config.get("models"), dataset_builders=config.get("datasets"))
    if config.get("reporter") is not None:
        device = torch.device("cuda" if cfg.scale.use_gpu and torch.cuda.is_available() else "cpu")
        run(cfg, 0, device, **builders, reporter=config["reporter"], restore_from=config.get("resume_from"))
        return
    import ray.train
    import ray.train.torch

    _quiet_ray_train_logs()
    rank = ray.train.get_context().get_world_rank()
    run(cfg, rank, ray.train.torch.get_device(), **builders, reporter=_ray_report,
        # this run's own latest checkpoint (after a worker failure) wins over the one it started from
        restore_from=ray.train.get_checkpoint() or config.get("resume_from"))


def run(cfg: Config, rank: int, device: torch.device, *, model_builders=None, dataset_builders=None,
        reporter=None, restore_from=None) -> list[dict]:
    """Train this rank's peers for cfg.train.epochs. Returns rank 0's history (others: [])."""
    topo = build_topology(rank, cfg.num_peers, cfg.scale.replicas, cfg.scale.peers_per_worker)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for every step's activations (host.py)

    # --- data: identical batch order for all peers, sharded by replica only (unless codistilling
    # peers were given disjoint shards: distill.peer_data); images channels-last (scale.channels_last)
    data = load_data(cfg.data, dataset_builders)
    fmt = memory_format(data.sample, cfg.scale.channels_last)
    shard, num_shards = train_shard(rank, cfg.num_peers, cfg.scale.replicas, peers_per_worker=cfg.scale.peers_per_worker,
                                    disjoint_peers=cfg.distill.peer_data == "disjoint")
    train_batches = Batches(data.train, cfg.train.batch_size, device, seed=cfg.train.seed, shard=shard,
                            num_shards=num_shards, augment=cfg.data.augment, num_workers=cfg.data.num_workers,
                            max_batches=cfg.train.max_steps_per_epoch, memory_format=fmt)
    steps_per_epoch = len(train_batches)
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is larger than a replica's shard of the training set")

    def eval_batches(ds):
        return Batches(ds, 512, device, shard=topo.replica, num_shards=cfg.scale.replicas, shuffle=False,
                       drop_last=False, num_workers=cfg.data.num_workers, memory_format=fmt)

    # --- this rank's peers: distinct init per peer, identical across a peer's replicas and layouts
    def build_peer(p: int) -> nn.Module:
        torch.manual_seed(cfg.train.seed * 1000 + p)
        return build_model(cfg.models[p], data.sample, data.num_classes, model_builders, memory_format=fmt)

    def build_named(name: str) -> nn.Module:  # any model for this dataset (a frozen teacher's)
        return build_model(name, data.sample, data.num_classes, model_builders, memory_format=fmt)

    models = [build_peer(p).to(device) for p in topo.peers]
    train_models = [_data_parallel(m, topo, device) for m in models]
    opts = [make_optimizer(cfg.optim, m) for m in models]
    scheds = [make_scheduler(cfg.optim, o, steps_per_epoch, cfg.train.epochs) for o in opts]
    peers = list(zip(models, opts, scheds))
    teacher = build_teacher(TeacherContext(cfg, topo, device, build_peer, steps_per_epoch, build_named))
    autocast = _autocast(cfg, device)
    clock = Clock(device)  # CUDA events on a GPU, so timing never stalls the queue
    # one after another, or a thread per peer on CPU cores
    each_peer = PeerRunner(cfg, topo, models, device, overlap=not teacher.waits_for_updates)

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast():  # a context per call: autocast's state is per thread
            return model(x)

    def learn(j: int, z, z_teacher, y, opt, sched, kd_w: float) -> None:
        """The j-th peer's loss, backward and optimizer step; adds its (ce, kd, correct, samples)
        sums to its row of the epoch's `sums` (each peer writes its own row only)."""
        loss, parts = distill_loss(z, z_teacher, y, temperature=cfg.loss.temperature, kd_weight=kd_w,
                                   multi_teacher=cfg.loss.multi_teacher, ce_weight=cfg.loss.ce_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        sums[j] += torch.stack([parts["ce"] * len(y), parts["kd"] * len(y), (z.detach().argmax(1) == y).sum().float(),
                                torch.tensor(float(len(y)), device=y.device)])

    # --- resume: models, optimizers, schedules, teachers, RNG and the metrics so far
    start_epoch, history = 0, []
    if restore_from is not None:
        start_epoch, history = ckpt.restore(restore_from, topo, peers, teacher)
    elif cfg.run.fail_once_at_epoch is not None:
        _arm_chaos(cfg, rank)

    for epoch in range(start_epoch, cfg.train.epochs):
        train_batches.set_epoch(epoch)
        # per peer: ce, kd, correct, samples; summed on device, read once per epoch
        sums = torch.zeros(len(models), 4, device=device)
        marks, t_log = [], time.perf_counter()  # per-step clock marks, read once per epoch
        kd_w = kd_weight_at(cfg.loss, epoch)
        for i, (x, y) in enumerate(train_batches):
            t0 = clock.mark()
            step = epoch * steps_per_epoch + i
            kd_w = kd_weight_at(cfg.loss, epoch + i / steps_per_epoch)
            x, y = teacher.prepare_batch(x, y)  # as loaded, except for teachers that revisit samples (DLB)
            logits = each_peer.map(forward, train_models, [x] * len(models))  # every peer, on the same batch
            t1 = clock.mark()
            teacher_logits = teacher.logits(x, logits)
            t1_end = clock.mark()
            each_peer.update(learn, range(len(models)), logits, teacher_logits, [y] * len(models), opts, scheds,
                             [kd_w] * len(models))
            t2 = clock.mark()
            teacher.after_step(models, step)  # EMA updates, codistill swaps weights here: teacher time too
            t2_end = clock.mark()
            _chaos(cfg, rank, epoch, i)

            marks.append((t0, t1, t1_end, t2, t2_end, clock.mark()))
            if rank == 0 and time.perf_counter() - t_log > cfg.train.log_every_s:
                t_log = time.perf_counter()
                each_peer.wait()  # the sums so far
                ce, kd = (sums[:, k].sum().item() / sums[:, 3].sum().item() for k in (0, 1))
                print(f"  epoch {epoch + 1}/{cfg.train.epochs}  step {i + 1}/{steps_per_epoch}  "
                      f"ce {ce:.4f}  kd {kd:.4f}  (this epoch so far, mean over peers)", flush=True)
        each_peer.wait()  # every update of the epoch done: its sums, the models to evaluate
        step_times, exchange_s = clock.read(marks)  # on a GPU: the epoch's one synchronize

        # --- evaluate these peers and the cohort's ensemble; gather everything to rank 0
        last = epoch == cfg.train.epochs - 1
        evals = {"val": evaluate(models, eval_batches(data.val), topo, autocast)}
        if last:  # the test split is looked at once, at the end, never for model selection
            evals["test"] = evaluate(models, eval_batches(data.test), topo, autocast)
        stats = [{"peer": p, "replica": topo.replica, "model": cfg.models[p], "train": sums[j].tolist(),
                  "step_times": step_times, "exchange_s": exchange_s, "comm_bytes_per_step": teacher.comm_bytes_per_step,
                  "batch_size": cfg.train.batch_size, **{split: ev[j] for split, ev in evals.items()}}
                 for j, p in enumerate(topo.peers)]
        all_stats = _gather(stats, topo)
        metrics, row = {}, []
        if rank == 0:
            metrics, row = merge_rank_stats(all_stats, cfg, epoch, lr=scheds[0].get_last_lr()[0], kd_weight=kd_w,
                                           resumed_from_epoch=start_epoch)
            history.extend(row)
            print(format_epoch(metrics, cfg), flush=True)
        if reporter is not None:
            reporter(metrics, cfg, topo, epoch, peers, teacher, history)
    each_peer.close()
    return history if rank == 0 else []


class PeerRunner:
    """How a worker runs its peers' forward passes and optimizer steps: one after another, or,
    on a CPU with at least a core per peer, each peer in a thread of its own with its share of
    the cores as intra-op threads. torch releases the GIL inside its kernels, so threaded peers
    use the cores as separate processes would (small models leave intra-op parallelism idle),
    and each peer's arithmetic is the same as alone on its cores. Kept sequential on a GPU (one
    stream), with replicas (DDP's all-reduces must be issued in the same order on every rank) and
    for models that draw random numbers while training (dropout: threads would interleave their
    draws from the one generator, and a rerun would not repeat them).

    A peer's thread runs its work in order. With `overlap` (the teacher does not read the updated
    weights after the step: Teacher.waits_for_updates), `update` does not wait for the peers'
    optimizer steps: a peer that is done goes on to its next forward while another still updates,
    and the loop waits once per step, for every peer's logits, instead of twice (a wait is a
    barrier: the faster peer idles; benchmarks/packing/threads_vs_processes.py measures it)."""

    def __init__(self, cfg: Config, topo: Topology, models: list[nn.Module], device: torch.device, *,
                 overlap: bool = False):
        cpus, k = max(1, int(cfg.scale.cpus_per_worker)), len(models)
        self.threaded = (device.type == "cpu" and 1 < k <= cpus and topo.slot_group is None
                         and not any(isinstance(m, nn.modules.dropout._DropoutNd) for n in models for m in n.modules()))
        torch.set_num_threads(cpus // k if self.threaded else cpus)
        self.threads = [ThreadPoolExecutor(1, thread_name_prefix=f"peer{j}") for j in range(k)] if self.threaded else []
        self.overlap = overlap and self.threaded
        self.pending: list = []

    def map(self, fn, *args) -> list:
        """fn on each peer's arguments (peer j's in its thread); the results in peer order."""
        if not self.threads:
            return [fn(*a) for a in zip(*args)]
        futures = [t.submit(fn, *a) for t, a in zip(self.threads, zip(*args))]
        results = [f.result() for f in futures]
        self.wait()  # queued before these in the same threads, so done; an error in them is raised here
        return results

    def update(self, fn, *args) -> None:
        """fn (an optimizer step) on each peer's arguments: done when this returns, or, with
        overlap, queued in each peer's thread before its next forward."""
        if not self.overlap:
            self.map(fn, *args)
            return
        self.pending = [t.submit(fn, *a) for t, a in zip(self.threads, zip(*args))]

    def wait(self) -> None:
        """Every queued update done (its error, if any, raised here)."""
        pending, self.pending = self.pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        self.wait()
        for t in self.threads:
            t.shutdown()


@torch.no_grad()
def evaluate(models: list[nn.Module], batches: Batches, topo: Topology, autocast) -> list[dict]:
    """Per peer of this worker: its correct count and NLL sum on its shard, and the ensemble's
    (mean of all the cohort's probabilities: this worker's, and the others' all-gathered over
    the exchange group)."""
    for m in models:
        m.eval()
    logits, labels = [[] for _ in models], []
    for x, y in batches:
        with autocast():
            for out, m in zip(logits, models):
                out.append(m(x).float())
        labels.append(y)
    for m in models:
        m.train()
    z, y = torch.stack([torch.cat(zs) for zs in logits]), torch.cat(labels)  # (k, N, C)
    probs = F.softmax(z, dim=2)
    if topo.exchange_group is not None:
        gathered = [torch.empty_like(probs) for _ in range(topo.num_slots)]
        dist.all_gather(gathered, probs, group=topo.exchange_group)
        probs = torch.cat(gathered)
    ens = probs.mean(0)
    ens_correct = (ens.argmax(1) == y).sum().item()
    ens_nll = F.nll_loss(ens.clamp_min(1e-12).log(), y, reduction="sum").item()
    return [{"correct": (zp.argmax(1) == y).sum().item(), "nll": F.cross_entropy(zp, y, reduction="sum").item(),
             "n": len(y), "ens_correct": ens_correct, "ens_nll": ens_nll} for zp in z]


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report (with all metrics) at INFO from loggers named by file path,
    which RunConfig's LoggingConfig does not reach; our own epoch line says it better."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for module in (context, storage):
        logging.getLogger(module.__file__).setLevel(logging.WARNING)


def _data_parallel(model: nn.Module, topo: Topology, device: torch.device) -> nn.Module:
    """DDP over this peer's replicas only; peers are never averaged with each other."""
    if topo.slot_group is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, process_group=topo.slot_group)


def _autocast(cfg: Config, device: torch.device):
    """A factory of autocast contexts (bf16), or of no-op ones (fp32)."""
    if cfg.scale.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _gather(stats: list[dict], topo: Topology) -> list[dict]:
    """Every rank's per-peer stats, flattened (one dict per peer and replica)."""
    if not dist.is_initialized() or topo.world_size == 1:
        return stats
    out: list = [None] * topo.world_size
    dist.all_gather_object(out, stats)
    return [s for rank_stats in out for s in rank_stats]


def _ray_report(metrics, cfg, topo, epoch, peers, teacher, history) -> None:
    """Every rank writes its own files into one checkpoint and reports it (a barrier)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save(tmp, topo, epoch, peers, teacher, history, metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch + 1:04d}")


# --- chaos testing: lose a worker once, to prove recovery from the last checkpoint -------------

_CHAOS = {"armed": False}


def _arm_chaos(cfg: Config, rank: int) -> None:
    # Only an attempt that started from scratch is armed; the retry restores a checkpoint.
    _CHAOS["armed"] = rank == cfg.world_size - 1


def _chaos(cfg: Config, rank: int, epoch: int, step: int) -> None:
    if _CHAOS["armed"] and epoch == cfg.run.fail_once_at_epoch and step == 0:
        _CHAOS["armed"] = False
        raise RuntimeError(f"chaos: rank {rank} fails once at epoch {epoch} (run.fail_once_at_epoch)")
