"""A real local Ray cluster shaped like a rendered RayService: the head with its own
rayStartParams, then one `ray start` node per Pod of each worker group, with the group's
labels, CPUs, GPUs and memory as KubeRay would start them. The app is deployed the way
KubeRay deploys it: its ``serveConfigV2`` PUT to the dashboard's Serve REST API, unchanged.

Only ports differ from a cluster (every node shares one machine): the dashboard and each
node's metrics port are free ports here; the Serve HTTP/gRPC ports are the manifest's.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 80 * 1024**2  # per node; small machine
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]i)?", q)
    assert m, f"unsupported memory quantity {q!r}"
    return int(m[1]) * _UNITS.get(m[2] or "", 1)


@dataclass
class WorkerGroup:
    name: str
    labels: dict[str, str]
    cpus: int
    gpus: int
    memory: int
    min_pods: int
    max_pods: int


def worker_groups(rayservice: dict) -> list[WorkerGroup]:
    out = []
    for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        out.append(WorkerGroup(g["groupName"], dict(g.get("labels", {})), int(limits["cpu"]),
                               int(limits.get("nvidia.com/gpu", 0)), quantity_bytes(limits["memory"]),
                               g["minReplicas"], g["maxReplicas"]))
    return out


def _flags(params: dict[str, str]) -> list[str]:
    return [f"--{k}={v}" for k, v in params.items()]


@dataclass
class LocalRayCluster:
    """The head and worker nodes; ``pods`` holds each worker node's group and metrics port."""

    rayservice: dict
    env: dict[str, str]
    cwd: Path
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    metrics_ports: list[int] = field(default_factory=list)
    pods: list[tuple[str, int]] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, args: list[str]) -> subprocess.Popen:
        port = free_port()
        self.metrics_ports.append(port)
        return subprocess.Popen([str(BIN / "ray"), "start", *args, f"--metrics-export-port={port}",
                                 f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"],
                                cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    @staticmethod
    def _wait(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            out, _ = p.communicate(timeout=180)
            if p.returncode != 0:
                raise RuntimeError(f"ray start failed ({p.returncode}):\n{out[-3000:]}")

    def start_head(self) -> None:
        params = dict(self.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"])
        params.pop("metrics-export-port", None)  # one machine: every node needs its own
        params["dashboard-host"] = "127.0.0.1"
        self._wait([self._ray_start(["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                                     f"--dashboard-port={self.dashboard_port}", *_flags(params)])])

    def add_pods(self, groups: list[tuple[WorkerGroup, int]]) -> None:
        """Start ``n`` nodes of each group (what KubeRay does for ``n`` Pods), one at a time
        (parallel starts time out on a 2-core machine)."""
        for group, n in groups:
            labels = ",".join(f"{k}={v}" for k, v in group.labels.items())
            for _ in range(n):
                self._wait([self._ray_start([f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={group.cpus}",
                                             f"--num-gpus={group.gpus}", f"--memory={group.memory}",
                                             f"--labels={labels}"])])
                self.pods.append((group.name, self.metrics_ports[-1]))

    def lose_pods(self, group: str, count: int | None = None) -> int:
        """SIGKILL every process of ``count`` nodes of ``group`` (None: all of them), which is
        what losing their Pods' machines does: no drain, no goodbye to the GCS. How many
        nodes were lost."""
        lost = [port for name, port in self.pods if name == group][:count]
        for port in lost:
            for pid in _node_processes(port):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.pods.remove((group, port))
            self.metrics_ports.remove(port)
        return len(lost)

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120,
                       check=False)

    # -- the dashboard's Serve REST API (what KubeRay calls) -------------------------------
    def deploy(self, serve_config_yaml: str) -> None:
        body = json.dumps(yaml.safe_load(serve_config_yaml)).encode()
        req = urllib.request.Request(f"{self.dashboard}/api/serve/applications/", data=body, method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200, resp.read()

    def serve_status(self) -> dict:
        with urllib.request.urlopen(f"{self.dashboard}/api/serve/applications/", timeout=30) as resp:
            return json.loads(resp.read())

    def wait_running(self, app: str, timeout_s: float = 420) -> dict:
        deadline, app_status = time.monotonic() + timeout_s, {}
        while time.monotonic() < deadline:
            app_status = self.serve_status().get("applications", {}).get(app, {})
            if app_status.get("status") == "RUNNING":
                return app_status
            if app_status.get("status") == "DEPLOY_FAILED":
                raise AssertionError(f"{app} failed to deploy: {app_status.get('message')}")
            time.sleep(2)
        raise AssertionError(f"{app} not RUNNING after {timeout_s} s: {json.dumps(app_status)[:3000]}")

    # -- where replicas run ------------------------------------------------------------
    def replicas(self, app: str) -> list[dict]:
        """Every replica actor of ``app``: deployment, state, and its node's labels."""
        from ray.util.state import list_actors, list_nodes

        nodes = {n.node_id: n for n in list_nodes(address=self.dashboard, limit=1000)}
        out = []
        for a in list_actors(address=self.dashboard, limit=10000, detail=True):
            if not a.class_name.startswith(f"ServeReplica:{app}:") or a.state == "DEAD":
                continue
            node = nodes.get(a.node_id) if a.node_id else None
            out.append({"deployment": a.class_name.split(":", 2)[2], "state": a.state, "node_id": a.node_id,
                        "actor_id": a.actor_id,
                        "head": bool(node and node.is_head_node),
                        "labels": dict(node.labels) if node else {}})
        return out

    def metrics_text(self) -> str:
        texts = []
        for port in self.metrics_ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                    texts.append(resp.read().decode())
            except OSError:
                continue  # a node whose exporter is not up yet
        return "\n".join(texts)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _node_processes(metrics_port: int) -> list[int]:
    """The processes of the node started with ``metrics_port``: its raylet (which names that
    port), everything the raylet started (agents, workers, replicas), and the node's log
    monitor (started beside the raylet, named by the raylet's socket suffix)."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    cmdlines = {pid: _cmdline(pid) for pid in pids}
    raylet = next(pid for pid, args in cmdlines.items() if args and args[0].endswith("/raylet")
                  and f"--metrics_export_port={metrics_port}" in args)
    socket_arg = next(a for a in cmdlines[raylet] if a.startswith("--raylet_socket_name="))
    suffix = socket_arg.rsplit("/raylet", 1)[1]  # "" for the first node, ".3" for the fourth
    children: dict[int, list[int]] = {}
    for pid in pids:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(pid)
    out, todo = [], [raylet]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    out += [pid for pid, args in cmdlines.items()
            if any(a.endswith("log_monitor.py") for a in args) and any(a.endswith(f"/log_monitor{suffix}.out")
                                                                      for a in args)]
    return out


def pod_env(rayservice: dict) -> dict[str, str]:
    """The literal env of the head Pod's Ray container (what every node gets; Secret refs left out)."""
    container = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def start_cluster(rayservice: dict, env_overrides: dict[str, str], cwd: Path) -> LocalRayCluster:
    env = {**os.environ, **pod_env(rayservice), **env_overrides}
    cluster = LocalRayCluster(rayservice, env, cwd)
    cluster.start_head()
    try:
        cluster.add_pods([(g, g.min_pods) for g in worker_groups(rayservice)])
    except BaseException:
        cluster.stop()
        raise
    return cluster
