"""The one training loop, run by every Ray Train worker. Read it top to bottom.

Each worker holds one replica of one or more peers of the cohort (scale.peers_per_worker),
all on the same batch. Per step: every peer's forward, ask the teacher source for teacher
logits, then per peer the Hinton loss (refused if it is not finite), backward, optimizer step;
let the teacher update. Per epoch: validate every peer and the ensemble, gather the numbers to
rank 0, and hand the epoch to the reporter, which writes the checkpoint every rank saves into.

A classifier's logits are (B, C) for labels (B,); a language model's are (B, L, V) for the next
token at each position (B, L), where label -100 marks padding that counts nowhere.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config.schema import Config
from ..core.host import keep_freed_memory, memory_format
from ..core.optim import kd_weight_at, make_optimizer, make_scheduler
from ..core.timing import Clock
from ..core.topology import Layout, Topology, layout_of
from ..data.datasets import BYTE_VOCAB, IGNORE_INDEX, Batches, Jitter, labels_of, load_data
from ..data.text import decode_text
from ..distill.losses import distill_loss
from ..errors import LabelError, NonFiniteError
from ..models.builders import build_model, constraints
from ..rundir.checkpoint import Epoch, find_resume_point, restore
from ..rundir.layout import RunDir, samples_file
from ..teachers import TeacherContext, build_teacher
from .blame import on_rank, user_code
from .metrics import format_epoch, merge_rank_stats
from .onpolicy import OnPolicy, Rollout, generation_metrics, seed_of


def train_loop_per_worker(config: dict) -> None:
    """Entry point of a Ray Train worker, or of Train's local mode (one worker, in the calling
    process). `config` carries the Config, user builders, the run directory every rank saves
    its checkpoints into, where to start from, and whom to tell of each epoch (reporting.py)."""
    from .reporting import CheckpointReporter

    cfg: Config = config["cfg"]
    local = config.get("local", False)
    if local:
        rank = 0
        device = torch.device("cuda" if cfg.scale.use_gpu and torch.cuda.is_available() else "cpu")
    else:
        import ray.train
        import ray.train.torch

        from ..core.ray_adapter import quiet_report_logs

        quiet_report_logs()
        rank, device = ray.train.get_context().get_world_rank(), ray.train.torch.get_device()
    run_dir = RunDir(config["run_dir"])
    # this attempt's own newest checkpoint (after a lost worker) wins over the one it started from
    own = find_resume_point(run_dir, cfg.num_peers, deep=False).checkpoint
    reporter = CheckpointReporter(run_dir, cfg, rank, notify=config.get("notify"), group=config.get("group"))
    try:
        run(cfg, rank, device, model_builders=config.get("models"), dataset_builders=config.get("datasets"),
            reporter=reporter, restore_from=own or config.get("resume_from"), verbose=config.get("verbose", True),
            data=config.get("data"), service=config.get("teacher_service"), layout=config.get("layout"))
    except BaseException as e:
        reporter.finish("interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise


def run(cfg: Config, rank: int, device: torch.device, *, model_builders=None, dataset_builders=None,
        reporter=None, restore_from: str | None = None, verbose: bool = True, data=None,
        service: list[str] | None = None, layout: Layout | None = None) -> list[dict]:
    """Train this rank's peers for cfg.train.epochs. Returns rank 0's history (others: []).
    `verbose`: rank 0 prints a line per epoch (and progress lines within long epochs). `data`:
    the dataset as the driver read it, when the loop runs in the driver's process (else read here).
    `layout`: the cohort's layout as the driver's plan worked it out (None: layout_of(cfg), the same)."""
    layout = layout or layout_of(cfg)
    topo = layout.build(rank)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for every step's activations (host.py)

    # --- data: identical batch order for all peers, sharded by replica only (unless codistilling
    # peers were given disjoint shards: distill.peer_data); images channels-last (scale.channels_last)
    if data is None:  # the driver's preflight read it; a worker may not see what the driver saw
        with user_code(f"the dataset builder {cfg.data.dataset!r}", f"{on_rank(rank)}, reading the data",
                       "a dataset builder that gives every worker what it gave the driver's preflight: files on a "
                       "path every node reaches, modules importable on every node"):
            data = load_data(cfg.data, dataset_builders)
    fmt = memory_format(data.sample, cfg.scale.channels_last)
    shard, num_shards = layout.shard(rank)
    train_batches = Batches(data.train, cfg.train.batch_size, device, seed=cfg.train.seed, shard=shard,
                            num_shards=num_shards, jitter=Jitter.of(cfg.data), num_workers=cfg.data.num_workers,
                            max_batches=cfg.train.max_steps_per_epoch, memory_format=fmt)
    steps_per_epoch = len(train_batches)
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is larger than a replica's shard of the training set")
    # labels the driver could not read up front (a user's Dataset) are checked batch by batch
    check_labels = labels_of(data.train) is None

    def eval_batches(ds):
        return Batches(ds, 64 if data.is_sequence else 512, device, shard=topo.replica, num_shards=cfg.scale.replicas,
                       shuffle=False, drop_last=False, num_workers=cfg.data.num_workers, memory_format=fmt)

    # --- this rank's peers: distinct init per peer, identical across a peer's replicas and layouts
    def build_peer(p: int) -> nn.Module:
        torch.manual_seed(cfg.train.seed * 1000 + p)
        return build_named(cfg.models[p])

    def build_named(name: str) -> nn.Module:  # any model for this dataset (a frozen teacher's)
        with user_code(f"the model builder {name!r}", f"{on_rank(rank)}, building the model",
                       "a model builder that builds on every worker what it built in the driver's preflight"):
            return build_model(name, data.sample, data.num_classes, model_builders, memory_format=fmt,
                               label_shape=data.label_shape)

    peers = [Peer.build(p, build_peer(p).to(device), cfg, topo, device, steps_per_epoch) for p in topo.peers]
    models = [peer.model for peer in peers]
    teacher = build_teacher(TeacherContext(cfg, topo, device, build_peer, steps_per_epoch, build_named,
                                           run_dir=getattr(reporter, "run_dir", None), service=service))
    autocast = _autocast(cfg, device)
    # one after another, or a thread per peer on CPU cores
    each_peer = PeerRunner(cfg, topo, models, device, overlap=not teacher.waits_for_updates)
    learner = Learner(cfg, topo, steps_per_epoch, autocast)
    onpolicy = OnPolicy(cfg, data.sample.shape[-1], steps_per_epoch) if cfg.onpolicy.on else None

    # --- resume: models, optimizers, schedules, teachers, RNG and the metrics so far
    start_epoch, history = 0, []
    if restore_from is not None:
        start_epoch, history = restore(restore_from, topo, [p.state for p in peers], teacher)
    elif cfg.run.fail_once_at_epoch is not None:
        _arm_chaos(cfg, rank)

    for epoch in range(start_epoch, cfg.train.epochs):
        train_batches.set_epoch(epoch)
        forwards_before = teacher.teacher_forwards  # examples the frozen teacher runs on this epoch
        step_times, exchange_s, kd_w, generate_s = _train_epoch(cfg, rank, epoch, train_batches, peers, teacher,
                                                                learner, each_peer, check_labels, data.num_classes,
                                                                verbose, onpolicy)
        _check_finite_weights(models, topo, cfg, epoch)  # no checkpoint ever holds a NaN

        # --- evaluate these peers and the cohort's ensemble; gather everything to rank 0
        last = epoch == cfg.train.epochs - 1
        timing = {"step_times": step_times, "exchange_s": exchange_s, "comm_bytes_per_step": teacher.comm_bytes_per_step,
                  "teacher_forwards": teacher.teacher_forwards - forwards_before, "generate_s": generate_s}
        all_stats, predictions = _evaluate_epoch(cfg, data, peers, teacher, topo, autocast, eval_batches, last, timing,
                                                 epoch, getattr(reporter, "run_dir", None))
        metrics, row = {}, []
        if rank == 0:
            metrics, row = merge_rank_stats(all_stats, cfg, epoch, lr=peers[0].sched.get_last_lr()[0], kd_weight=kd_w,
                                           resumed_from_epoch=start_epoch, sequence=data.is_sequence)
            history.extend(row)
            if verbose:
                print(format_epoch(metrics, cfg), flush=True)
        if reporter is not None:
            reporter(Epoch(epoch, metrics, history, topo, [p.state for p in peers], teacher, predictions, last))
    each_peer.close()
    return history if rank == 0 else []


def _evaluate_epoch(cfg: Config, data, peers: list[Peer], teacher, topo: Topology, autocast, eval_batches,
                    last: bool, timing: dict, epoch: int = 0, reporter_dir=None) -> tuple[list[dict], dict | None]:
    """Every peer's and the ensemble's validation numbers (and test, at the last epoch), what the
    logit form loses, and the epoch's training sums and timing, gathered from every rank: one
    dict per peer and replica; with them, at the last epoch, the test logits of every peer."""
    models = [p.model for p in peers]
    keep = last and not data.is_sequence  # the last epoch's logits, for per-class tables and analysis
    evals, outputs = {}, {}
    for split, ds in [("val", data.val)] + ([("test", data.test)] if last else []):
        # the test split is looked at once, at the end, never for model selection
        evals[split], outputs[split] = evaluate(models, eval_batches(ds), topo, autocast, keep_logits=keep,
                                                bytes_per_token=data.bytes_per_token)
    fidelity = _fidelity(teacher, models, eval_batches(data.val), autocast)  # what the logit form loses
    gen = _generations(cfg, data, peers, teacher, autocast, eval_batches, epoch)
    stats = [{"peer": peer.position, "replica": topo.replica, "model": cfg.models[peer.position],
              "train": peer.sums.tolist(), **timing, "teacher_forwards": timing["teacher_forwards"] if j == 0 else 0,
              "fidelity": fidelity, "batch_size": cfg.train.batch_size, "gen": gen[j][0] if gen else {},
              **{split: ev[j] for split, ev in evals.items()}}
             for j, peer in enumerate(peers)]
    if gen and reporter_dir is not None and topo.replica == 0:
        _write_samples(reporter_dir, cfg, data, epoch, [(peer.position, pairs) for peer, (_, pairs) in zip(peers, gen)],
                       rank=topo.rank)
    return _gather(stats, topo), (_gather_predictions(outputs, topo) if keep else None)


def _generations(cfg: Config, data, peers: list[Peer], teacher, autocast, eval_batches, epoch: int) -> list | None:
    """Language models (onpolicy.eval_prompts): per peer, what it writes on the first validation
    prompts (onpolicy.generation_metrics) and the (prompt, continuation) pairs; None otherwise."""
    op = cfg.onpolicy
    if not (data.is_sequence and op.prompts_to_score):
        return None
    x, _ = next(iter(eval_batches(data.val)))
    prompts = x[: op.prompts_to_score]
    sampling = OnPolicy(cfg, x.shape[1]).sampling
    return [generation_metrics(p.model, prompts, teacher.score, sampling, op.prompt_len, autocast=autocast,
                               seed=seed_of(cfg.train.seed, epoch, p.position, 99)) for p in peers]


def _write_samples(run_dir, cfg: Config, data, epoch: int, per_peer: list, rank: int) -> None:
    """A few continuations per peer into samples/epoch_NNNN.txt (one file per rank holding peers)."""
    lines = []
    for p, pairs in per_peer:
        for prompt, cont in pairs[: cfg.onpolicy.samples_to_keep]:
            text = (decode_text(prompt), decode_text(cont)) if data.num_classes == BYTE_VOCAB else \
                (str(prompt.tolist()), str(cont.tolist()))
            lines.append(f"--- peer {p} ({cfg.models[p]}), epoch {epoch + 1}\n{text[0]}[[{text[1]}]]\n")
    name = samples_file(epoch) if rank == 0 else samples_file(epoch).replace(".txt", f"_rank{rank}.txt")
    run_dir.write(name, "".join(lines))


@dataclass
class Peer:
    """One peer this worker trains: the model (and the DDP wrapper it trains through, over its
    replicas only), its optimizer, schedule and weight constraints (max-norm), and the epoch's
    sums of ce, kd, correct, counted (examples, or real tokens: the label's) and the KD term's
    counted positions (on-policy rows count there only), kept on the device."""

    position: int
    """Its place in the cohort (the peer index of cfg.models)."""
    model: nn.Module
    train_model: nn.Module
    opt: torch.optim.Optimizer
    sched: object
    constrain: list
    sums: torch.Tensor

    @classmethod
    def build(cls, position: int, model: nn.Module, cfg: Config, topo: Topology, device: torch.device,
              steps_per_epoch: int) -> Peer:
        opt = make_optimizer(cfg.optim, model)
        return cls(position, model, _data_parallel(model, topo, device), opt,
                   make_scheduler(cfg.optim, opt, steps_per_epoch, cfg.train.epochs), constraints(model),
                   torch.zeros(5, device=device))

    @property
    def state(self) -> tuple:
        """(model, optimizer, schedule): what a checkpoint saves and restores."""
        return self.model, self.opt, self.sched


@dataclass
class Batch:
    """What a peer learns from at one optimizer step (besides its logits and teacher target)."""

    y: torch.Tensor
    kd_weight: float
    epoch: int
    index: int
    """The step's index within its epoch."""
    rollout: Rollout | None = None
    """On-policy training: where the KD term counts and what the student drew (onpolicy.py)."""


class Learner:
    """A peer's forward pass, and its loss, backward and optimizer step against its teacher target."""

    def __init__(self, cfg: Config, topo: Topology, steps_per_epoch: int, autocast):
        self.cfg, self.topo, self.steps_per_epoch, self.autocast = cfg, topo, steps_per_epoch, autocast

    def forward(self, peer: Peer, x: torch.Tensor, b: Batch) -> torch.Tensor:
        with self.user_code("forward", peer, b, lambda: f"a forward that takes batches of shape {tuple(x.shape)} "
                            "and returns float logits (batch, num_classes), as it did in the driver's preflight"):
            with self.autocast():  # a context per call: autocast's state is per thread
                return peer.train_model(x)

    def rollout(self, onpolicy: OnPolicy, peer: Peer, x: torch.Tensor, b: Batch) -> Rollout:
        """The peer's batch of this step with its own continuations (onpolicy.py)."""
        with self.user_code("generation", peer, b, "a causal language model: token ids (B, L) to logits (B, L, V)"):
            return onpolicy.rollout(peer.model, x, b.y, b.epoch * self.steps_per_epoch + b.index, peer.position)

    def user_code(self, what: str, peer: Peer, b: Batch, allowed):
        """Around the user's model at one step: its errors a retry cannot fix name the peer and step."""
        return user_code(lambda: f"the {what} of peer {peer.position} ({self.cfg.models[peer.position]})",
                         lambda: f"{on_rank(self.topo.rank)}, epoch {b.epoch + 1}, step {b.index + 1} of "
                                 f"{self.steps_per_epoch}", allowed)

    def learn(self, peer: Peer, z, target, b: Batch) -> None:
        """Adds the step's (ce, kd, correct, counted) sums to the peer's own row. A loss or a
        gradient that is not finite ends the run here, before the optimizer takes it in."""
        cfg, r = self.cfg, b.rollout
        with self.user_code("loss", peer, b, lambda: f"logits (batch, num_classes) for labels of shape "
                            f"{tuple(b.y.shape)}, labels in [0, num_classes)"):
            loss, parts = distill_loss(z, target, b.y, temperature=cfg.loss.temperature, kd_weight=b.kd_weight,
                                       multi_teacher=cfg.loss.multi_teacher, ce_weight=cfg.loss.ce_weight,
                                       divergence=cfg.loss.divergence, jsd_beta=cfg.loss.jsd_beta,
                                       kd_mask=None if r is None else r.kd_mask,
                                       pg_tokens=None if r is None else r.pg_tokens,
                                       pg_mask=None if r is None else r.pg_mask)
        if not torch.isfinite(loss):
            raise NonFiniteError(self._non_finite("loss", peer, b, parts))
        peer.opt.zero_grad(set_to_none=True)
        with self.user_code("backward", peer, b, "a model whose forward keeps its graph intact (no in-place "
                            "change of a tensor the backward needs)"):
            loss.backward()
        if cfg.optim.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(peer.model.parameters(), cfg.optim.grad_clip)
            if not torch.isfinite(norm):
                raise NonFiniteError(self._non_finite("gradient norm", peer, b, parts))
        peer.opt.step()
        for c in peer.constrain:
            c()
        peer.sched.step()
        mask = b.y != IGNORE_INDEX
        counted = mask.sum()
        peer.sums += torch.stack([parts["ce"] * counted, parts["kd"] * parts["kd_tokens"],
                                  ((z.detach().argmax(-1) == b.y) & mask).sum().float(), counted.float(),
                                  parts["kd_tokens"]])

    def _non_finite(self, what: str, peer: Peer, b: Batch, parts: dict) -> str:
        return _non_finite(what, self.cfg, peer.position, b.epoch, b.index, self.steps_per_epoch, peer.sched, parts)


def _train_epoch(cfg: Config, rank: int, epoch: int, batches: Batches, peers: list[Peer], teacher, learner: Learner,
                 each_peer: PeerRunner, check_labels: bool, num_classes: int, verbose: bool,
                 onpolicy: OnPolicy | None = None) -> tuple[list[float], float, float, float]:
    """One epoch of every peer of this worker on the same batches. Returns the step times, the
    seconds spent in the teacher (exchange, frozen teacher, EMA updates), the last KD weight and
    the seconds spent generating (on-policy: each peer continues its prompts, onpolicy.py)."""
    steps = len(batches)
    clock = Clock(peers[0].sums.device)  # CUDA events on a GPU, so timing never stalls the queue
    marks, gen_marks, t_log = [], [], time.perf_counter()  # per-step clock marks, read once per epoch
    for p in peers:
        p.sums.zero_()
    kd_w = kd_weight_at(cfg.loss, epoch)
    for i, (x, y, x_next) in enumerate(lookahead(batches)):
        t0 = clock.mark()
        step = epoch * steps + i
        kd_w = kd_weight_at(cfg.loss, epoch + i / steps)
        if check_labels:
            _check_batch_labels(y, num_classes, cfg, epoch, i)
        x, y = teacher.prepare_batch(x, y)  # as loaded, except for teachers that revisit samples (DLB)
        if onpolicy is None:
            now = [Batch(y, kd_w, epoch, i)] * len(peers)
            logits = each_peer.map(learner.forward, peers, [x] * len(peers), now)  # every peer, on the same batch
            t1 = clock.mark()
            targets = teacher.logits(x, logits, step)  # each peer's teacher target, in the run's logit form
            if x_next is not None:
                teacher.prefetch(x_next, step + 1)  # a teacher served elsewhere starts on the next batch now
            t1_end = clock.mark()
        else:  # each peer continues a share of the prompts itself; its teachers score its own batch
            n = len(peers)
            rollouts = each_peer.map(learner.rollout, [onpolicy] * n, peers, [x] * n, [Batch(y, kd_w, epoch, i)] * n)
            gen_marks.append((t0, clock.mark()))
            now = [Batch(r.y, kd_w, epoch, i, r) for r in rollouts]
            logits = each_peer.map(learner.forward, peers, [r.x for r in rollouts], now)
            t1 = clock.mark()
            targets = teacher.logits_on([r.x for r in rollouts], [r.generated for r in rollouts], logits, step,
                                        partial(_score, learner, peers))
            t1_end = clock.mark()
        each_peer.update(learner.learn, peers, logits, targets, now)
        t2 = clock.mark()
        teacher.after_step([p.model for p in peers], step)  # EMA updates, codistill swaps weights: teacher time too
        t2_end = clock.mark()
        _chaos(cfg, rank, epoch, i)

        marks.append((t0, t1, t1_end, t2, t2_end, clock.mark()))
        if verbose and rank == 0 and time.perf_counter() - t_log > cfg.train.log_every_s:
            t_log = time.perf_counter()
            each_peer.wait()  # the sums so far
            sums = torch.stack([p.sums for p in peers]).sum(0).tolist()
            ce, kd = sums[0] / max(sums[3], 1), sums[1] / max(sums[4], 1)
            print(f"  epoch {epoch + 1}/{cfg.train.epochs}  step {i + 1}/{steps}  "
                  f"ce {ce:.4f}  kd {kd:.4f}  (this epoch so far, mean over peers)", flush=True)
    each_peer.wait()  # every update of the epoch done: its sums, the models to evaluate
    step_times, exchange_s = clock.read(marks)  # on a GPU: the epoch's one synchronize
    return step_times, exchange_s, kd_w, sum(clock.read(gen_marks)[0])


@torch.no_grad()
def _score(learner: Learner, peers: list[Peer], j: int, x: torch.Tensor) -> torch.Tensor:
    """The logits of this worker's j-th peer on x, without gradients: a peer scoring another
    peer's samples (on-policy mutual learning, teachers/peers.py)."""
    with learner.autocast():
        return peers[j].model(x).float()


@torch.no_grad()
def _fidelity(teacher, models: list[nn.Module], batches: Batches, autocast) -> dict[str, float]:
    """Teacher.fidelity on the first validation batch (nothing when teacher logits are dense)."""
    if teacher.form.dense:
        return {}
    x, _ = next(iter(batches))
    for m in models:
        m.eval()
    with autocast():
        z = [m(x).float() for m in models]
    for m in models:
        m.train()
    return teacher.fidelity(x, z)


def lookahead(batches):
    """(x, y, the next batch's x or None): the next batch is loaded before this one trains, so a
    teacher served elsewhere can start on it (Teacher.prefetch)."""
    it = iter(batches)
    current = next(it, None)
    while current is not None:
        following = next(it, None)
        yield current[0], current[1], (following[0] if following is not None else None)
        current = following


def _non_finite(what: str, cfg: Config, peer: int, epoch: int, step: int, steps: int, sched, parts: dict) -> str:
    """The one line a NaN or an infinity ends the run with: where, and the settings that matter."""
    lr = sched.get_last_lr()[0]
    ce, kd = (float(parts[k]) for k in ("ce", "kd"))
    return (f"non-finite {what} in peer {peer} ({cfg.models[peer]}) at epoch {epoch + 1}, step {step + 1} of {steps} "
            f"(ce {ce:.4g}, kd {kd:.4g}); settings: loss.temperature={cfg.loss.temperature:g}, "
            f"loss.kd_weight={cfg.loss.kd_weight:g}, loss.ce_weight={cfg.loss.ce_weight}, optim.lr={cfg.optim.lr:g} "
            f"(now {lr:.4g}), optim.grad_clip={cfg.optim.grad_clip}. Nothing was saved from this state. Allowed: a "
            f"lower optim.lr, optim.grad_clip (e.g. 5), or a lower loss.temperature")


def _check_finite_weights(models: list[nn.Module], topo: Topology, cfg: Config, epoch: int) -> None:
    """Before anything is saved: every weight finite (an infinite gradient the loss did not show)."""
    for p, m in zip(topo.peers, models):
        bad = [name for name, w in m.state_dict().items() if w.is_floating_point() and not torch.isfinite(w).all()]
        if bad:
            raise NonFiniteError(f"non-finite weights in peer {p} ({cfg.models[p]}) after epoch {epoch + 1}: "
                                 f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; settings: optim.lr={cfg.optim.lr:g}, "
                                 f"optim.grad_clip={cfg.optim.grad_clip}, loss.temperature={cfg.loss.temperature:g}. Nothing "
                                 "was saved from this state. Allowed: a lower optim.lr or optim.grad_clip")


def _check_batch_labels(y: torch.Tensor, num_classes: int, cfg: Config, epoch: int, step: int) -> None:
    real = y[y != IGNORE_INDEX]
    if len(real) and (int(real.min()) < 0 or int(real.max()) >= num_classes):
        raise LabelError(f"data.dataset: a training batch of {cfg.data.dataset!r} (epoch {epoch + 1}, step {step + 1}) "
                         f"has labels in [{int(real.min())}, {int(real.max())}], but the dataset says num_classes="
                         f"{num_classes}; allowed: class indices in [0, {num_classes - 1}] (its labels were not "
                         "readable up front: a Dataset without `targets`)")


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
def evaluate(models: list[nn.Module], batches: Batches, topo: Topology, autocast, *, keep_logits: bool = False,
             bytes_per_token: float | None = None) -> tuple[list[dict], dict | None]:
    """Per peer of this worker: its correct count and NLL sum on its shard, and the ensemble's
    (mean of all the cohort's probabilities: this worker's, and the others' all-gathered over
    the exchange group, batch by batch). Counts are over examples, or over real tokens for token
    sequences. With keep_logits, also this worker's logits with the examples' indices."""
    for m in models:
        m.eval()
    k = len(models)
    correct, nll = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    ens_correct, ens_nll, counted = 0.0, 0.0, 0
    kept, labels = [], []
    for x, y in batches:
        with autocast():
            z = torch.stack([_evaluated(m, x, p, topo) for m, p in zip(models, topo.peers)])  # (k, B, [L,] C)
        mask = y != IGNORE_INDEX
        counted += int(mask.sum())
        logp = F.log_softmax(z, dim=-1)
        picked = logp.gather(-1, y.clamp_min(0).unsqueeze(0).unsqueeze(-1).expand(k, *y.shape, 1)).squeeze(-1)
        nll -= (picked * mask).flatten(1).sum(1).double().cpu()
        correct += ((z.argmax(-1) == y) & mask).flatten(1).sum(1).double().cpu()
        probs = logp.exp()
        if topo.exchange_group is not None:
            gathered = [torch.empty_like(probs) for _ in range(topo.num_slots)]
            dist.all_gather(gathered, probs, group=topo.exchange_group)
            probs = torch.cat(gathered)
        ens = probs.mean(0)
        ens_correct += float(((ens.argmax(-1) == y) & mask).sum())
        ens_nll -= float((ens.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1).clamp_min(1e-12).log() * mask).sum())
        if keep_logits:
            kept.append(z.cpu())
            labels.append(y.cpu())
    for m in models:
        m.train()
    out = [{"correct": float(correct[j]), "nll": float(nll[j]), "n": counted, "ens_correct": ens_correct,
            "ens_nll": ens_nll, "bytes_per_token": bytes_per_token} for j in range(k)]
    logits = None
    if keep_logits:
        logits = {"index": batches.indices(), "labels": torch.cat(labels), "logits": torch.cat(kept, dim=1)}
    return out, logits


def _evaluated(model: nn.Module, x: torch.Tensor, peer: int, topo: Topology) -> torch.Tensor:
    with user_code(lambda: f"the forward of peer {peer} in evaluation (model.eval())",
                   lambda: f"{on_rank(topo.rank)}, evaluating",
                   lambda: f"a forward that takes batches of shape {tuple(x.shape)} in eval mode too"):
        return model(x).float()


def _gather_predictions(outputs: dict, topo: Topology) -> dict | None:
    """Rank 0: per split, every peer's logits over the whole split, in the split's order."""
    mine = {split: {"peers": list(topo.peers), **o} for split, o in outputs.items() if o is not None}
    parts = [mine]
    if dist.is_initialized() and topo.world_size > 1:
        parts = [None] * topo.world_size
        dist.all_gather_object(parts, mine)
    if topo.rank != 0:
        return None
    out = {}
    for split in mine:
        n = max(int(part[split]["index"].max()) + 1 for part in parts)
        labels = torch.empty(n, dtype=torch.long)
        logits: dict[int, torch.Tensor] = {}
        for part in parts:
            o = part[split]
            labels[o["index"]] = o["labels"]
            for j, p in enumerate(o["peers"]):
                logits.setdefault(p, torch.empty(n, o["logits"].shape[-1]))[o["index"]] = o["logits"][j]
        out[split] = {"labels": labels, "logits": dict(sorted(logits.items()))}
    return out


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


# --- chaos testing: lose a worker once, to prove recovery from the last checkpoint -------------

_CHAOS = {"armed": False}


def _arm_chaos(cfg: Config, rank: int) -> None:
    # Only an attempt that started from scratch is armed; the retry restores a checkpoint.
    _CHAOS["armed"] = rank == cfg.world_size - 1


def _chaos(cfg: Config, rank: int, epoch: int, step: int) -> None:
    if _CHAOS["armed"] and epoch == cfg.run.fail_once_at_epoch and step == 0:
        _CHAOS["armed"] = False
        raise RuntimeError(f"chaos: rank {rank} fails once at epoch {epoch} (run.fail_once_at_epoch)")
