"""The queueing model the planner simulates.

Each request is a chain of pool calls, step after step: the draft writes, the router (or, for
RSD, the PRM) scores, and with probability ``target_fraction`` the target rewrites. Every pool
has ``replicas`` servers with a shared queue; an idle replica takes up to ``max_batch`` queued
calls at once and serves them in ``base_ms + per_item_ms * b`` (the batch-dependent service
rate of dynamic batching: calls that arrive during a pass join the next one). Each call also
pays ``hop_ms`` of handle and coordinator overhead that holds no replica, and each request
``request_overhead_ms`` (proxy, gRPC). With ``cores`` set (a CPU machine), the busy replicas
and that overhead, which is Python work on the same cores, share them (processor sharing); on
GPUs leave it None: each replica has its own device and the overhead is latency only.
"""
from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

CALLS_PER_STEP = {
    "draft": (("draft",), None),
    "target": (("target",), None),
    "arbitrage": (("draft", "router"), "target"),
    "rsd": (("draft", "prm"), "target"),
}


@dataclass(frozen=True)
class ServiceCurve:
    """Wall ms of one batched forward pass of ``b`` calls: ``base_ms + per_item_ms * b`` on
    average, varying call to call with coefficient of variation ``cv`` (a step's length, and so
    its time, depends on what the model writes)."""

    base_ms: float
    per_item_ms: float
    cv: float = 0.0

    def ms(self, b: int) -> float:
        return self.base_ms + self.per_item_ms * b

    def sample_ms(self, b: int, rng: random.Random) -> float:
        """One pass: the mean times a lognormal factor of mean 1 and this CV."""
        if self.cv <= 0:
            return self.ms(b)
        sigma2 = math.log1p(self.cv ** 2)
        return self.ms(b) * rng.lognormvariate(-sigma2 / 2, math.sqrt(sigma2))

    @classmethod
    def fit(cls, batch_sizes: list[int], ms: list[float], cv: float = 0.0) -> ServiceCurve:
        """Least squares over the profiled points (both terms kept >= 0)."""
        n = len(batch_sizes)
        if n == 0:
            raise ValueError("a service curve needs at least one profiled batch size")
        if n == 1:
            return cls(0.0, ms[0] / batch_sizes[0], cv)
        mx, my = sum(batch_sizes) / n, sum(ms) / n
        sxx = sum((x - mx) ** 2 for x in batch_sizes)
        slope = sum((x - mx) * (y - my) for x, y in zip(batch_sizes, ms)) / sxx if sxx else 0.0
        slope = max(slope, 0.0)
        return cls(max(my - slope * mx, 0.0), slope, cv)


@dataclass(frozen=True)
class Pool:
    curve: ServiceCurve
    replicas: int = 1
    max_batch: int = 16

    def __post_init__(self) -> None:
        # A replica that takes no call would start empty batches forever: the simulation hangs.
        if self.replicas < 1 or self.max_batch < 1:
            raise ValueError(f"a pool needs replicas and max_batch >= 1, got {self.replicas} and {self.max_batch}")


@dataclass(frozen=True)
class Workload:
    policy: str
    steps: tuple[int, ...]        # steps of each request, sampled per request (an empirical distribution)
    target_fraction: float        # share of steps the target writes (1 for policy 'target')
    hop_ms: float = 0.0
    request_overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in CALLS_PER_STEP:
            raise ValueError(f"policy: the planner models {', '.join(CALLS_PER_STEP)}, got {self.policy!r}")
        if not 0.0 <= self.target_fraction <= 1.0:
            raise ValueError(f"target fraction: must lie in [0, 1], got {self.target_fraction}")
        if not self.steps or min(self.steps) <= 0:
            raise ValueError("steps per request: give at least one positive count")

    def pools(self) -> set[str]:
        always, routed = CALLS_PER_STEP[self.policy]
        return set(always) | ({routed} if routed and self.target_fraction > 0 else set())


def calls_per_request(w: Workload) -> dict[str, float]:
    """Expected calls to each pool per request: mean steps x the policy's calls per step."""
    always, routed = CALLS_PER_STEP[w.policy]
    steps = sum(w.steps) / len(w.steps)
    calls = dict.fromkeys(always, steps)
    if routed and w.target_fraction > 0:
        calls[routed] = calls.get(routed, 0.0) + steps * w.target_fraction
    return calls


def calls_per_s_at_max_batch(pool: Pool) -> float:
    """The most calls per second the pool serves: every replica running full batches."""
    ms = pool.curve.ms(pool.max_batch)
    return math.inf if ms <= 0 else pool.replicas * pool.max_batch / ms * 1000.0


def load_at_max_batch(pools: dict[str, Pool], w: Workload, rate: float) -> dict[str, float]:
    """Per pool: offered calls per second over ``calls_per_s_at_max_batch``; at 1 or more its
    queue grows without bound whatever the latencies of a finite run look like."""
    return {name: rate * n / calls_per_s_at_max_batch(pools[name]) for name, n in calls_per_request(w).items()}


def core_ms_per_request(pools: dict[str, Pool], w: Workload) -> float:
    """Core time one request costs at full batches: pool work per call, hops, request overhead."""
    per_call = {name: pools[name].curve.ms(pools[name].max_batch) / pools[name].max_batch + w.hop_ms
                for name in calls_per_request(w)}
    return sum(n * per_call[name] for name, n in calls_per_request(w).items()) + w.request_overhead_ms


def core_load(pools: dict[str, Pool], w: Workload, rate: float, cores: float) -> float:
    """Core time asked per second over the cores (a CPU machine); at 1 or more it cannot keep up."""
    return rate * core_ms_per_request(pools, w) / 1000.0 / cores


@dataclass
class SimResult:
    latencies_ms: list[float]
    utilization: dict[str, float]
    mean_wait_ms: dict[str, float]
    stable: bool                       # every load below 1
    load_at_max_batch: dict[str, float] = field(default_factory=dict)
    core_load: float | None = None     # None on GPUs (no ``cores``)
    # Per kept request (as ``latencies_ms``): the ms more replicas could take off it, its waits in
    # the pools' queues plus what batching with others added to its passes (``ms(b) - ms(1)``).
    removable_ms: list[float] = field(default_factory=list)

    def p(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        pos = (len(xs) - 1) * q / 100.0
        lo = int(pos)
        return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)

    def tail_removable_ms(self, q: float = 95) -> float:
        """The mean ``removable_ms`` of the requests at or above the ``q``-th percentile latency."""
        cut = self.p(q)
        tail = [r for lat, r in zip(self.latencies_ms, self.removable_ms) if lat >= cut]
        return sum(tail) / len(tail) if tail else 0.0


@dataclass
class _Req:
    arrival: float
    calls: deque = field(default_factory=deque)


def _request_calls(w: Workload, rng: random.Random) -> deque:
    always, routed = CALLS_PER_STEP[w.policy]
    calls: deque = deque()
    for _ in range(rng.choice(w.steps)):
        calls.extend(always)
        if routed and rng.random() < w.target_fraction:
            calls.append(routed)
    return calls


def simulate(pools: dict[str, Pool], w: Workload, rate: float, n_requests: int = 2000, seed: int = 0,
             cores: float | None = None, warmup: float = 0.1) -> SimResult:
    """Poisson arrivals at ``rate`` per second through the pools; latencies of the requests after
    the warm-up share. ``stable`` is False when any pool's ``load_at_max_batch`` or the
    ``core_load`` reaches 1: then the latencies only say how long this finite run took to drain."""
    if rate <= 0:
        raise ValueError(f"rate: arrivals per second must be > 0, got {rate}")
    missing = w.pools() - set(pools)
    if missing:
        raise ValueError(f"no profile for pool(s) {sorted(missing)} that policy {w.policy!r} calls")
    rng = random.Random(seed)
    events: list = []  # (time_ms, seq, kind, payload)
    seq = 0

    def push(t: float, kind: str, payload) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    t_arr = 0.0
    for i in range(n_requests):
        t_arr += rng.expovariate(rate) * 1000.0
        push(t_arr, "arrive", i)
    queues = {name: deque() for name in pools}
    idle = {name: p.replicas for name, p in pools.items()}
    # Work on the (shared) cores: [remaining_ms, kind, payload, started_ms]; kind "batch" holds a
    # replica (payload: pool, calls), "hop" and "finish" are the coordinator's own CPU work.
    busy: list[list] = []
    busy_ms = dict.fromkeys(pools, 0.0)
    waits: dict[str, list[float]] = {name: [] for name in pools}
    done: dict[int, float] = {}
    reqs: dict[int, _Req] = {}
    removable = dict.fromkeys(range(n_requests), 0.0)
    now = 0.0

    def speed() -> float:
        return 1.0 if cores is None or len(busy) <= cores else cores / len(busy)

    def start_batches() -> None:
        for name, q in queues.items():
            while q and idle[name] > 0:
                b = min(pools[name].max_batch, len(q))
                calls = [q.popleft() for _ in range(b)]
                batching = pools[name].curve.ms(b) - pools[name].curve.ms(1)
                for rid, enq in calls:
                    waits[name].append(now - enq)
                    removable[rid] += now - enq + batching
                idle[name] -= 1
                busy.append([pools[name].curve.sample_ms(b, rng), "batch", (name, calls), now])

    def next_call(rid: int) -> None:
        req = reqs[rid]
        if not req.calls:
            if cores is None:
                done[rid] = now + w.request_overhead_ms - req.arrival
            else:
                busy.append([w.request_overhead_ms, "finish", rid, now])
            return
        call = (rid, req.calls.popleft())
        if cores is None:  # GPUs: the overhead is latency, the cores are not the bottleneck
            push(now + w.hop_ms, "enqueue", call)
        else:  # a CPU machine: the coordinator's work per call shares the cores with the pools
            busy.append([w.hop_ms, "hop", call, now])

    while events or busy:
        s = speed()
        t_done = now + min(b[0] for b in busy) / s if busy else math.inf
        t_event = events[0][0] if events else math.inf
        t_next = min(t_done, t_event)
        for b in busy:
            b[0] -= (t_next - now) * s
        now = t_next
        if t_done <= t_event:
            i = min(range(len(busy)), key=lambda k: busy[k][0])
            _, kind, payload, started = busy.pop(i)
            if kind == "batch":
                name, calls = payload
                idle[name] += 1
                busy_ms[name] += now - started
                for rid, _ in calls:
                    next_call(rid)
            elif kind == "hop":
                queues[payload[1]].append((payload[0], now))
            else:
                done[payload] = now - reqs[payload].arrival
        else:
            _, _, kind, payload = heapq.heappop(events)
            if kind == "arrive":
                reqs[payload] = _Req(now, _request_calls(w, rng))
                next_call(payload)
            else:
                rid, pool = payload
                queues[pool].append((rid, now))
        start_batches()
        if len(done) >= n_requests:
            break
    order = sorted(done)  # request ids are in arrival order
    kept_ids = order[int(warmup * len(order)):]
    kept = [done[i] for i in kept_ids]
    span = max(now, 1e-9)
    loads = load_at_max_batch(pools, w, rate)
    cores_used = None if cores is None else core_load(pools, w, rate, cores)
    stable = max([*loads.values(), cores_used or 0.0]) < 1.0
    return SimResult(kept, {n: busy_ms[n] / (span * pools[n].replicas) for n in pools},
                     {n: (sum(v) / len(v) if v else 0.0) for n, v in waits.items()}, stable=stable,
                     load_at_max_batch=loads, core_load=cores_used, removable_ms=[removable[i] for i in kept_ids])
