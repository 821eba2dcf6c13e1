"""A sweep under faults: trial processes and whole worker nodes of a LocalCluster (cluster.py)
killed at seeded random times while `online-distill tune` runs, and what the faults cost.

    with three_nodes("/tmp/odx") as c:
        calm = run_sweep(c, write_sweep(tmp / "s.yaml", "calm", tmp / "sweeps"))
        rough = run_sweep(c, write_sweep(tmp / "r.yaml", "rough", tmp / "sweeps"),
                          chaos=Chaos(c, plan_faults(seed=0, processes=2, nodes=1, window_s=20)))
        assert final_numbers(calm.sweep_dir).equals(final_numbers(rough.sweep_dir))

A killed trial process is what a lost worker looks like to Tune; a killed node is SIGKILLed
whole (cluster.kill_node) and comes back a few seconds later as a new node with the same
resources, as a replaced machine would. Everything stays on this machine and inside the
cluster's own processes. Used by tests/test_cluster.py and benchmarks/chaos/sweep.py.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pandas as pd
from cluster import LocalCluster, NodeSpec

TRIAL_ACTOR = "ImplicitFunc"
"""The class of a Tune function trial's actor: the process a cohort trained in its trial runs in."""
EPOCH_LINE = re.compile(r"^\[[^\]]+\] epoch \d+/")
RETRY_LINE = "retrying from its last checkpoint"


def three_nodes(root: str, cpus: int = 1) -> LocalCluster:
    """A head and two worker nodes of `cpus` CPUs each, each named by a resource of its own
    ("node_head", "node_worker1", ...), so a node can be told from its resources."""
    return LocalCluster(root, head=NodeSpec(cpus, {"node_head": 1}), node_retries=5,
                        workers=[NodeSpec(cpus, {"node_worker1": 1}), NodeSpec(cpus, {"node_worker2": 1})])


def write_sweep(path, name: str, storage, *, temperatures=(1.0, 2.0, 4.0, 8.0), seeds=(0, 1), epochs: int = 3,
                train_subset: int = 1024, max_failures: int = 3, max_concurrent: int = 3) -> str:
    """A DML sweep of len(temperatures) x len(seeds) trials, each a cohort of two tiny CNNs
    packed in its trial's process (1 CPU). Returns the file's path."""
    text = f"""name: {name}
storage_path: {storage}
base:
  models: [tiny_cnn, tiny_cnn]
  data: {{dataset: synthetic, val_size: 300, train_subset: {train_subset}, test_subset: 300}}
  optim: {{lr: 0.05, schedule: constant}}
  train: {{epochs: {epochs}, batch_size: 64}}
  scale: {{cpus_per_worker: 1, peers_per_worker: 2}}
  run: {{max_failures: {max_failures}}}
space:
  loss.temperature: {{grid: {list(temperatures)}}}
seeds: {list(seeds)}
scheduler: {{name: none}}
max_concurrent: {max_concurrent}
"""
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@dataclass(frozen=True, order=True)
class Fault:
    at_s: float
    """Seconds after the sweep's first epoch line."""
    kind: str
    """'process' (a running trial's process) or 'node' (the worker node a running trial is on)."""


def plan_faults(seed: int, *, processes: int, nodes: int, window_s: float) -> list[Fault]:
    """The faults of one chaos run: their kinds, at times drawn uniformly over the window."""
    rng = random.Random(seed)
    kinds = ["process"] * processes + ["node"] * nodes
    return sorted(Fault(round(rng.uniform(0, window_s), 2), kind) for kind in kinds)


@dataclass
class Injected:
    at_s: float
    kind: str
    target: str
    down_s: float = 0.0
    """For a node: how long it was gone before a new one was alive."""


class Chaos:
    """Injects `faults` into `cluster` from a thread of its own, once armed (the sweep's first
    epoch). A fault waits for a running trial to hit (at most `wait_s`): the trial's process is
    SIGKILLed, or its node when that is a worker node (else a worker node at random), which comes
    back after `down_s`. Choices are drawn from `seed`."""

    def __init__(self, cluster: LocalCluster, faults: list[Fault], *, seed: int = 0, down_s: float = 3.0,
                 wait_s: float = 30.0):
        self.cluster, self.faults, self.down_s, self.wait_s = cluster, faults, down_s, wait_s
        self.rng = random.Random(seed)
        self.injected: list[Injected] = []
        self.errors: list[str] = []
        self.missed: list[Fault] = []
        """Faults that found no running trial to hit before the sweep ended."""
        self._armed, self._stop = threading.Event(), threading.Event()
        self._restarts: list[threading.Thread] = []
        self._down: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._thread.start()

    def arm(self) -> None:
        self._armed.set()

    def stop(self) -> None:
        self._stop.set()
        self._armed.set()
        self._thread.join(timeout=180)
        for back in self._restarts:
            back.join(timeout=180)

    def _run(self) -> None:
        self._armed.wait()
        t0 = time.monotonic()
        for fault in self.faults:
            if self._stop.wait(max(0.0, t0 + fault.at_s - time.monotonic())):
                return
            try:
                self._inject(fault, time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 - said in the results, not raised in a thread
                self.errors.append(f"{fault}: {type(e).__name__}: {e}")

    def _running_trials(self) -> list[dict]:
        deadline = time.monotonic() + self.wait_s
        while not self._stop.is_set():
            trials = [a for a in self.cluster.actors(TRIAL_ACTOR) if a.get("state") == "ALIVE" and a.get("pid")]
            if trials or time.monotonic() > deadline:
                return trials
            time.sleep(0.2)
        return []

    def _node_names(self) -> dict[str, str]:
        """node_id -> 'head', 'worker1', ... for the nodes alive now."""
        return {n["node_id"]: next((k[len("node_"):] for k in n["resources_total"] if k.startswith("node_")), "?")
                for n in self.cluster.alive_nodes()}

    def _inject(self, fault: Fault, at_s: float) -> None:
        trials = self._running_trials()
        if not trials:
            self.missed.append(fault)
            return
        if fault.kind == "process":
            trial = self.rng.choice(trials)
            pid = int(trial["pid"])
            if pid not in self.cluster.own_pids():  # never a process of anyone else's
                raise RuntimeError(f"pid {pid} is not a process of this cluster")
            os.kill(pid, signal.SIGKILL)
            self.injected.append(Injected(at_s, "process", f"pid {pid} on {self._node_names().get(trial['node_id'])}"))
            return
        names = {k: v for k, v in self._node_names().items() if v not in self._down}  # a lost node may still be listed
        on_workers = [names[t["node_id"]] for t in trials if names.get(t["node_id"], "head") != "head"]
        up = sorted(v for v in names.values() if v.startswith("worker"))
        if not up:
            return
        name = self.rng.choice(on_workers or up)
        self._down.add(name)
        self.cluster.kill_node(name)
        fault = Injected(at_s, "node", name)
        self.injected.append(fault)
        back = threading.Thread(target=self._bring_back, args=(fault, time.monotonic()), daemon=True)
        back.start()
        self._restarts.append(back)

    def _bring_back(self, fault: Injected, lost: float) -> None:
        """The lost node's replacement joins after down_s (the faults after it go on meanwhile)."""
        time.sleep(self.down_s)
        try:
            self.cluster.restart_node(fault.target)
            fault.down_s = round(time.monotonic() - lost, 1)
            self._down.discard(fault.target)
        except Exception as e:  # noqa: BLE001 - said in the results
            self.errors.append(f"restarting {fault.target}: {type(e).__name__}: {e}")


@dataclass
class SweepRun:
    rc: int
    lines: list[str]
    wall_s: float
    sweep_dir: str
    injected: list[Injected] = field(default_factory=list)
    training_s: float = 0.0
    """Seconds from the sweep's first epoch line to its end: the time trials are sure to be running in."""

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def retries(self) -> int:
        """Trial retries the sweep spent (Tune's, each from the trial's last checkpoint)."""
        return sum(RETRY_LINE in line for line in self.lines)


def run_sweep(cluster: LocalCluster, sweep_file: str, *, chaos: Chaos | None = None,
              timeout_s: float = 600.0) -> SweepRun:
    """`online-distill tune sweep_file` as a client of `cluster` (chaos armed at its first epoch line)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **cluster.client_env()}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "online_distill.cli", "tune", sweep_file], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.abspath(sweep_file)))
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    lines, first_epoch = [], None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if first_epoch is None and EPOCH_LINE.match(line):
                first_epoch = time.monotonic()
            if chaos is not None and EPOCH_LINE.match(line):
                chaos.arm()
        rc = proc.wait()
    finally:
        timer.cancel()
        if chaos is not None:
            chaos.stop()
    name = next(ln.split(": ", 1)[1] for ln in open(sweep_file) if ln.startswith("name: "))
    storage = next(ln.split(": ", 1)[1] for ln in open(sweep_file) if ln.startswith("storage_path: "))
    end = time.monotonic()
    return SweepRun(rc, lines, end - t0, os.path.join(storage.strip(), name.strip()),
                    list(chaos.injected) if chaos is not None else [], end - (first_epoch or end))


FINAL_COLUMNS = re.compile(r"^(objective_final|objective_best|best_epoch|epochs|complete|final_.*)$")


def final_numbers(sweep_dir: str) -> pd.DataFrame:
    """Every trial's final numbers from the sweep's trials.csv (its objective, best epoch, and
    the final validation and test accuracies), one row per trial, in the order of its settings."""
    trials = pd.read_csv(os.path.join(sweep_dir, "trials.csv"))
    keys = [c for c in trials.columns if c.startswith(("loss.", "optim.", "train.", "seed"))]
    values = [c for c in trials.columns if FINAL_COLUMNS.match(c)]
    return trials[keys + values].sort_values(keys).reset_index(drop=True)
