"""Run configuration: typed, frozen dataclasses (config_file.py reads them from YAML and --set).

A config is unpacked here, at the edge, and everything downstream receives dataclasses.
Every check that can be made without a worker is made here, so bad input is refused on the
driver with a message that names the field and what it may be, before Ray starts anything.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import specs


class ConfigError(ValueError):
    """A config field is unknown or holds a value it may not hold, or a config file cannot be read.

    `field` is the dotted field the message is about (None when it is about no one field), so the
    CLI can say where that value came from (a line of the file, or a --set item)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name}: got {value!r}; allowed: {allowed}", field_name)


IN_PROCESS = ("auto", "always", "never")
TRACKERS = ("tensorboard", "mlflow", "wandb")
"""run.loggers: the experiment trackers of online_distill.rundir.trackers (a test keeps the two equal)."""
PADS = ("background", "zero", "edge", "reflect")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
LOGITS = ("dense", "topk", "sampled")
"""distill.logits: how teacher logits travel and are cached (online_distill.distill.sparse)."""
"""data.pad: what fills the border of a shifted image."""
"""run.in_process: where a cohort of one worker trains."""

DISTILL_MODES = ("born_again", "codistill", "dlb", "dml", "ema", "independent", "offline", "snapshot")
"""The teacher sources of online_distill.teachers.TEACHERS (a test keeps the two equal). Listed
here so the mode can be checked without importing torch, and config.py imports no registry."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion_mnist"
    """A name in online_distill.data.datasets.DATASETS, an import path `package.module:builder` (a
    function of this DataConfig returning data.Splits), or a builder passed to the Python API."""
    root: str = "~/.cache/online_distill/data"
    """Where datasets are looked for and downloaded to."""
    download: bool = True
    """Allow torchvision to download a dataset that is not found locally."""
    val_size: int = 5000
    """Examples held out of the training set for validation (model selection)."""
    train_subset: int | None = None
    """Use only this many training examples (after the validation split and exclude_classes);
    None: all. Which ones: the first of the split's order, or drawn with subset_seed."""
    subset_seed: int | None = None
    """null: train_subset takes the first examples of the split's order (fixed by split_seed);
    an integer: train_subset examples drawn at random with this seed, so a student's transfer
    set can be chosen apart from the teacher's data and from the run seed."""
    exclude_classes: tuple[int, ...] = ()
    """Classes whose training examples the run never sees (validation and test keep them, so
    how a distilled student does on a class it never saw can be measured: Hinton et al. 2015 s.3)."""
    test_subset: int | None = None
    """Evaluate on only this many test examples; None: all."""
    split_seed: int = 0
    """Seed of the train/validation split; fixed apart from the run seed so seeds share one split."""
    shift: int = 0
    """Jitter (images): translate each training image by up to this many pixels in x and y
    (uniform integers in [-shift, shift]); 0: off. Hinton et al. 2015 jitter by up to 2."""
    flip: bool = False
    """Random horizontal flip of training images (half of them), e.g. for CIFAR; not for digits."""
    pad: str = "background"
    """What fills the border a shift uncovers: 'background' (each image's own corner pixel: black
    for MNIST-like images), 'zero' (0 after normalisation: the dataset's mean grey), 'edge'
    (the nearest border pixel) or 'reflect'."""
    seq_len: int = 128
    """Token sequences (language-model corpora such as 'fortunes'): tokens per training sequence."""
    num_workers: int = 0
    """DataLoader workers, only for user datasets that are not in-memory tensors."""

    @property
    def augments(self) -> bool:
        """Whether training images are jittered or flipped (an example then never repeats)."""
        return self.shift > 0 or self.flip

    def check(self) -> None:
        if self.val_size < 0:
            _fail("data.val_size", self.val_size, "an integer >= 0")
        for name in ("train_subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and v < 1:
                _fail(f"data.{name}", v, "null or an integer >= 1")
        if any(c < 0 for c in self.exclude_classes) or len(set(self.exclude_classes)) != len(self.exclude_classes):
            _fail("data.exclude_classes", list(self.exclude_classes), "a list of distinct class indices >= 0")
        if self.shift < 0:
            _fail("data.shift", self.shift, "an integer >= 0 (pixels)")
        if self.pad not in PADS:
            _fail("data.pad", self.pad, ", ".join(repr(p) for p in PADS))
        if self.seq_len < 2:
            _fail("data.seq_len", self.seq_len, "an integer >= 2")
        if self.num_workers < 0:
            _fail("data.num_workers", self.num_workers, "an integer >= 0")


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 4.0
    """Softmax temperature T of the soft targets (T > 0). Evaluation always uses T = 1."""
    kd_weight: float = 0.5
    """Weight of the distillation term: ce_weight * CE + kd_weight * T^2 * KL."""
    ce_weight: float | None = None
    """Weight of the label term. null: 1 - kd_weight (Hinton's convex mix); 1.0 with kd_weight 1
    gives the online-distillation papers' CE + T^2 KL (DML, ONE, MCL-OKD)."""
    multi_teacher: str = "mean_kl"
    """With several teachers: 'mean_kl' averages the KLs (DML); 'mean_probs' distils from
    the teachers' mean distribution (an ensemble teacher)."""
    kd_warmup_epochs: float = 0.0
    """Ramp kd_weight linearly from 0 over this many epochs (0: full weight from the start)."""
    divergence: str = "forward_kl"
    """What the KD term measures between the softened distributions: 'forward_kl'
    KL(teacher || student) (Hinton's, mode-covering), 'reverse_kl' KL(student || teacher)
    (mode-seeking, MiniLLM), or 'jsd': GKD's generalized Jensen-Shannon divergence (jsd_beta)."""
    jsd_beta: float = 0.5
    """jsd: the mixture weight beta, as TRL's GKD defines it (0: forward KL, 1: reverse KL)."""

    def check(self) -> None:
        if not self.temperature > 0:
            _fail("loss.temperature", self.temperature, "a number > 0")
        if not 0.0 <= self.kd_weight <= 1.0:
            _fail("loss.kd_weight", self.kd_weight, "a number in [0, 1]")
        if self.ce_weight is not None and not self.ce_weight >= 0:
            _fail("loss.ce_weight", self.ce_weight, "null (1 - kd_weight) or a number >= 0")
        if self.multi_teacher not in ("mean_kl", "mean_probs"):
            _fail("loss.multi_teacher", self.multi_teacher, "'mean_kl' or 'mean_probs'")
        if self.kd_warmup_epochs < 0:
            _fail("loss.kd_warmup_epochs", self.kd_warmup_epochs, "a number >= 0")
        if self.divergence not in DIVERGENCES:
            _fail("loss.divergence", self.divergence, ", ".join(repr(d) for d in DIVERGENCES))
        if not 0.0 <= self.jsd_beta <= 1.0:
            _fail("loss.jsd_beta", self.jsd_beta, "a number in [0, 1]")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    """'sgd' (with Nesterov momentum) or 'adamw'."""
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    """'constant', 'cosine' (to 0 at the last epoch), 'step' (x0.1 at 50% and 75%),
    or 'cyclic' (cosine restarted every epochs/cycles epochs; used by snapshot distillation)."""
    warmup_epochs: float = 0.0
    """Linear LR warm-up from 0 over this many epochs."""
    cycles: int = 1
    """Number of cosine cycles for schedule 'cyclic'."""
    grad_clip: float | None = None
    """Clip each peer's gradient to this global L2 norm before its optimizer step; null: no
    clipping. High temperatures with an unregularized student can blow up without it."""

    def check(self) -> None:
        if self.name not in ("sgd", "adamw"):
            _fail("optim.name", self.name, "'sgd' or 'adamw'")
        if not self.lr > 0:
            _fail("optim.lr", self.lr, "a number > 0")
        if not 0 <= self.momentum < 1:
            _fail("optim.momentum", self.momentum, "a number in [0, 1)")
        if self.weight_decay < 0:
            _fail("optim.weight_decay", self.weight_decay, "a number >= 0")
        if self.schedule not in ("constant", "cosine", "step", "cyclic"):
            _fail("optim.schedule", self.schedule, "'constant', 'cosine', 'step' or 'cyclic'")
        if self.warmup_epochs < 0:
            _fail("optim.warmup_epochs", self.warmup_epochs, "a number >= 0")
        if self.cycles < 1:
            _fail("optim.cycles", self.cycles, "an integer >= 1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            _fail("optim.grad_clip", self.grad_clip, "null (no clipping) or a number > 0")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    """Per-peer batch size of each replica."""
    seed: int = 0
    """Seed of initialisation and batch order; peers get distinct inits from it."""
    log_every_s: float = 15.0
    """Print a progress line within an epoch at most this often (seconds)."""
    max_steps_per_epoch: int | None = None
    """Stop each epoch after this many steps (quick runs and benchmarks); None: full epoch."""

    def check(self) -> None:
        if self.epochs < 1:
            _fail("train.epochs", self.epochs, "an integer >= 1")
        if self.batch_size < 1:
            _fail("train.batch_size", self.batch_size, "an integer >= 1")
        if self.log_every_s <= 0:
            _fail("train.log_every_s", self.log_every_s, "a number > 0")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            _fail("train.max_steps_per_epoch", self.max_steps_per_epoch, "null or an integer >= 1")


ESTIMATORS = ("divergence", "policy_gradient")
"""onpolicy.estimator: how the KD term's gradient is taken on the student's own samples."""


@dataclass(frozen=True)
class OnPolicyConfig:
    """On-policy distillation of language models (GKD, MiniLLM): the student continues a prompt
    itself and the teacher scores every token it generated (training/onpolicy.py)."""

    lmbda: float = 0.0
    """GKD's lambda (TRL's name): the share of training sequences whose continuation the student
    generates from a prompt (a prefix of the data window) instead of taking it from the data.
    0: off-policy (teacher-forced) KD as before; 1: every sequence on-policy."""
    start_epochs: float = 0.0
    """The student learns off-policy (lmbda 0) for this many epochs first, then on-policy: GKD and
    Qwen3 start from a student already trained on data, since a student that writes noise gets
    little from the teacher's view of its noise (benchmarks/onpolicy, O1's search: 41% validation
    exact match on-policy from scratch against 89% after one off-policy epoch)."""
    prompt_len: int = 16
    """Tokens of a data window kept as the prompt of a generated sequence."""
    max_new_tokens: int | None = None
    """Tokens generated per prompt at most; null: up to the window's end (data.seq_len)."""
    temperature: float = 1.0
    """Temperature of the student's draws (0: greedy); the KD term's own is loss.temperature."""
    top_k: int = 0
    """Draw from the k most likely tokens only (0: every token)."""
    top_p: float = 1.0
    """Nucleus sampling (1: every token)."""
    mask_prompts: bool = False
    """Data rows too count only after their prompt (a task of prompts and answers, where the
    off-policy and the on-policy student then learn at the same positions); the student's own
    rows never count their prompt. Works with lmbda 0 too (the off-policy baseline)."""
    estimator: str = "divergence"
    """'divergence': backpropagate the divergence (loss.divergence) over the whole vocabulary, or
    over the teacher's top-k plus a tail bucket (distill.logits: topk), at every generated token.
    'policy_gradient': the sampled token's log-ratio log p_teacher - log p_student (stopped) as a
    per-token reward of a policy-gradient loss: a one-sample estimate of reverse KL's gradient
    (Thinking Machines' on-policy distillation; needs only the teacher's log-prob of the sampled
    token)."""
    eval_prompts: int | None = None
    """Validation prompts per epoch that each student continues, scored (val_gen_* metrics) and a
    few written to samples/; null: 32 when lmbda > 0, else none (an off-policy baseline sets it
    to be compared on the same measure)."""
    samples_to_keep: int = 4
    """Continuations written to the run directory each epoch (samples/epoch_NNNN.txt)."""

    @property
    def prompts_to_score(self) -> int:
        return self.eval_prompts if self.eval_prompts is not None else (32 if self.lmbda > 0 else 0)

    @property
    def on(self) -> bool:
        """The loop makes rollouts (some rows generated, or prompts masked on data rows)."""
        return self.lmbda > 0 or self.mask_prompts

    def check(self) -> None:
        if not 0.0 <= self.lmbda <= 1.0:
            _fail("onpolicy.lmbda", self.lmbda, "a number in [0, 1] (the share of sequences the student generates)")
        if self.prompt_len < 1:
            _fail("onpolicy.prompt_len", self.prompt_len, "an integer >= 1")
        if self.start_epochs < 0:
            _fail("onpolicy.start_epochs", self.start_epochs, "a number >= 0 (epochs of off-policy training first)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            _fail("onpolicy.max_new_tokens", self.max_new_tokens, "null or an integer >= 1")
        if self.temperature < 0:
            _fail("onpolicy.temperature", self.temperature, "a number >= 0 (0: greedy)")
        if self.top_k < 0:
            _fail("onpolicy.top_k", self.top_k, "an integer >= 0 (0: every token)")
        if not 0.0 < self.top_p <= 1.0:
            _fail("onpolicy.top_p", self.top_p, "a number in (0, 1]")
        if self.estimator not in ESTIMATORS:
            _fail("onpolicy.estimator", self.estimator, ", ".join(repr(e) for e in ESTIMATORS))
        if self.eval_prompts is not None and self.eval_prompts < 0:
            _fail("onpolicy.eval_prompts", self.eval_prompts, "null or an integer >= 0")
        if self.samples_to_keep < 0:
            _fail("onpolicy.samples_to_keep", self.samples_to_keep, "an integer >= 0")


@dataclass(frozen=True)
class DistillConfig:
    mode: str = "dml"
    """Where the teacher logits come from:
    'dml'         peers exchange logits every step (deep mutual learning);
    'independent' the same peers on the same batches with no exchange (DML's baseline);
    'codistill'   peers swap weights every sync_every steps and distil from stale copies;
    'ema', 'snapshot', 'dlb', 'born_again' self-distillation from the model's own past;
    'offline'     a frozen teacher (teacher_checkpoint) teaches each peer."""
    sync_every: int = 10
    """codistill: steps between weight exchanges."""
    burn_in_steps: int = 0
    """codistill: steps of plain CE training before the first exchange."""
    peer_data: str = "same"
    """Which examples the peers train on: 'same' (every peer sees the same batch at each step,
    as DML needs) or 'disjoint' (codistill only: each peer trains on its own shard of the
    training set, since codistillation exchanges no per-batch data)."""
    ema_decay: float = 0.999
    """ema: teacher = decay * teacher + (1 - decay) * student after every step."""
    ema_warmup_steps: int = 0
    """ema: before this many steps the decay is min(ema_decay, (1 + step) / (10 + step))."""
    generations: int = 2
    """born_again: number of generations trained one after another (>= 2)."""
    teacher_checkpoint: str | None = None
    """offline: a checkpoint directory of an earlier run (or a .pt state dict) of the teacher."""
    teacher_model: str | None = None
    """offline: the teacher's model name; None: read from the checkpoint's run config."""
    teacher_peer: int = 0
    """offline: which peer of the teacher run's checkpoint teaches."""
    teacher_ensemble: bool = False
    """offline: every peer of the teacher run's checkpoint teaches as one ensemble, the mean of
    their probabilities (a DML cohort's ensemble is usually stronger than any of its peers)."""
    logits: str = "dense"
    """The form teacher logits take between workers (DML), in a teacher cache and from a teacher
    service: 'dense' (every class), 'topk' (the logits_k most likely tokens plus the tail's mass as
    one bucket), or 'sampled' (logits_k tokens drawn from the teacher, importance-weighted: unbiased,
    forward KL only). What it costs and loses is measured per run (exchange bytes, logits_kl)."""
    logits_k: int = 8
    """topk / sampled: tokens kept per position."""
    logits_bits: int = 16
    """topk / sampled: bits per stored log-prob, 16 (float16) or 8 (one byte on a companded grid,
    online_distill.distill.sparse): at 8 a slot of a 256-token vocabulary costs 2 bytes instead of 3."""
    teacher_cache_dir: str | None = None
    """offline: a directory where the frozen teacher's logits (in the distill.logits form) are
    written once per training example, keyed by the teacher, the data and the form, and read by
    every later run and sweep trial, which then run the teacher zero times. null: no disk cache.
    Other modes leave it unused, like teacher_checkpoint: `--set distill.mode=independent` makes a
    KD config its own baseline."""
    teacher_service: bool = False
    """offline: run the frozen teacher in a pool of Ray actors with their own resources, started
    once per run or sweep and shared by every worker and trial (teachers/service.py)."""
    service_replicas: int = 1
    """teacher_service: actors in the pool."""
    service_cpus: float = 1.0
    """teacher_service: CPUs of each actor (and its torch threads)."""
    service_gpus: float = 0.0
    """teacher_service: GPUs of each actor (a share of one: several services on one GPU)."""
    service_precision: str = "fp32"
    """teacher_service: 'fp32' or 'bf16' for the teacher's forward pass."""
    cache_teacher: bool = False
    """offline, born_again: keep the frozen teacher's logits of each training example after
    its first forward pass, so later epochs skip the teacher (its output on an example never
    changes). Costs 4 x classes bytes per example; not with data.shift/flip (no example repeats)."""

    def check(self) -> None:
        if self.mode not in DISTILL_MODES:
            _fail("distill.mode", self.mode, ", ".join(repr(k) for k in DISTILL_MODES))
        if self.sync_every < 1:
            _fail("distill.sync_every", self.sync_every, "an integer >= 1")
        if self.burn_in_steps < 0:
            _fail("distill.burn_in_steps", self.burn_in_steps, "an integer >= 0")
        if self.peer_data not in ("same", "disjoint"):
            _fail("distill.peer_data", self.peer_data, "'same' or 'disjoint'")
        if self.peer_data == "disjoint" and self.mode != "codistill":
            _fail("distill.peer_data", self.peer_data, f"'same' with distill.mode={self.mode!r} "
                  "('disjoint' only with 'codistill': the other modes compare peers on one batch)")
        if not 0.0 <= self.ema_decay < 1.0:
            _fail("distill.ema_decay", self.ema_decay, "a number in [0, 1)")
        if self.ema_warmup_steps < 0:
            _fail("distill.ema_warmup_steps", self.ema_warmup_steps, "an integer >= 0")
        if self.generations < 1:
            _fail("distill.generations", self.generations, "an integer >= 1")
        if self.teacher_peer < 0:
            _fail("distill.teacher_peer", self.teacher_peer, "an integer >= 0")
        if self.teacher_ensemble and self.teacher_model is not None:
            _fail("distill.teacher_ensemble", True, "false with distill.teacher_model (an ensemble's models are "
                  "read from its run's config.yaml)")
        if self.logits not in LOGITS:
            _fail("distill.logits", self.logits, ", ".join(repr(v) for v in LOGITS))
        if self.logits_k < 1:
            _fail("distill.logits_k", self.logits_k, "an integer >= 1")
        if self.logits_bits not in (16, 8):
            _fail("distill.logits_bits", self.logits_bits, "16 (float16 log-probs) or 8 (one byte each)")
        if self.service_replicas < 1:
            _fail("distill.service_replicas", self.service_replicas, "an integer >= 1")
        if self.service_cpus < 0 or self.service_gpus < 0:
            _fail("distill.service_cpus" if self.service_cpus < 0 else "distill.service_gpus",
                  min(self.service_cpus, self.service_gpus), "a number >= 0")
        if self.service_precision not in ("fp32", "bf16"):
            _fail("distill.service_precision", self.service_precision, "'fp32' or 'bf16'")
        if self.mode == "offline" and not self.teacher_checkpoint:
            _fail("distill.teacher_checkpoint", self.teacher_checkpoint,
                  "a checkpoint path when distill.mode='offline'")


@dataclass(frozen=True)
class ScaleConfig:
    replicas: int = 1
    """Data-parallel replicas per peer. World size = len(models) / peers_per_worker * replicas."""
    peers_per_worker: int = 1
    """Peers trained in one worker (one process, one GPU): they see the same batch and read each
    other's logits from memory; only peers on other workers go through the exchange group. Must
    divide the number of peers. All peers in one worker is how a one-GPU machine holds a cohort."""
    use_gpu: bool = False
    """A GPU per worker (or a share of one: gpus_per_worker), NCCL between workers. Off: CPU, gloo."""
    gpus_per_worker: float = 1.0
    """GPUs each worker asks Ray for when use_gpu. Below 1 only for a cohort in a single worker
    (NCCL refuses two ranks on one GPU): several such cohorts, e.g. Tune trials, share a GPU."""
    cpus_per_worker: float = 1.0
    """CPUs each worker asks Ray for; also its torch thread count."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (autocast; the optimizer state stays fp32)."""
    channels_last: bool = True
    """Image models (examples of shape (C, H, W)) and their batches in channels-last memory: the
    layout oneDNN's CPU and cuDNN's mixed-precision convolutions run fastest on (online_distill.core.host).
    Changes speed and float rounding, never the model. Off for a model whose forward needs the
    default layout (one calling .view on an activation); means nothing for other inputs."""

    def check(self) -> None:
        if self.replicas < 1:
            _fail("scale.replicas", self.replicas, "an integer >= 1")
        if self.peers_per_worker < 1:
            _fail("scale.peers_per_worker", self.peers_per_worker, "an integer >= 1 that divides the number of peers")
        if not 0 < self.gpus_per_worker <= 1:
            _fail("scale.gpus_per_worker", self.gpus_per_worker, "a number in (0, 1]")
        if not self.cpus_per_worker > 0:
            _fail("scale.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        if self.precision not in ("fp32", "bf16"):
            _fail("scale.precision", self.precision, "'fp32' or 'bf16'")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    """Run directory name under storage_path; the same name resumes that run."""
    storage_path: str = "./runs"
    """Local directory, or any pyarrow filesystem URI (s3://, gs://) every node can reach."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run is given up."""
    checkpoints_to_keep: int = 2
    in_process: str = "auto"
    """Where `train` runs a cohort that fits one worker (one replica, every peer in it:
    scale.peers_per_worker = the number of peers). 'auto': in the calling process through Ray
    Train's local mode when no cluster is joined (no RAY_ADDRESS, no `ray start` on this
    machine), else a worker group. 'always': in the calling process. 'never': a Ray Train worker
    group, whose worker process of its own is restarted even after a crash (run/in_process.py
    says what an in-process run retries). Tune trials follow it too."""
    loggers: tuple[str, ...] = ()
    """Experiment trackers that get every epoch's per-peer and ensemble metrics, the config and
    the final table: 'tensorboard', 'mlflow', 'wandb' (offline unless W&B is logged in), e.g.
    [tensorboard, mlflow]. Install them with `pip install 'online_distill[trackers]'`."""
    compression_report: bool = True
    """After the run: compression.csv (each student's and teacher's size, parameters, CPU latency
    and test accuracy), printed under the final table. It runs every model on the CPU for a few
    seconds; false skips it (a sweep's trials, tests), and `online-distill report RUN
    --compression` makes it later from the run's last checkpoint."""
    fail_once_at_epoch: int | None = None
    """Chaos testing: the last rank raises once at this epoch of an attempt that started from
    scratch, to exercise recovery from the last checkpoint. None in real runs."""

    def check(self) -> None:
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            _fail("run.name", self.name, "a non-empty name without '/' or a leading '.'")
        if self.max_failures < -1:
            _fail("run.max_failures", self.max_failures, "-1 (retry forever) or an integer >= 0")
        if self.checkpoints_to_keep < 1:
            _fail("run.checkpoints_to_keep", self.checkpoints_to_keep, "an integer >= 1")
        if self.in_process not in IN_PROCESS:
            _fail("run.in_process", self.in_process, " or ".join(repr(v) for v in IN_PROCESS))
        bad = [v for v in self.loggers if v not in TRACKERS]
        if bad or len(set(self.loggers)) != len(self.loggers):
            _fail("run.loggers", list(self.loggers), f"a list of distinct names among {', '.join(TRACKERS)}")
        if self.loggers and "://" in self.storage_path:
            _fail("run.loggers", list(self.loggers), f"[] with run.storage_path={self.storage_path!r} (trackers write "
                  "local files: a local storage_path)")
        if self.fail_once_at_epoch is not None and self.fail_once_at_epoch < 1:
            _fail("run.fail_once_at_epoch", self.fail_once_at_epoch, "null or an epoch index >= 1 (after a checkpoint exists)")

    @property
    def storage(self) -> str:
        if "://" in self.storage_path:
            return self.storage_path
        return os.path.abspath(os.path.expanduser(self.storage_path))


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("small_cnn", "small_cnn")
    """One model per peer; peers may differ. A name in online_distill.models.builders.MODELS, an import
    path `package.module:builder`, either with keyword arguments: `mlp(hidden=[800, 800],
    dropout=0.5)` (online_distill.config.specs)."""
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    @property
    def num_peers(self) -> int:
        return len(self.models)

    @property
    def world_size(self) -> int:
        """Ray Train workers of the cohort: peers / peers_per_worker slots, times replicas."""
        return self.num_peers // self.scale.peers_per_worker * self.scale.replicas

    @property
    def in_one_process(self) -> bool:
        """A cohort of one worker that may train in its caller's process (Train's local mode):
        a Tune trial's always, `train`'s where it joins no cluster (run.in_process)."""
        return self.world_size == 1 and self.run.in_process != "never"

    @property
    def worker_resources(self) -> dict[str, float]:
        """What each Ray Train worker asks for."""
        return {"CPU": self.scale.cpus_per_worker, **({"GPU": self.scale.gpus_per_worker} if self.scale.use_gpu else {})}

    def check_fields(self) -> Config:
        """The checks that need no registry (types were checked on loading; ranges, choices and
        combinations here): pure Python, so the CLI refuses bad input before importing torch."""
        for section in (self.data, self.loss, self.optim, self.train, self.distill, self.scale, self.run, self.onpolicy):
            section.check()
        if not self.models:
            _fail("models", list(self.models), "a list of one model name per peer")
        for i, text in enumerate(self.models):
            try:
                specs.parse(text)
            except specs.SpecError as e:
                raise ConfigError(f"models[{i}]: {e}", f"models[{i}]") from None
        try:
            specs.parse(self.data.dataset)
        except specs.SpecError as e:
            raise ConfigError(f"data.dataset: {e}", "data.dataset") from None
        if self.distill.mode in ("dml", "codistill") and self.num_peers < 2:
            _fail("models", list(self.models), f"at least 2 peers for distill.mode={self.distill.mode!r}")
        if self.distill.cache_teacher and self.distill.mode not in ("offline", "born_again"):
            _fail("distill.cache_teacher", True, f"false with distill.mode={self.distill.mode!r} (only a frozen "
                  "teacher, 'offline' or 'born_again', gives the same logits for an example every epoch)")
        if self.distill.logits == "sampled" and self.loss.divergence != "forward_kl":
            _fail("loss.divergence", self.loss.divergence, "'forward_kl' with distill.logits='sampled' (sampled tokens "
                  "estimate the teacher's expectation; the other divergences need the student's whole distribution "
                  "against the teacher's: distill.logits 'dense' or 'topk')")
        if self.distill.teacher_cache_dir and self.data.augments:
            _fail("distill.teacher_cache_dir", self.distill.teacher_cache_dir, "null with data.shift or data.flip "
                  "(jittered examples never repeat)")
        if self.distill.cache_teacher and self.data.augments:
            _fail("distill.cache_teacher", True, "false with data.shift or data.flip (jittered examples never repeat)")
        self._check_layout()
        self._check_onpolicy()
        return self

    def _check_onpolicy(self) -> None:
        """What on-policy training combines with (its data is checked to be token sequences on the driver)."""
        op = self.onpolicy
        if not (op.on or op.prompts_to_score):
            return
        if op.prompt_len >= self.data.seq_len:
            _fail("onpolicy.prompt_len", op.prompt_len, f"fewer than data.seq_len={self.data.seq_len} tokens (room "
                  "to generate)")
        if op.lmbda == 0:
            return
        if self.distill.mode in ("codistill", "dlb", "born_again"):
            _fail("onpolicy.lmbda", op.lmbda, f"0 with distill.mode={self.distill.mode!r}; on-policy training "
                  "takes 'offline' (a frozen teacher), 'dml' (peers score each other's samples), 'ema', 'snapshot' "
                  "or 'independent'")
        if op.lmbda == 1.0 and (self.distill.teacher_cache_dir or self.distill.cache_teacher):
            field_name = "distill.teacher_cache_dir" if self.distill.teacher_cache_dir else "distill.cache_teacher"
            _fail(field_name, getattr(self.distill, field_name.split(".")[1]), "null/false with onpolicy.lmbda=1 "
                  "(a cache of the teacher on the data's examples would only miss: every sequence is the student's "
                  "own; with lmbda < 1 it serves the data part)")
        if op.estimator == "policy_gradient" and self.distill.logits == "sampled":
            _fail("onpolicy.estimator", op.estimator, "'divergence' with distill.logits='sampled' (the policy "
                  "gradient reads the teacher's log-prob of the student's token: distill.logits 'dense' or 'topk')")

    def _check_layout(self) -> None:
        """How peers are laid out over workers (and GPUs); what fits a cluster is checked in launch."""
        ppw, n = self.scale.peers_per_worker, self.num_peers
        if n % ppw:
            divisors = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
            _fail("scale.peers_per_worker", ppw, f"a divisor of the {n} peers: {divisors}")
        if ppw > 1 and self.distill.peer_data == "disjoint":
            _fail("scale.peers_per_worker", ppw, "1 with distill.peer_data='disjoint' (the peers of a worker train "
                  "on one batch; disjoint shards need one worker per peer)")
        if self.run.in_process == "always" and self.world_size > 1:
            _fail("run.in_process", "always", f"'auto' or 'never' for a cohort of {self.world_size} workers; one process "
                  f"holds a cohort with scale.peers_per_worker={n}, scale.replicas=1")
        if self.scale.gpus_per_worker < 1 and self.scale.use_gpu and self.world_size > 1:
            _fail("scale.gpus_per_worker", self.scale.gpus_per_worker,
                  f"1 for a cohort of {self.world_size} workers (NCCL refuses two ranks on one GPU); a share of a "
                  f"GPU only when one worker holds the whole cohort: scale.peers_per_worker={n}, scale.replicas=1")


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


REPLACED = {"data.augment": "use data.shift (pixels of jitter), data.flip and data.pad; the old `augment: true` "
                            "was shift: 4, flip: true, pad: zero"}
"""Fields that were replaced, and by what: a config written for an older version is told how to update."""


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML (or --set) value to the annotated type, or fail naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if origin is tuple:
        if isinstance(value, str):  # a comma-separated list; commas inside a spec's (...) stay
            value = specs.split(value)
        if not isinstance(value, (list, tuple)):
            _fail(path, value, "a list")
        return tuple(_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        _fail(path, value, "true or false")
    if annotation is int:
        if isinstance(value, bool):
            _fail(path, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        _fail(path, value, "an integer")
    if annotation is float:
        if isinstance(value, bool):
            _fail(path, value, "a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            _fail(path, value, "a number")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        _fail(path, value, "a string")
    return value


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build a Config from a nested mapping, refusing unknown keys with the list of valid ones."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    top_types = _section_types(Config)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section; valid: {', '.join(SECTIONS)}", str(key))
        annotation = top_types[key]
        if dataclasses.is_dataclass(annotation):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                _fail(key, value, f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(annotation))}")
            fields = _section_types(annotation)
            valid = [f.name for f in dataclasses.fields(annotation)]
            sub = {}
            for k, v in value.items():
                if k not in fields:
                    if f"{key}.{k}" in REPLACED:
                        raise ConfigError(f"{key}.{k}: no longer a field; {REPLACED[f'{key}.{k}']}", f"{key}.{k}")
                    raise ConfigError(f"{key}.{k}: unknown field; valid: {', '.join(valid)}", f"{key}.{k}")
                sub[k] = _coerce(f"{key}.{k}", v, fields[k])
            kwargs[key] = annotation(**sub)
        else:
            kwargs[key] = _coerce(key, value, annotation)
    return Config(**kwargs)


def to_dict(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["models"] = list(cfg.models)
    return d


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'loss': {'temperature': 3}} -> {'loss.temperature': 3}. Tuples become lists, so a config
    read back from YAML compares equal to the one that wrote it; lists and empty mappings stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """Return cfg with dotted fields replaced, e.g. {"loss.temperature": 4.0}."""
    raw = to_dict(cfg)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if parts[0] not in SECTIONS:
            raise ConfigError(f"{dotted}: unknown section {parts[0]!r}; valid: {', '.join(SECTIONS)}")
        if dataclasses.is_dataclass(_section_types(Config)[parts[0]]):
            if len(parts) != 2:
                raise ConfigError(f"{dotted}: expected section.field, e.g. loss.temperature")
            section = raw[parts[0]]
            if parts[1] not in section:
                raise ConfigError(f"{dotted}: unknown field; valid: {', '.join(section)}")
            section[parts[1]] = value
        else:
            if len(parts) != 1:
                raise ConfigError(f"{dotted}: {parts[0]} has no sub-fields")
            raw[parts[0]] = value
    return from_dict(raw)
