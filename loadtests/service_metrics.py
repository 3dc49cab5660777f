"""The service's own Prometheus metrics, sampled during a run: per pool (deployment) the
healthy replicas, requests queued at callers and running on replicas, the mean batch size,
the proposal tokens run and kept (a target verifying the draft's step) since the previous
sample, and a vLLM pool's engines (requests running and waiting, the fullest one's KV-cache
share, preemptions since the previous sample). Reads the Ray metrics export port(s); no Ray import."""
from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections import defaultdict

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
POOLS = ("draft", "target", "router", "prm", "coordinator")
# A vLLM pool's engine metrics summed over its replicas -> snapshot key (the KV-cache share is
# the fullest replica's).
ENGINE_SUMS = {"ray_arbitrage_pool_engine_running_requests": "engine_running",
               "ray_arbitrage_pool_engine_waiting_requests": "engine_waiting",
               "ray_arbitrage_pool_engine_preempted_requests_total": "preempted"}


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m:
            try:
                out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
            except ValueError:
                continue
    return out


# Serve sets a replica's health gauge at each health check (every 10 s by default), so an
# export interval may lack it: a replica counts as up until this long after it was last seen.
REPLICA_TTL_S = 15.0


class ReplicaTracker:
    """Healthy replicas per deployment from ``ray_serve_deployment_replica_healthy``."""

    def __init__(self, ttl_s: float = REPLICA_TTL_S):
        self.ttl_s = ttl_s
        self.seen: dict[tuple[str, str], tuple[float, float]] = {}  # (deployment, replica) -> (time, value)
        self.first_update: float | None = None

    def unseen_count(self, now: float) -> int | None:
        """What a deployment with no healthy replica on record counts as: 0 once the tracker has
        watched for a whole health-check period, unknown (None) before, when its replicas may
        simply not have reported yet."""
        return 0 if self.first_update is not None and now - self.first_update >= self.ttl_s else None

    def update(self, samples, app: str | None, now: float | None = None) -> dict[str, int]:
        now = time.monotonic() if now is None else now
        self.first_update = now if self.first_update is None else self.first_update
        for name, labels, value in samples:
            if name == "ray_serve_deployment_replica_healthy" and labels.get("deployment") and (
                    not app or labels.get("application") in (None, app)):
                self.seen[(labels["deployment"], labels.get("replica", "?"))] = (now, value)
        counts: dict[str, int] = defaultdict(int)
        for (dep, _), (t, value) in self.seen.items():
            if now - t <= self.ttl_s and value >= 1:
                counts[dep] += 1
        return dict(counts)


def snapshot(samples, app: str | None) -> dict[str, dict[str, float]]:
    """Per deployment: queued, running, and cumulative items and batches (pools)."""
    pools: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, labels, value in samples:
        if app and labels.get("application") not in (None, app):
            continue
        dep = labels.get("deployment")
        if name == "ray_serve_deployment_queued_queries" and dep:
            pools[dep]["queued"] += value
        elif name == "ray_serve_replica_processing_queries" and dep:
            pools[dep]["running"] += value
        elif name == "ray_arbitrage_pool_items_total" and labels.get("role"):
            pools[labels["role"]]["items"] += value  # exact (Ray exports a histogram's _sum from bucket midpoints)
        elif name == "ray_arbitrage_pool_batch_size_count" and labels.get("role"):
            pools[labels["role"]]["batch_count"] += value
        elif name == "ray_arbitrage_pool_proposal_tokens_total" and labels.get("role") and labels.get("outcome"):
            pools[labels["role"]][labels["outcome"]] += value  # proposed / accepted
        elif name in ENGINE_SUMS and labels.get("role"):  # a vLLM pool's engines
            pools[labels["role"]][ENGINE_SUMS[name]] += value
        elif name == "ray_arbitrage_pool_engine_kv_cache_usage" and labels.get("role"):
            pools[labels["role"]]["kv_cache_usage"] = max(pools[labels["role"]]["kv_cache_usage"], value)
    return {dep: dict(v) for dep, v in pools.items() if dep in POOLS}


def interval_figures(snap: dict[str, dict[str, float]], replicas: dict[str, int],
                     previous: dict[str, dict[str, float]],
                     unseen: int | None = 0) -> tuple[dict[str, dict], dict[str, dict[str, float]]]:
    """One timeline row's pools from a snapshot (cumulative counters) and the one before it,
    and the snapshot to keep for the next row. ``unseen``: the replicas of a pool not in
    ``replicas`` (see ``ReplicaTracker.unseen_count``)."""
    for dep in replicas:
        snap.setdefault(dep, {})
    pools = {}
    for dep, v in snap.items():
        before = previous.get(dep, {})
        # Ray drops a gauge from an export interval in which it was not set: carry it forward.
        v = {**before, **v}
        calls = v.get("batch_count", 0) - before.get("batch_count", 0)
        items = v.get("items", 0) - before.get("items", 0)
        # A pool's first row has no row before it: its counters are the service's since it started,
        # not this interval's, so its batch size is null (as its preemptions and proposal tokens are).
        pools[dep] = {"replicas": replicas.get(dep, unseen), "queued": v.get("queued", 0), "running": v.get("running", 0),
                      "batch_size": round(items / calls, 2) if calls > 0 and dep in previous else None}
        proposed = v.get("proposed", 0) - before.get("proposed", 0)
        accepted = v.get("accepted", 0) - before.get("accepted", 0)
        # A pool's first sample is the baseline; a replica that stopped takes its counts along.
        if dep in previous and proposed > 0 and accepted >= 0:
            pools[dep]["proposal_tokens"] = {"proposed": proposed, "accepted": accepted}
        if "engine_running" in v:  # a vLLM pool: its engines at the export, preemptions since the last row
            preempted = v.get("preempted", 0) - before.get("preempted", 0)
            pools[dep]["engine"] = {"running": v["engine_running"], "waiting": v.get("engine_waiting", 0),
                                    "kv_cache_usage": round(v.get("kv_cache_usage", 0), 4),
                                    "preempted": preempted if dep in previous and preempted >= 0 else None}
        snap[dep] = v
    return pools, {**previous, **snap}


def scrape(urls: list[str], timeout: float = 5.0, errors: dict[str, str] | None = None,
           reached: set[str] | None = None) -> list:
    """The samples of every URL that answers; ``errors`` gets why each other did not (the last
    reason), ``reached`` each that did."""
    samples = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                samples += parse(resp.read().decode())
        except (OSError, ValueError) as exc:  # ValueError: not a URL urllib can open
            if errors is not None:
                errors[url] = str(getattr(exc, "reason", None) or exc)
            continue
        if reached is not None:
            reached.add(url)
    return samples


class Sampler(threading.Thread):
    """Samples every ``interval_s`` until stopped; ``timeline`` rows: t, pool -> figures. A
    sample whose pool metrics repeat the previous one's is left out (``repeats`` counts them):
    Ray had not exported since (every 10 s by default), so it would read as an idle interval (an
    idle service repeats too, and loses nothing by it)."""

    def __init__(self, urls: list[str], app: str | None, interval_s: float = 2.0):
        super().__init__(daemon=True)
        self.urls, self.app, self.interval_s = urls, app, interval_s
        self.timeline: list[dict] = []
        self.repeats = 0
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()
        self._tracker = ReplicaTracker()
        self._previous: dict[str, dict[str, float]] = {}
        self._last: tuple | None = None
        self._errors: dict[str, str] = {}
        self._reached: set[str] = set()

    @property
    def unreachable(self) -> dict[str, str]:
        """Each URL no scrape reached, with the last reason: told apart from one that answered
        without a pool's metrics."""
        return {url: why for url, why in self._errors.items() if url not in self._reached}

    def sample(self, samples: list, now: float) -> None:
        """Adds one scrape's row to the timeline, unless it repeats the last export."""
        snap, replicas = snapshot(samples, self.app), self._tracker.update(samples, self.app, now)
        unseen = self._tracker.unseen_count(now)
        key = ({dep: dict(v) for dep, v in snap.items()}, replicas, unseen)  # interval_figures fills snap in
        if self.timeline and key == self._last:
            self.repeats += 1
            return
        self._last = key
        pools, self._previous = interval_figures(snap, replicas, self._previous, unseen)
        self.timeline.append({"t": round(now - self._t0, 2), "pools": pools})

    def run(self) -> None:
        while True:
            self.sample(scrape(self.urls, errors=self._errors, reached=self._reached), time.monotonic())
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> list[dict]:
        self._stop_event.set()
        self.join(timeout=30)
        return self.timeline
