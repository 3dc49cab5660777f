"""The queueing model the planner simulates.

Each request is a chain of pool calls, step after step: the draft writes, the router (or, for
RSD, the PRM) scores, and with probability ``target_fraction`` the target rewrites. Every pool
has ``replicas`` servers. With session affinity (the service's default: rendezvous hashing of
the session, services/affinity.py) each request is pinned to one replica per pool, picked
uniformly at random, and its calls queue at that replica; without it a pool has one shared
queue. A pool batches in one of two ways:

- ``static`` (transformers pools, behind Serve's batch gate): an idle replica takes up to
  ``max_batch`` queued calls at once and serves them in ``base_ms + per_item_ms * b``; calls
  that arrive during a pass wait for the next one.
- ``continuous`` (vLLM pools: the engine adds a sequence at its next iteration): batch
  processor sharing. A replica with ``b`` calls in service advances each by ``dt / ms(b)`` of
  its work; a new call joins at once while fewer than ``max_batch`` (``max_num_seqs``) run.

Each call also pays ``hop_ms`` of handle and coordinator overhead that holds no replica, and
each request ``request_overhead_ms`` (proxy, gRPC). With ``cores`` set (a CPU machine), the
busy replicas and that overhead, which is Python work on the same cores, share them (processor
sharing). On GPUs leave it None: the overhead is latency only, and the busy replicas on one
device share it (processor sharing) when a pool packs ``replicas_per_device`` > 1 on a GPU.
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
        return self.ms(b) * self.sample_factor(rng)

    def sample_factor(self, rng: random.Random) -> float:
        """A lognormal factor of mean 1 and this CV (1 when ``cv`` is 0)."""
        if self.cv <= 0:
            return 1.0
        sigma2 = math.log1p(self.cv ** 2)
        return rng.lognormvariate(-sigma2 / 2, math.sqrt(sigma2))

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


BATCHING = ("static", "continuous")


@dataclass(frozen=True)
class Pool:
    curve: ServiceCurve
    replicas: int = 1
    max_batch: int = 16
    batching: str = "static"         # or "continuous" (vLLM); see the module docstring
    replicas_per_device: int = 1     # replicas packed on one GPU, sharing it

    def __post_init__(self) -> None:
        # A replica that takes no call would start empty batches forever: the simulation hangs.
        if self.replicas < 1 or self.max_batch < 1:
            raise ValueError(f"a pool needs replicas and max_batch >= 1, got {self.replicas} and {self.max_batch}")
        if self.batching not in BATCHING:
            raise ValueError(f"batching: one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.replicas_per_device < 1:
            raise ValueError(f"replicas_per_device must be >= 1, got {self.replicas_per_device}")

    @property
    def devices(self) -> int:
        """GPUs the replicas occupy (``replicas_per_device`` on each; the last maybe fewer)."""
        return math.ceil(self.replicas / self.replicas_per_device)

    def device_of(self, replica: int) -> int:
        """Round robin: the first ``devices`` replicas each get a device of their own."""
        return replica % self.devices


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


def calls_per_s_at_max_batch(pool: Pool, affinity: bool = True) -> float:
    """The most calls per second the pool serves: every device running full batches. Replicas
    sharing a device share its throughput. With ``affinity`` each replica gets an equal share of
    the calls, so the most crowded device saturates first: n x per-device / replicas on it."""
    ms = pool.curve.ms(pool.max_batch)
    if ms <= 0:
        return math.inf
    if affinity:
        # device_of deals replicas round robin: the most crowded device holds ceil(n / devices)
        return pool.replicas * pool.max_batch / ms * 1000.0 / math.ceil(pool.replicas / pool.devices)
    return pool.devices * pool.max_batch / ms * 1000.0


def load_at_max_batch(pools: dict[str, Pool], w: Workload, rate: float, affinity: bool = True) -> dict[str, float]:
    """Per pool: offered calls per second over ``calls_per_s_at_max_batch``; at 1 or more its
    queue grows without bound whatever the latencies of a finite run look like."""
    return {name: rate * n / calls_per_s_at_max_batch(pools[name], affinity) for name, n in calls_per_request(w).items()}


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
    # Per pool, the mean ms a call was delayed: queued, and on a continuous pool also what sharing
    # the engine added to its service (beyond its batch-1 time).
    mean_wait_ms: dict[str, float]
    stable: bool                       # every load below 1
    load_at_max_batch: dict[str, float] = field(default_factory=dict)
    core_load: float | None = None     # None on GPUs (no ``cores``)
    # Per kept request (as ``latencies_ms``), by pool: the ms more replicas of that pool could take
    # off it, its waits in the pool's queue plus what batching with others added to its passes
    # (``ms(b) - ms(1)``).
    removable_ms_by_pool: list[dict[str, float]] = field(default_factory=list)

    def p(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        pos = (len(xs) - 1) * q / 100.0
        lo = int(pos)
        return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)

    def tail_removable_ms(self, q: float = 95, pools: set[str] | None = None) -> float:
        """The mean removable ms (``removable_ms_by_pool``, summed over ``pools``, else over all)
        of the requests at or above the ``q``-th percentile latency."""
        cut = self.p(q)
        removable = [sum(ms for pool, ms in by_pool.items() if pools is None or pool in pools)
                     for by_pool in self.removable_ms_by_pool]
        tail = [r for lat, r in zip(self.latencies_ms, removable) if lat >= cut]
        return sum(tail) / len(tail) if tail else 0.0


@dataclass
class _Req:
    arrival: float
    calls: deque = field(default_factory=deque)
    replica: dict = field(default_factory=dict)  # pool -> the _Replica its calls queue at


class _Replica:
    """A replica: its queue (one deque shared by the pool's replicas without affinity), the
    device it shares, and what it runs: static, 1 while a pass runs; continuous, its calls.

    A continuous replica serves all its calls at one rate, so it keeps virtual time: ``attained``
    is the work each of its calls has received since it started; a call that joins at ``a``
    with work ``x`` ends when ``attained`` reaches ``a + x`` (``calls``: a heap of those ends).
    One entry per replica, not per call, keeps the simulation fast at large batches."""

    __slots__ = ("attained", "calls", "device", "pool", "queue", "running")

    def __init__(self, pool: str, queue: deque, device: tuple[str, int]):
        self.pool, self.queue, self.device = pool, queue, device
        self.running = 0
        self.attained = 0.0
        self.calls: list = []  # (end in attained work, rid, work, joined_ms, waited_ms)


def _request_calls(w: Workload, rng: random.Random) -> deque:
    always, routed = CALLS_PER_STEP[w.policy]
    calls: deque = deque()
    for _ in range(rng.choice(w.steps)):
        calls.extend(always)
        if routed and rng.random() < w.target_fraction:
            calls.append(routed)
    return calls


def simulate(pools: dict[str, Pool], w: Workload, rate: float, n_requests: int = 2000, seed: int = 0,
             cores: float | None = None, warmup: float = 0.1, affinity: bool = True) -> SimResult:
    """Poisson arrivals at ``rate`` per second through the pools; latencies of the requests after
    the warm-up share. ``stable`` is False when any pool's ``load_at_max_batch`` or the
    ``core_load`` reaches 1: then the latencies only say how long this finite run took to drain.
    ``affinity``: each request's calls to a pool queue at one replica picked at random (the
    service's session affinity), else at one queue the pool's replicas share."""
    if rate <= 0:
        raise ValueError(f"rate: arrivals per second must be > 0, got {rate}")
    missing = w.pools() - set(pools)
    if missing:
        raise ValueError(f"no profile for pool(s) {sorted(missing)} that policy {w.policy!r} calls")
    rng = random.Random(seed)
    # The replica picks have a stream of their own, so they shift no arrival or service time:
    # with one replica a pool the run is the same with affinity or without.
    pick = random.Random(f"affinity-{seed}")
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
    replicas: dict[str, list[_Replica]] = {}
    for name, p in pools.items():
        shared: deque = deque()
        replicas[name] = [_Replica(name, deque() if affinity else shared, (name, p.device_of(i)))
                          for i in range(p.replicas)]
    on_device: dict[tuple[str, int], int] = {}  # busy replicas per device
    touched: set[str] = set()  # pools a call joined or left since start_batches: no other can start one
    # Work in progress: [remaining, kind, payload, started, replica]. "batch": a static pass
    # (remaining ms; payload: its calls); "engine": a busy continuous replica (remaining: None,
    # see _Replica); "hop" and "finish" are the coordinator's own CPU work (ms; no replica).
    busy: list[list] = []
    busy_ms = dict.fromkeys(pools, 0.0)
    waits: dict[str, list[float]] = {name: [] for name in pools}
    done: dict[int, float] = {}
    reqs: dict[int, _Req] = {}
    removable: dict[int, dict[str, float]] = {rid: {} for rid in range(n_requests)}
    now = 0.0

    def speed() -> float:
        return 1.0 if cores is None or len(busy) <= cores else cores / len(busy)

    def left(entry: list) -> float:
        """Work until ``entry``'s next completion."""
        return entry[4].calls[0][0] - entry[4].attained if entry[1] == "engine" else entry[0]

    def occupy(rep: _Replica, busy_now: bool) -> None:
        on_device[rep.device] = on_device.get(rep.device, 0) + (1 if busy_now else -1)

    def join(rep: _Replica, rid: int, enq: float) -> None:
        """A call joins a continuous replica's running batch at once."""
        pool = pools[rep.pool]
        if not rep.running:
            occupy(rep, True)
            rep.attained = 0.0
            busy.append([None, "engine", None, now, rep])
        work = pool.curve.sample_factor(rng)
        heapq.heappush(rep.calls, (rep.attained + work, rid, work, now, now - enq))
        rep.running += 1

    def start_batches() -> None:
        for name, reps in replicas.items():
            if name not in touched:
                continue
            pool = pools[name]
            if pool.batching == "continuous":
                for rep in (reps if affinity else reps[:1]):  # without affinity they share one queue
                    q = rep.queue
                    while q:
                        # the least busy replica that serves this queue (one, with affinity): Serve's
                        # router prefers the shorter queue; a full one leaves the call queued
                        to = rep if affinity else min(reps, key=lambda r: r.running)
                        if to.running >= pool.max_batch:
                            break
                        join(to, *q.popleft())
                continue
            for rep in reps:
                q = rep.queue
                if not q or rep.running:
                    continue
                b = min(pool.max_batch, len(q))
                calls = [q.popleft() for _ in range(b)]
                batching = pool.curve.ms(b) - pool.curve.ms(1)
                for rid, enq in calls:
                    waits[name].append(now - enq)
                    removable[rid][name] = removable[rid].get(name, 0.0) + now - enq + batching
                rep.running = 1
                occupy(rep, True)
                busy.append([pool.curve.sample_ms(b, rng), "batch", calls, now, rep])
        touched.clear()

    def next_call(rid: int) -> None:
        req = reqs[rid]
        if not req.calls:
            if cores is None:
                done[rid] = now + w.request_overhead_ms - req.arrival
            else:
                busy.append([w.request_overhead_ms, "finish", rid, now, None])
            return
        call = (rid, req.calls.popleft())
        if cores is None:  # GPUs: the overhead is latency, the cores are not the bottleneck
            push(now + w.hop_ms, "enqueue", call)
        else:  # a CPU machine: the coordinator's work per call shares the cores with the pools
            busy.append([w.hop_ms, "hop", call, now, None])

    def enqueue(rid: int, pool: str) -> None:
        reqs[rid].replica[pool].queue.append((rid, now))
        touched.add(pool)

    while events or busy:
        s = speed()
        # How fast each entry's work goes: its share of the cores and of its device; on a
        # continuous replica each call gets one unit of work per ms(b) at its batch b. And the
        # entry that completes first (the first of equals). One loop, written out: it is most of
        # a run's time.
        rates, i, t_left = [], -1, math.inf
        for b in busy:
            rep = b[4]
            r = s if rep is None or on_device[rep.device] <= 1 else s / on_device[rep.device]
            if b[1] == "engine":
                r /= max(pools[rep.pool].curve.ms(rep.running), 1e-9)  # a zero curve: done at once
            rates.append(r)
            t = left(b) / r
            if i < 0 or t < t_left:
                i, t_left = len(rates) - 1, t
        t_done = now + t_left if busy else math.inf
        t_event = events[0][0] if events else math.inf
        t_next = min(t_done, t_event)
        dt = t_next - now
        for b, r in zip(busy, rates):
            if b[1] == "engine":
                b[4].attained += dt * r
            else:
                b[0] -= dt * r
        now = t_next
        if t_done <= t_event:
            kind, payload, started, rep = busy[i][1:]
            if rep is not None:
                touched.add(rep.pool)
            if kind == "engine":
                _, rid, work, joined, waited = heapq.heappop(rep.calls)
                rep.running -= 1
                # A call joins at once, so its delay is mostly what sharing the engine with other
                # calls added to it: counted as waiting, where the search looks for a replica.
                delay = waited + max(now - joined - pools[rep.pool].curve.ms(1) * work, 0.0)
                waits[rep.pool].append(delay)
                removable[rid][rep.pool] = removable[rid].get(rep.pool, 0.0) + delay
                if not rep.running:
                    busy.pop(i)
                    occupy(rep, False)
                    busy_ms[rep.pool] += now - started
                next_call(rid)
            else:
                busy.pop(i)
                if kind == "batch":
                    rep.running = 0
                    occupy(rep, False)
                    busy_ms[rep.pool] += now - started
                    for rid, _ in payload:
                        next_call(rid)
                elif kind == "hop":
                    enqueue(*payload)
                else:
                    done[payload] = now - reqs[payload].arrival
        else:
            _, _, kind, payload = heapq.heappop(events)
            if kind == "arrive":
                # sorted: the pools' order may come from a set, whose order changes run to run
                reqs[payload] = _Req(now, _request_calls(w, rng),
                                     {name: replicas[name][pick.randrange(len(replicas[name]))]
                                      for name in sorted(replicas)})
                next_call(payload)
            else:
                enqueue(*payload)
        start_batches()
        if len(done) >= n_requests:
            break
    order = sorted(done)  # request ids are in arrival order
    kept_ids = order[int(warmup * len(order)):]
    kept = [done[i] for i in kept_ids]
    span = max(now, 1e-9)
    loads = load_at_max_batch(pools, w, rate, affinity)
    cores_used = None if cores is None else core_load(pools, w, rate, cores)
    stable = max([*loads.values(), cores_used or 0.0]) < 1.0
    return SimResult(kept, {n: busy_ms[n] / (span * pools[n].replicas) for n in pools},
                     {n: (sum(v) / len(v) if v else 0.0) for n, v in waits.items()}, stable=stable,
                     load_at_max_batch=loads, core_load=cores_used,
                     removable_ms_by_pool=[removable[i] for i in kept_ids])
