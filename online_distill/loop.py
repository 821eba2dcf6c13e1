"""The one training loop, run by every Ray Train worker. Read it top to bottom.

Each worker is one (peer, replica) of the cohort. Per step: forward, ask the teacher source
for teacher logits, the Hinton loss, backward, optimizer step, let the teacher update.
Per epoch: validate every peer and the ensemble, gather the numbers to rank 0, and report
them to Ray together with a checkpoint that every rank writes its own files into.
"""
from __future__ import annotations

import contextlib
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .config import Config
from .data import Batches, load_data
from .losses import distill_loss
from .metrics import format_epoch, merge_rank_stats
from .models import build_model
from .optim import kd_weight_at, make_optimizer, make_scheduler
from .teachers import TeacherContext, build_teacher
from .timing import Clock
from .topology import Topology, build_topology, train_shard


def train_loop_per_worker(config: dict) -> None:
    """Entry point of a Ray Train worker. `config` carries the Config and user builders."""
    import ray.train
    import ray.train.torch

    cfg: Config = config["cfg"]
    _quiet_ray_train_logs()
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    run(cfg, rank, device, model_builders=config.get("models"), dataset_builders=config.get("datasets"),
        # this run's own latest checkpoint (after a worker failure) wins over the one it started from
        reporter=_ray_report, restore_from=ray.train.get_checkpoint() or config.get("resume_from"))


def run(cfg: Config, rank: int, device: torch.device, *, model_builders=None, dataset_builders=None,
        reporter=None, restore_from=None) -> list[dict]:
    """Train this rank's peer for cfg.train.epochs. Returns rank 0's history (others: [])."""
    topo = build_topology(rank, cfg.num_peers, cfg.scale.replicas)
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))

    # --- data: identical batch order for all peers, sharded by replica only (unless codistilling
    # peers were given disjoint shards: distill.peer_data)
    data = load_data(cfg.data, dataset_builders)
    shard, num_shards = train_shard(rank, cfg.num_peers, cfg.scale.replicas,
                                    disjoint_peers=cfg.distill.peer_data == "disjoint")
    train_batches = Batches(data.train, cfg.train.batch_size, device, seed=cfg.train.seed, shard=shard,
                            num_shards=num_shards, augment=cfg.data.augment, num_workers=cfg.data.num_workers,
                            max_batches=cfg.train.max_steps_per_epoch)
    steps_per_epoch = len(train_batches)
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is larger than a replica's shard of the training set")

    def eval_batches(ds):
        return Batches(ds, 512, device, shard=topo.replica, num_shards=cfg.scale.replicas, shuffle=False,
                       drop_last=False, num_workers=cfg.data.num_workers)

    # --- this rank's peer: distinct init per peer, identical across its replicas
    def build_peer(p: int) -> nn.Module:
        torch.manual_seed(cfg.train.seed * 1000 + p)
        return build_model(cfg.models[p], data.sample, data.num_classes, model_builders)

    def build_named(name: str) -> nn.Module:  # any model for this dataset (a frozen teacher's)
        return build_model(name, data.sample, data.num_classes, model_builders)

    model = build_peer(topo.peer).to(device)
    train_model = _data_parallel(model, topo, device)
    opt = make_optimizer(cfg.optim, model)
    sched = make_scheduler(cfg.optim, opt, steps_per_epoch, cfg.train.epochs)
    teacher = build_teacher(TeacherContext(cfg, topo, device, build_peer, steps_per_epoch, build_named))
    autocast = _autocast(cfg, device)
    clock = Clock(device)  # CUDA events on a GPU, so timing never stalls the queue

    # --- resume: models, optimizers, schedules, teachers, RNG and the metrics so far
    start_epoch, history = 0, []
    if restore_from is not None:
        start_epoch, history = ckpt.restore(restore_from, topo, model, opt, sched, teacher)
    elif cfg.run.fail_once_at_epoch is not None:
        _arm_chaos(cfg, rank)

    for epoch in range(start_epoch, cfg.train.epochs):
        train_batches.set_epoch(epoch)
        model.train()
        sums = torch.zeros(4, device=device)  # ce, kd, correct, samples: summed on device, read once per epoch
        marks, t_log = [], time.perf_counter()  # per-step clock marks, read once per epoch
        kd_w = kd_weight_at(cfg.loss, epoch)
        for i, (x, y) in enumerate(train_batches):
            t0 = clock.mark()
            step = epoch * steps_per_epoch + i
            kd_w = kd_weight_at(cfg.loss, epoch + i / steps_per_epoch)
            x, y = teacher.prepare_batch(x, y)  # as loaded, except for teachers that revisit samples (DLB)
            with autocast:
                logits = train_model(x)
            t1 = clock.mark()
            teacher_logits = teacher.logits(x, logits)
            t1_end = clock.mark()
            loss, parts = distill_loss(logits, teacher_logits, y, temperature=cfg.loss.temperature, kd_weight=kd_w,
                                       multi_teacher=cfg.loss.multi_teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            t2 = clock.mark()
            teacher.after_step(model, step)  # codistill swaps weights here: teacher time too
            t2_end = clock.mark()
            _chaos(cfg, rank, epoch, i)

            sums += torch.stack([parts["ce"] * len(y), parts["kd"] * len(y),
                                 (logits.detach().argmax(1) == y).sum().float(), torch.tensor(float(len(y)), device=device)])
            marks.append((t0, t1, t1_end, t2, t2_end, clock.mark()))
            if rank == 0 and time.perf_counter() - t_log > cfg.train.log_every_s:
                t_log = time.perf_counter()
                print(f"  epoch {epoch + 1}/{cfg.train.epochs}  step {i + 1}/{steps_per_epoch}  "
                      f"loss {loss.item():.4f}  ce {parts['ce'].item():.4f}  kd {parts['kd'].item():.4f}", flush=True)
        step_times, exchange_s = clock.read(marks)  # on a GPU: the epoch's one synchronize

        # --- evaluate this peer and the cohort's ensemble; gather everything to rank 0
        stats = {
            "peer": topo.peer, "replica": topo.replica, "model": cfg.models[topo.peer],
            "train": sums.tolist(), "step_times": step_times, "exchange_s": exchange_s,
            "comm_bytes_per_step": teacher.comm_bytes_per_step, "batch_size": cfg.train.batch_size,
            "val": evaluate(model, eval_batches(data.val), topo, autocast),
        }
        last = epoch == cfg.train.epochs - 1
        if last:  # the test split is looked at once, at the end, never for model selection
            stats["test"] = evaluate(model, eval_batches(data.test), topo, autocast)
        all_stats = _gather(stats, topo)
        metrics, row = {}, []
        if rank == 0:
            metrics, row = merge_rank_stats(all_stats, cfg, epoch, lr=sched.get_last_lr()[0], kd_weight=kd_w,
                                           resumed_from_epoch=start_epoch)
            history.extend(row)
            print(format_epoch(metrics, cfg), flush=True)
        if reporter is not None:
            reporter(metrics, cfg, topo, epoch, model, opt, sched, teacher, history)
    return history if rank == 0 else []


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, topo: Topology, autocast) -> dict:
    """This peer's correct count and NLL sum on its shard, and the ensemble's (mean of the
    peers' probabilities), computed from logits all-gathered over the exchange group."""
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        with autocast:
            logits.append(model(x).float())
        labels.append(y)
    model.train()
    z, y = torch.cat(logits), torch.cat(labels)
    out = {"correct": (z.argmax(1) == y).sum().item(), "nll": F.cross_entropy(z, y, reduction="sum").item(), "n": len(y)}
    probs = F.softmax(z, dim=1)
    if topo.exchange_group is not None:
        gathered = [torch.empty_like(probs) for _ in range(topo.num_peers)]
        dist.all_gather(gathered, probs, group=topo.exchange_group)
        probs = torch.stack(gathered).mean(0)
    out["ens_correct"] = (probs.argmax(1) == y).sum().item()
    out["ens_nll"] = F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum").item()
    return out


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report (with all metrics) at INFO from loggers named by file path,
    which RunConfig's LoggingConfig does not reach; our own epoch line says it better."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for module in (context, storage):
        logging.getLogger(module.__file__).setLevel(logging.WARNING)


def _data_parallel(model: nn.Module, topo: Topology, device: torch.device) -> nn.Module:
    """DDP over this peer's replicas only; peers are never averaged with each other."""
    if topo.peer_group is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, process_group=topo.peer_group)


def _autocast(cfg: Config, device: torch.device):
    if cfg.scale.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _gather(stats: dict, topo: Topology) -> list[dict]:
    if not dist.is_initialized() or topo.world_size == 1:
        return [stats]
    out: list = [None] * topo.world_size
    dist.all_gather_object(out, stats)
    return out


def _ray_report(metrics, cfg, topo, epoch, model, opt, sched, teacher, history) -> None:
    """Every rank writes its own files into one checkpoint and reports it (a barrier)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save(tmp, topo, epoch, model, opt, sched, teacher, history)
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
