"""Environment variables Ray reads, set (unless the user set them) before Ray needs them."""
from __future__ import annotations

import logging
import os
import sys

LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
"""Set (unless the user set them) before an embedded local Ray starts, so every Ray process
inherits them. One local node cannot be drained or preempted, so Train's preemption watcher
would watch nothing: one actor process less per run, and no error line about its restart
policy in every run's output. A cluster keeps Ray's defaults."""


def use_local_ray_env() -> None:
    from ..core.ray_adapter import quiet_token_notice

    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    quiet_token_notice()


OUR_LINES_ENV = {"RAY_DISABLE_WORKER_LOG_PREFIX": "1", "RAY_DEDUP_LOGS": "0"}
"""Set (unless the user set them) before Ray is imported: a run's terminal shows rank 0's epoch
lines as they are printed, without Ray's coloured "(RayTrainWorker pid=...)" prefix before each,
and every sweep trial's lines as that trial printed them (Ray would fold lines alike across
trials into one with a coloured "[repeated 2x across cluster]"). Ray reads both on import."""


def use_our_lines_env() -> None:
    if "ray" not in sys.modules:
        for key, value in OUR_LINES_ENV.items():
            os.environ.setdefault(key, value)


SWEEP_ENV = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0", "RAY_AIR_NEW_OUTPUT": "0"}
"""Set (unless the user set them) before a sweep starts. Tune snapshots the sweep's state each
time a trial has saved as many checkpoints as it keeps, and warns when that happens twice within
5 s: with trials that start at once and epochs of a second (packed cohorts, Train's local mode)
it happens every few seconds, as it should, and the warning would fill the terminal. Tune's newer
console output (its configuration box, result paths, a TensorBoard hint) is off: the sweep
prints its own lines (sweep/console.py) and Tune's go to the sweep's log file."""


def use_sweep_env() -> None:
    for key, value in SWEEP_ENV.items():
        os.environ.setdefault(key, value)


def cluster_address() -> str | None:
    """The Ray cluster a run would join: RAY_ADDRESS, or the address a `ray start` on this
    machine left behind (what ray.init() would join too); None: none, Ray would start locally."""
    from ..core.ray_adapter import read_ray_address

    return os.environ.get("RAY_ADDRESS") or read_ray_address()


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None, *, workers_print: bool = True) -> None:
    """Join the cluster in RAY_ADDRESS, or the one a `ray start` on this machine left its address
    for (on a head node; ray.init() would join it too, and refuses local resources then), or
    start an embedded local Ray with this machine's CPUs and GPUs. `workers_print=False` keeps
    the workers' own lines (every trial's epoch lines) out of this terminal."""
    use_our_lines_env()
    import ray

    if ray.is_initialized():
        return
    quiet = dict(logging_level=logging.WARNING, log_to_driver=workers_print)
    address = cluster_address()
    if address:
        ray.init(address=address, **quiet)
        return
    if num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count()
    use_local_ray_env()
    ray.init(num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, **quiet)
