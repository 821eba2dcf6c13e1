"""What a sweep prints: our lines only.

A header (trials, resources, where results and Tune's own log go), one line per trial event
(started, an epoch with its objective, stopped early, finished, failed with its reason, retried
from its checkpoint), each led by the trial's label, `[t03 T=4 kd=0.52 seed=1]`, a progress line
at most every `every_s` seconds (done / running / pending, the best so far, elapsed and left),
and the final table (sweep.results.describe). Tune's status tables, result dumps and hints go to
the sweep's log file (`quiet_tune`), and the trials' own epoch lines stay in their workers' logs.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time

from ray.tune import Callback

from ..rundir.layout import LOG


def quiet_tune(sweep_dir: str) -> str:
    """Send Tune's and Train's loggers to the sweep's log file instead of the terminal."""
    os.makedirs(sweep_dir, exist_ok=True) if "://" not in sweep_dir else None
    path = os.path.join(sweep_dir, LOG) if "://" not in sweep_dir else os.path.join(os.getcwd(), LOG)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for name in ("ray.tune", "ray.train", "ray.air"):
        log = logging.getLogger(name)
        for h in list(log.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                log.removeHandler(h)
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(logging.INFO)
    return path


def label(index: int, params: dict, keys: list[str]) -> str:
    """`t03 T=4 kd=0.52 seed=1`: the trial's number and the values the sweep searches."""
    short = {"loss.temperature": "T", "loss.kd_weight": "kd", "loss.ce_weight": "ce", "train.seed": "seed",
             "optim.lr": "lr", "distill.mode": "mode", "loss.divergence": "div"}
    parts = [f"t{index:02d}"]
    if params.get("baseline"):
        parts.append("baseline")
    for k in keys:
        if k in params and k != "baseline" and not (params.get("baseline") and k not in ("train.seed",)):
            v = params[k]
            parts.append(f"{short.get(k, k.split('.')[-1])}={v:.3g}" if isinstance(v, float) else
                         f"{short.get(k, k.split('.')[-1])}={v}")
    return " ".join(parts)


class SweepConsole(Callback):
    """Tune callback (runs in the driver) that prints the sweep's lines."""

    def __init__(self, trials: list[dict], keys: list[str], metric: str, epochs: int, n_at_once: int,
                 every_s: float = 30.0, out=None, mode: str = "max"):
        self.keys, self.metric, self.epochs, self.n_at_once, self.every_s = keys, metric, epochs, n_at_once, every_s
        self.sign = 1 if mode == "max" else -1
        self.points = [{k: v for k, v in t.items()} for t in trials]
        self.labels: dict[str, str] = {}
        self.t0, self.last_progress = time.monotonic(), time.monotonic()
        self.best: tuple[float, str] | None = None
        self.finished_s: list[float] = []
        self.out = out

    def _say(self, line: str) -> None:
        print(line, file=self.out or sys.stdout, flush=True)

    def _label(self, trial) -> str:
        if trial.trial_id not in self.labels:
            index = next((i for i, p in enumerate(self.points)
                          if all(_same(trial.config.get(k), v) for k, v in p.items())), len(self.labels))
            self.labels[trial.trial_id] = label(index, dict(trial.config), self.keys)
        return self.labels[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(f"[{self._label(trial)}] started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            if self.best is None or self.sign * value > self.sign * self.best[0]:
                self.best = (value, self._label(trial))
            self._say(f"[{self._label(trial)}] epoch {result.get('epoch', '?')}/{self.epochs}: {self.metric} {value:.4f}")
        self._progress(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        epoch = last.get("epoch", 0)
        self.finished_s.append(float(last.get("time_total_s", 0.0)))
        if epoch and epoch < self.epochs:
            self._say(f"[{self._label(trial)}] stopped early at epoch {epoch} by the scheduler")
        else:
            value = last.get(self.metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "?"
            self._say(f"[{self._label(trial)}] finished: {self.metric} {shown} ({last.get('time_total_s', 0):.0f} s)")
        self._progress(trials, force=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"[{self._label(trial)}] failed: {_reason(trial)}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        n, limit = trial.run_metadata.num_failures, trial.max_failures
        self._say(f"[{self._label(trial)}] failed ({_reason(trial)}); retrying from its last checkpoint "
                  f"(retry {n} of {'unlimited' if limit < 0 else limit})")

    def _progress(self, trials, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress < self.every_s:
            return
        self.last_progress = now
        status = [t.status for t in trials]
        done = sum(s in ("TERMINATED", "ERROR") for s in status)
        running = sum(s == "RUNNING" for s in status)
        pending = len(self.points) - done - running
        best = f"; best so far {self.best[0]:.4f} [{self.best[1]}]" if self.best else ""
        left = ""
        if self.finished_s and pending + running:
            per = sum(self.finished_s) / len(self.finished_s)
            left = f", about {_clock(per * (pending + running / 2) / max(1, self.n_at_once))} left"
        self._say(f"[sweep] {done}/{len(self.points)} done, {running} running, {pending} pending{best}; "
                  f"{_clock(now - self.t0)} elapsed{left}")


def _reason(trial) -> str:
    """The error's one line: our message for what a retry cannot fix, else the last error line."""
    path = trial.error_file
    if not path or not os.path.exists(path):
        return "unknown error"
    lines = [ln.strip() for ln in open(path, errors="replace") if ln.strip()]
    ours = [ln for ln in lines if any(k in ln for k in ("NonFiniteError", "LabelError", "StorageError", "UserCodeError",
                                                        "ConfigError"))]
    line = (ours or [ln for ln in lines if "Error" in ln.split(":")[0]] or lines or ["unknown error"])[-1]
    return line[:300]


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b
