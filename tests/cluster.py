"""A real multi-node Ray cluster on one machine, with token authentication, that can be
stopped without touching any other Ray on the machine.

Each node is one `ray start --block` process in a process group of its own, under a temp dir
and on ports of its own. `ray stop` would stop every Ray session on the machine (other users'
and other tests' included), so stopping here means: SIGTERM to each node's `ray start`
(which shuts its node down), then SIGKILL to what is left of that node's process group, and
a check that no process still runs from our temp dir.

    with LocalCluster("/tmp/odc", head=NodeSpec(1, {"node_a": 1}), workers=[NodeSpec(1, {"node_b": 1})]) as c:
        subprocess.run(["online-distill", "train", "cfg.yaml"], env={**os.environ, **c.client_env()})

Used by the multi-node and job-submission tests, and handy to try a cluster recipe locally.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeSpec:
    num_cpus: int
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources, e.g. {"node_a": 1}: lets a test or a job name the node it lands on."""


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def generate_token() -> str:
    """A token like `ray get-auth-token --generate` makes, without writing ~/.ray/auth_token
    (which every local Ray session of this user reads)."""
    return secrets.token_hex(32)


class LocalCluster:
    def __init__(self, root: str, *, head: NodeSpec = NodeSpec(0), workers: list[NodeSpec],
                 token: str | None = None, object_store_mb: int = 100, node_retries: int = 3):
        """root: a short directory of ours (Ray's socket paths must stay under ~100 characters).
        head: NodeSpec(0) keeps training off the head (jobs' drivers still run there).
        token: None generates one; auth is always on (RAY_AUTH_MODE=token)."""
        self.root = os.path.abspath(root)
        self.head = head
        self.workers = list(workers)
        self.token = token or generate_token()
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.node_retries = node_retries
        self._procs: list[subprocess.Popen] = []
        self._named: dict[str, subprocess.Popen] = {}
        self._specs: dict[str, NodeSpec] = {}

    # --- addresses and environments -----------------------------------------------------------

    @property
    def address(self) -> str:
        """GCS address: what a driver's RAY_ADDRESS (or `ray start --address`) takes."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Jobs API and state API address: what `ray job submit --address` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """Environment of a client of this cluster: a driver, `ray job submit`, `ray list`."""
        return {"RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard_url,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                   # the nodes (and the jobs they run) use this interpreter's environment
                   PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
        return env

    # --- start and stop -------------------------------------------------------------------------

    def _start_node(self, name: str, spec: NodeSpec, head: bool) -> subprocess.Popen:
        node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics = free_ports(6)
        temp_dir = os.path.join(self.root, name)
        os.makedirs(temp_dir, exist_ok=True)
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", f"--num-cpus={spec.num_cpus}",
               "--num-gpus=0", f"--resources={json.dumps(spec.resources)}",
               f"--object-store-memory={self.object_store_bytes}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
               "--min-worker-port=0", "--max-worker-port=0"]
        if head:
            cmd += ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self.client_port}"]
        else:
            cmd += [f"--address={self.address}"]
        log = open(os.path.join(self.root, f"{name}.log"), "ab")
        # a session of its own: the node's processes share its process group, and nothing else does
        proc = subprocess.Popen(cmd, env=self._node_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._procs.append(proc)
        self._named[name] = proc
        self._specs[name] = spec
        return proc

    def start(self, timeout_s: float = 300.0) -> "LocalCluster":
        """Start the head, then the workers; return once every node is alive. Ray gives a node
        30 s to register, which a loaded machine can miss: a node that gave up is started
        again, up to `node_retries` times each."""
        os.makedirs(self.root, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        try:
            self._start_and_wait("head", self.head, head=True, ready=lambda: len(self.alive_nodes()) >= 1,
                                 deadline=deadline)
            for i, spec in enumerate(self.workers):
                self._start_and_wait(f"worker{i + 1}", spec, head=False, deadline=deadline,
                                     ready=lambda n=i + 2: len(self.alive_nodes()) >= n)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_and_wait(self, name: str, spec: NodeSpec, *, head: bool, ready, deadline: float) -> None:
        for _ in range(self.node_retries):
            proc = self._start_node(name, spec, head=head)
            while proc.poll() is None and not ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Ray node {name} did not come up in time; logs in {self.root}")
                time.sleep(1.0)
            if proc.poll() is None:
                return
            self._kill_group(proc)  # it gave up: clear what it left, then try again
            self._procs.remove(proc)
        raise RuntimeError(f"Ray node {name} exited {self.node_retries} times while starting; logs in {self.root}")

    def api(self, path: str, *, token: str | None = "ours") -> dict:
        """GET a dashboard endpoint (state API, Jobs API), with our token unless told otherwise."""
        import urllib.request

        headers = self.auth_headers() if token == "ours" else ({"Authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(urllib.request.Request(self.dashboard_url + path, headers=headers), timeout=10) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        """Live nodes (node_id, resources_total, ...) from the state API; [] while the head starts."""
        try:
            nodes = self.api("/api/v0/nodes?detail=1&limit=1000")["data"]["result"]["result"]
        except OSError:
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def actors(self, class_name: str) -> list[dict]:
        """Actors of one class, live or dead, with the node each ran on (state API)."""
        query = urllib.parse.urlencode({"detail": 1, "limit": 10000, "filter_keys": "class_name",
                                        "filter_predicates": "=", "filter_values": class_name})
        return self.api(f"/api/v0/actors?{query}")["data"]["result"]["result"]

    def own_pids(self) -> list[int]:
        """Processes that run from our temp dir or in our nodes' process groups or sessions."""
        groups = {p.pid for p in self._procs}
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
                with open(f"/proc/{entry}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
                pgid, sid = os.getpgid(int(entry)), os.getsid(int(entry))
            except (OSError, ProcessLookupError, IndexError):
                continue
            if state in (b"Z", b"X"):  # exited, waiting for its parent to reap it: nothing runs
                continue
            # Ray's workers take process groups of their own, in their node's session
            if pgid in groups or sid in groups or self.root in cmdline:
                pids.append(int(entry))
        return pids

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop our nodes only: workers first, the head last."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
        deadline = time.monotonic() + grace_s
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self._procs:
            self._kill_group(proc)
        # Anything that left our groups but still runs from our temp dir, until none is left: a
        # SIGKILLed process stays in /proc until it has exited, and a raylet may have forked a
        # worker while it was being stopped.
        deadline = time.monotonic() + 30
        while (pids := self.own_pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        self._procs.clear()

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        """SIGKILL to the node's processes: its process group and its session (start_new_session
        made both the node's own; Ray's workers take process groups of their own in the session)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.getsid(int(entry)) == proc.pid:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait()

    def kill_node(self, name: str) -> None:
        """Lose a node at once, as a machine that dies: SIGKILL to all of its processes
        ("worker1", "worker2", ...: the order of `workers`)."""
        proc = self._named[name]
        self._kill_group(proc)
        if proc in self._procs:
            self._procs.remove(proc)

    def restart_node(self, name: str, timeout_s: float = 120.0) -> None:
        """Start a lost worker node ("worker1", ...) again, as a replaced machine joins: a new
        node with the same resources; returns once it is alive."""
        before = {n["node_id"] for n in self.alive_nodes()}  # the lost node may still be listed as alive
        self._start_and_wait(name, self._specs[name], head=False, deadline=time.monotonic() + timeout_s,
                             ready=lambda: any(n["node_id"] not in before for n in self.alive_nodes()))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

