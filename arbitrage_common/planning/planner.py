"""``arbitrage plan``: the fewest replicas per pool whose simulated p95 holds an SLO at an
arrival rate, then GPUs per pool and worker-group Pods for a preset, for RSD and Arbitrage
side by side at matched accuracy (the business case: fewer target GPUs)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .model import (
    BATCHING,
    CALLS_PER_STEP,
    Pool,
    ServiceCurve,
    SimResult,
    Workload,
    calls_per_request,
    core_load,
    core_ms_per_request,
    load_at_max_batch,
    simulate,
)

MAX_REPLICAS = 256
# With ``cores`` (a CPU machine) every replica shares the same cores: more than this in all
# only adds contention.
MAX_REPLICAS_ON_CORES = 64
# Above this load at max batch (or core load) a plan has no headroom: a small rise in rate
# overloads it, and its simulated p95 has not settled (it grows with the requests simulated).
HEADROOM_LOAD = 0.95
# The seeds after the plan's own that its replicas are simulated at again: the search judged
# its steps at one seed, so a p95 just under the SLO may hold there only.
SEEDS_CHECKED = 2
# Bound on a profile's counts (steps a request, a pool's max batch): a larger one is a typo
# that would keep the simulation busy for hours.
MAX_PROFILE_COUNT = 100_000
# The no-load p95 (the floor no replica count goes under) is simulated at a rate this share of
# one request per its own service time: requests almost never meet.
NO_LOAD_SHARE = 0.01
# Steps of a packed pool the search simulates before it stops growing that pool: two, since its
# first step may only fill the GPU it has (no throughput), and the next adds a GPU.
STEPS_TRIED = 2
# How the replica search picks its next step (search_replicas): the step that lowers p95 the most
# per GPU it adds, or the pool where a request queues the most.
GAIN_PER_GPU, MOST_QUEUED = "gain per GPU", "most queued"

# The fields of a profile's JSON form (Profile.as_dict); from_dict refuses any other.
PROFILE_FIELDS = frozenset({"curves", "max_batch", "hop_ms", "request_overhead_ms", "steps", "cores", "measured",
                            "batching", "replicas_per_device", "session_affinity"})

@dataclass(frozen=True)
class Profile:
    """What ``arbitrage plan profile`` measured: per-pool service curves and the overheads.
    ``batching``, ``replicas_per_device`` (pools left out: static, 1) and ``session_affinity``
    describe how the pools are served (model.py)."""

    curves: dict[str, ServiceCurve]
    max_batch: dict[str, int]
    hop_ms: float
    request_overhead_ms: float
    steps: tuple[int, ...]
    cores: float | None
    measured: dict
    batching: dict[str, str] = field(default_factory=dict)
    replicas_per_device: dict[str, int] = field(default_factory=dict)
    session_affinity: bool = True

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, d: object) -> Profile:
        """A profile from its JSON form, checked field by field: profiles are also written by hand
        (GPU pools), and a zero batch, a negative time or a NaN would otherwise hang the
        simulation or plan nonsense. ValueError naming the field (``max_batch.target``)."""
        d = _object(d, "the profile")
        unknown = sorted(set(d) - PROFILE_FIELDS)
        if unknown:  # a misspelt optional field would otherwise be ignored and its default planned with
            raise ValueError(f"unknown field(s) {', '.join(unknown)} (a profile has {', '.join(sorted(PROFILE_FIELDS))})")
        curves = {}
        for pool, c in _object(_field(d, "curves"), "curves").items():
            c = _object(c, f"curves.{pool}")
            unknown = sorted(set(c) - {"base_ms", "per_item_ms", "cv"})
            if unknown:
                raise ValueError(f"curves.{pool}: unknown field(s) {', '.join(unknown)} (a curve has base_ms, "
                                 f"per_item_ms and cv)")
            base, per_item = (_number(_field(c, k, f"curves.{pool}."), f"curves.{pool}.{k}")
                              for k in ("base_ms", "per_item_ms"))
            curves[pool] = ServiceCurve(base, per_item, _number(c.get("cv", 0.0), f"curves.{pool}.cv"))
        max_batch = {pool: _positive_int(n, f"max_batch.{pool}")
                     for pool, n in _object(_field(d, "max_batch"), "max_batch").items()}
        no_batch = sorted(set(curves) - set(max_batch))
        if no_batch:  # no default: a guessed batch cap changes the plan
            raise ValueError(f"max_batch.{no_batch[0]} is missing: every pool with a curve needs its largest batch "
                             f"(a positive integer)")
        steps = _field(d, "steps")
        if not isinstance(steps, list) or not steps:
            raise ValueError(f"steps must be a non-empty list of steps per request, got {steps!r}")
        cores = d.get("cores")  # null: GPUs
        measured = _object(d.get("measured", {}), "measured")
        if "target_fraction" in measured and _number(measured["target_fraction"], "measured.target_fraction") > 1:
            raise ValueError(f"measured.target_fraction must lie in [0, 1], got {measured['target_fraction']!r}")
        # Optional, so older profiles keep their meaning: static batches, a device per replica.
        batching = _per_pool(d, "batching", curves)
        for pool, mode in batching.items():
            if mode not in BATCHING:
                raise ValueError(f"batching.{pool} must be one of {', '.join(map(repr, BATCHING))} (transformers "
                                 f"pools batch static, vLLM pools continuous), got {mode!r}")
        per_device = {pool: _positive_int(n, f"replicas_per_device.{pool}")
                      for pool, n in _per_pool(d, "replicas_per_device", curves).items()}
        if cores is not None and any(n > 1 for n in per_device.values()):  # CPU replicas share the cores
            raise ValueError("replicas_per_device: for GPU profiles only (cores is null); on a CPU profile the "
                             "replicas share the cores already")
        affinity = d.get("session_affinity", True)
        if not isinstance(affinity, bool):
            raise ValueError(f"session_affinity must be true or false, got {affinity!r}")  # noqa: TRY004 (user input)
        return cls(curves, max_batch, _number(_field(d, "hop_ms"), "hop_ms"),
                   _number(_field(d, "request_overhead_ms"), "request_overhead_ms"),
                   tuple(_positive_int(n, f"steps[{i}]") for i, n in enumerate(steps)),
                   None if cores is None else _number(cores, "cores", positive=True), measured,
                   batching, per_device, affinity)

    def cpu_ms_per_request(self, policy: str, target_fraction: float) -> float:
        """Work one request puts on the cores at batch 1: pool passes, hops, overhead."""
        always, routed = CALLS_PER_STEP[policy]
        steps = sum(self.steps) / len(self.steps)
        per_step = sum(self.curves[p].ms(1) + self.hop_ms for p in always)
        if routed and target_fraction > 0:
            per_step += target_fraction * (self.curves[routed].ms(1) + self.hop_ms)
        return steps * per_step + self.request_overhead_ms

    def scaled(self, k: float) -> Profile:
        """Every time multiplied by ``k`` (calibration against a measured capacity)."""
        curves = {n: ServiceCurve(c.base_ms * k, c.per_item_ms * k, c.cv) for n, c in self.curves.items()}
        return replace(self, curves=curves, hop_ms=self.hop_ms * k, request_overhead_ms=self.request_overhead_ms * k,
                       measured={**self.measured, "scaled_by": k})

    def as_dict(self) -> dict:
        return {"curves": {k: {"base_ms": v.base_ms, "per_item_ms": v.per_item_ms, "cv": v.cv}
                           for k, v in self.curves.items()},
                "max_batch": self.max_batch, "hop_ms": self.hop_ms, "request_overhead_ms": self.request_overhead_ms,
                "steps": list(self.steps), "cores": self.cores, "measured": self.measured,
                "batching": self.batching, "replicas_per_device": self.replicas_per_device,
                "session_affinity": self.session_affinity}


def _object(value: object, name: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")  # noqa: TRY004 (user input)
    return value


def _per_pool(d: dict, key: str, curves: dict) -> dict:
    """The optional per-pool object ``key`` (empty if absent); a pool without a curve is named."""
    per_pool = _object(d.get(key, {}), key)
    stray = sorted(set(per_pool) - set(curves))
    if stray:
        raise ValueError(f"{key}.{stray[0]}: no pool {stray[0]!r} in curves")
    return per_pool


def _field(d: dict, key: str, prefix: str = "") -> object:
    if key not in d:
        raise ValueError(f"{prefix}{key} is missing")
    return d[key]


def _number(value: object, name: str, positive: bool = False) -> float:
    """``value`` as a finite float >= 0, or > 0 if ``positive`` (NaN and infinity refused: they
    poison the simulation)."""
    try:  # an integer too large for a float (a typo of many digits) is not finite either
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {_shown(value)}")
    return float(value)


def _positive_int(value: object, name: str, most: int = MAX_PROFILE_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
        raise ValueError(f"{name} must be a positive integer up to {most}, got {_shown(value)}")
    return value


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


class Unreachable(ValueError):
    """The SLO or the rate cannot be met for this policy at any replica count the search may
    use: an outcome of planning, not bad input, so ``--bench`` still plans the other policy.
    ``best_p95_ms``: the lowest p95 the search saw, where it simulated one."""

    def __init__(self, message: str, best_p95_ms: float | None = None):
        super().__init__(message)
        self.best_p95_ms = best_p95_ms


def check_policy(policy: str) -> None:
    if policy not in CALLS_PER_STEP:
        raise ValueError(f"--policy: the planner models {', '.join(CALLS_PER_STEP)}, got {policy!r}")


# What the profile's ``measured.target_steps`` says the target curve was timed on (profile.py).
TIMED_ON_REWRITES, TIMED_ON_EVERY_STEP = "rewrites, the draft's step proposed", "every step"


def check_target_timing(profile: Profile, policy: str) -> None:
    """Refuse a target curve timed on other calls than ``policy`` sends: arbitrage and RSD send
    rewrites with the draft's step as the proposal, policy target writes every step unaided.
    A profile that does not say (an assumed one) is taken as it is."""
    timed_on = profile.measured.get("target_steps")
    always, routed = CALLS_PER_STEP[policy]
    needed = TIMED_ON_REWRITES if routed == "target" else TIMED_ON_EVERY_STEP if "target" in always else None
    if timed_on is None or needed is None or timed_on == needed:
        return
    raise ValueError(f"--profile: its target was timed on {timed_on}, but policy {policy!r} sends the target "
                     f"{needed}; run `arbitrage plan profile --policy {policy}` for a profile of that policy")


def check_inputs(rate: float, slo_ms: float, target_fraction: float, profile: Profile, policy: str) -> None:
    """Reject impossible inputs, naming each."""
    check_policy(policy)
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"--rate: arrivals per second must be > 0 and finite, got {rate}")
    if not (math.isfinite(slo_ms) and slo_ms > 0):
        raise ValueError(f"--slo-ms: the p95 to hold must be > 0 ms and finite, got {slo_ms}")
    if not 0.0 <= target_fraction <= 1.0:
        raise ValueError(f"--target-fraction: must lie in [0, 1], got {target_fraction}")
    needed = workload(profile, policy, target_fraction).pools()
    missing = sorted(needed - set(profile.curves))
    if missing:
        raise ValueError(f"--profile: it has no service curve for pool(s) {', '.join(missing)}, which policy "
                         f"{policy!r} calls (planned by --policy {policy}, or by --bench beside arbitrage); profile a "
                         f"config that serves {' and '.join(missing)} (`arbitrage plan profile --config ...`)")
    no_batch = sorted(needed - set(profile.max_batch))
    if no_batch:  # no default: a guessed batch cap changes the plan
        raise ValueError(f"--profile: it has no max_batch for pool(s) {', '.join(no_batch)}, which policy {policy!r} "
                         f"calls; give each pool's largest batch (max_batch.<pool>, a positive integer)")
    check_target_timing(profile, policy)
    always, _ = CALLS_PER_STEP[policy]
    one_step = sum(profile.curves[p].ms(1) + profile.hop_ms for p in always if p in profile.curves)
    if slo_ms <= one_step:
        raise Unreachable(f"--slo-ms: {slo_ms:g} ms is below the service time of one step ({one_step:.1f} ms for "
                         f"{' + '.join(always)} at batch 1)")


def workload(profile: Profile, policy: str, target_fraction: float) -> Workload:
    return Workload(policy, profile.steps, 1.0 if policy == "target" else target_fraction, profile.hop_ms,
                    profile.request_overhead_ms)


def _pools(profile: Profile, w: Workload, replicas: dict[str, int]) -> dict[str, Pool]:
    return {p: Pool(profile.curves[p], replicas.get(p, 1), profile.max_batch[p], profile.batching.get(p, "static"),
                    profile.replicas_per_device.get(p, 1))
            for p in sorted(w.pools())}  # sorted: a set's order changes run to run, and with it the seeded run


def predict(profile: Profile, policy: str, target_fraction: float, rate: float, replicas: dict[str, int],
            seed: int = 0, n_requests: int = 2000) -> SimResult:
    w = workload(profile, policy, target_fraction)
    return simulate(_pools(profile, w, replicas), w, rate, n_requests=n_requests, seed=seed, cores=profile.cores,
                    affinity=profile.session_affinity)


def _check_cores_carry(profile: Profile, w: Workload, rate: float) -> None:
    """More replicas do not add cores: a rate the cores cannot carry is refused at once."""
    if profile.cores is None:
        return
    pools = _pools(profile, w, {})
    load = core_load(pools, w, rate, profile.cores)
    if load >= 1.0:
        per_request = core_ms_per_request(pools, w)
        raise Unreachable(f"--rate: {rate:g} req/s needs {rate * per_request / 1000.0:.2f} cores ({per_request:.0f} "
                         f"core-ms a request at full batches), but the profile has {profile.cores:g} "
                         f"(core load {load:.2f}); these cores carry under {profile.cores * 1000.0 / per_request:.2f}"
                         f" req/s")


def queued_ms_per_request(result: SimResult, calls: dict[str, float]) -> dict[str, float]:
    """Mean ms a request spends queued at each pool: where a replica saves the most. (Not the
    busiest pool: one with a large cost per pass looks busy at any replica count.)"""
    return {p: result.mean_wait_ms[p] * calls.get(p, 0.0) for p in result.mean_wait_ms}


def replicas_step(replicas: int, per_device: int) -> int:
    """The next replica count that buys a pool capacity. Replicas packed ``per_device`` on a GPU
    share its throughput, so one added beside busy ones buys none: a packed pool first fills the
    GPUs it already occupies, then grows a GPU's worth of replicas at a time."""
    if per_device == 1:
        return replicas + 1
    filled = per_device * math.ceil(replicas / per_device)
    return filled if filled > replicas else replicas + per_device


def _too_many(profile: Profile, replicas: dict[str, int], pool: str, grown: int) -> bool:
    """Whether ``grown`` replicas of ``pool`` would pass the search's bound."""
    added = grown - replicas[pool]
    return grown > MAX_REPLICAS or (profile.cores is not None
                                    and sum(replicas.values()) + added > MAX_REPLICAS_ON_CORES)


def no_load_p95(profile: Profile, policy: str, target_fraction: float, seed: int = 0) -> tuple[float, float]:
    """The p95 with no load, and the rate it was simulated at: requests so far apart that they
    almost never meet, so every call is served at batch 1 with no queueing. No replica count
    goes under it: it is the service time of the requests themselves."""
    per_request_ms = max(profile.cpu_ms_per_request(policy, 1.0 if policy == "target" else target_fraction), 1e-3)
    rate = NO_LOAD_SHARE * 1000.0 / per_request_ms
    return predict(profile, policy, target_fraction, rate, {}, seed).p(95), rate


@dataclass
class Search:
    """What the replica search found: the counts, their simulation, every simulated state it kept
    in order (replicas and p95; a packed pool's step is kept only where it lowered the p95), and
    the packed pools it stopped growing (``stalled``: pool -> the counts tried and their p95,
    none lower than the p95 it kept)."""

    replicas: dict[str, int]
    result: SimResult
    path: list[tuple[dict[str, int], float]]
    stalled: dict[str, dict]


def plan_gpus(profile: Profile, replicas: dict[str, int]) -> int:
    """GPUs a plan occupies as the profile packs it (``Pool.devices``): ``replicas_per_device``
    replicas a GPU, the last maybe part full. (A CPU profile packs none: a count of replicas.)"""
    return sum(math.ceil(n / profile.replicas_per_device.get(p, 1)) for p, n in replicas.items())


@dataclass
class Step:
    """A pool's next step from a plan: the counts tried in order, each with its simulation (a
    packed pool's up to ``STEPS_TRIED``, stopping at the first that lowers p95; none where the
    next passes the replica cap), and the GPUs the last one adds: its replicas over
    ``replicas_per_device`` (one a replica unpacked; a whole GPU, or the part of one that
    filling a GPU the pool has uses, packed)."""

    pool: str
    tried: list[tuple[int, SimResult]]
    gpus: float

    def gain_ms(self, p95: float) -> float:
        """How much the last count tried lowers ``p95`` (negative where it raises it)."""
        return p95 - self.tried[-1][1].p(95) if self.tried else -math.inf


class _PastTheBudget(Exception):
    """A search holds more GPUs than its ``most_gpus`` and still misses the SLO (it cannot plan
    cheaper than the plan that set the budget), or needs more simulations than it was given."""


class _Simulations:
    """``predict`` at one rate, remembered by replica counts (a run is seeded: the same counts
    give the same result): a search weighs a step again after a stall, and the two searches of
    ``cheapest_search`` start from the same plan."""

    def __init__(self, profile: Profile, policy: str, target_fraction: float, rate: float, seed: int):
        self.args, self.seed, self.seen = (profile, policy, target_fraction, rate), seed, {}
        self.most: int | None = None  # simulations in all, then _PastTheBudget (None: no limit)

    def __call__(self, replicas: dict[str, int]) -> SimResult:
        key = tuple(sorted(replicas.items()))
        if key not in self.seen:
            if self.most is not None and len(self.seen) >= self.most:
                raise _PastTheBudget
            self.seen[key] = predict(*self.args, dict(replicas), self.seed)
        return self.seen[key]


def _next_step(sim: _Simulations, profile: Profile, replicas: dict[str, int], pool: str, p95: float) -> Step:
    """``pool``'s next step from ``replicas``: one replica, or for a packed pool the counts of
    ``replicas_step`` (up to ``STEPS_TRIED``: its first may only fill the GPU it has) until one
    lowers ``p95``."""
    per_device = profile.replicas_per_device.get(pool, 1)
    tried, grown = [], replicas[pool]
    for _ in range(STEPS_TRIED if per_device > 1 else 1):
        grown = replicas_step(grown, per_device)
        if _too_many(profile, replicas, pool, grown):
            break
        tried.append((grown, sim({**replicas, pool: grown})))
        if tried[-1][1].p(95) < p95:
            break
    return Step(pool, tried, (grown - replicas[pool]) / per_device)


def _gain_per_gpu(step: Step, p95: float) -> tuple[float, float]:
    """A step's rank: the ms of ``p95`` it takes off per GPU it adds, then the ms in all."""
    gain = step.gain_ms(p95)
    return gain / step.gpus, gain


def _most_gain_per_gpu(steps: dict[str, Step], p95: float) -> Step | None:
    """The best ranked step (``_gain_per_gpu``) that lowers ``p95``, ties to the pool first by
    name; None when none lowers it."""
    lowering = [steps[p] for p in sorted(steps) if steps[p].gain_ms(p95) > 0]
    return max(lowering, key=lambda s: _gain_per_gpu(s, p95)) if lowering else None


def _weigh(sim: _Simulations, profile: Profile, replicas: dict[str, int], pools: set[str], p95: float,
           ranks: dict[str, tuple[float, float]], steps: dict[str, Step], lazy: bool = True) -> dict[str, Step]:
    """``steps`` and the next steps of the other ``pools`` from ``replicas``, simulated in the
    order of their ``ranks`` (updated here) when last weighed. ``lazy``: stop once the best step
    simulated outranks every pool left, taking a pool's last rank as the most its step gains now
    (growing other pools leaves less queueing to take off), as lazy greedy search does: most
    steps simulate one or two pools, not every one."""
    steps = dict(steps)
    ranks.update({p: _gain_per_gpu(s, p95) for p, s in steps.items()})
    unweighed = (math.inf, math.inf)  # a pool not weighed yet is simulated first
    for pool in sorted(sorted(pools - set(steps)), key=lambda p: ranks.get(p, unweighed), reverse=True):
        best = _most_gain_per_gpu(steps, p95)
        if lazy and best is not None and _gain_per_gpu(best, p95) >= ranks.get(pool, unweighed):
            break
        steps[pool] = _next_step(sim, profile, replicas, pool, p95)
        ranks[pool] = _gain_per_gpu(steps[pool], p95)
    return steps


def _carry_the_rate(profile: Profile, w: Workload, rate: float) -> dict[str, int]:
    """One replica a pool, then, while a pool's load at max batch reaches 1, the most loaded one
    grown by ``replicas_step`` (no simulation: the loads are exact)."""
    replicas = dict.fromkeys(sorted(w.pools()), 1)
    while True:
        loads = load_at_max_batch(_pools(profile, w, replicas), w, rate, profile.session_affinity)
        overloaded = {p: load for p, load in loads.items() if load >= 1.0}
        if not overloaded:
            return replicas
        busiest = max(overloaded, key=overloaded.get)
        grown = replicas_step(replicas[busiest], profile.replicas_per_device.get(busiest, 1))
        if _too_many(profile, replicas, busiest, grown):
            raise Unreachable(f"--rate: {rate:g} req/s overloads pool {busiest} even with {replicas[busiest]} "
                              f"replicas (load at max batch {overloaded[busiest]:.2f})")
        replicas[busiest] = grown


def _notes(floor: float | None, stalled: dict[str, dict], per_device: dict[str, int]) -> str:
    notes = "" if floor is None else f"; the no-load p95 is {floor:.0f} ms"
    return notes + (f"; {stalled_note(stalled, per_device)}" if stalled else "")


def _growable(result: SimResult, slo_ms: float, rate: float, replicas: dict[str, int], stalled: dict[str, dict],
              notes: str) -> set[str]:
    """The pools the search may still grow; Unreachable when there are none, or when what more
    replicas of them can take off the slowest requests is less than the p95 misses the SLO by."""
    growable = set(replicas) - set(stalled)
    if not growable:
        raise Unreachable(f"--slo-ms: p95 {slo_ms:g} ms at {rate:g} req/s is not reachable (p95 "
                          f"{result.p(95):.0f} ms with {replicas}): no pool's next replicas lower it{notes}",
                          result.p(95))
    # What more replicas can take off the slowest requests: their queueing and what batching
    # added to their passes, in the pools the search may still grow. Less than the miss: the
    # rest is service time at this load (and the stalled pools' sharing of their GPUs).
    removable, over = result.tail_removable_ms(95, growable), result.p(95) - slo_ms
    if removable < over:
        where = f" in pool(s) {', '.join(sorted(growable))}, the ones it may still grow," if stalled else ","
        raise Unreachable(f"--slo-ms: p95 {slo_ms:g} ms at {rate:g} req/s is not reachable (p95 "
                          f"{result.p(95):.0f} ms with {replicas}, of which queueing and batching "
                          f"{removable:.0f} ms{where} less than the {over:.0f} ms over the SLO: the rest is the "
                          f"service time itself under this load{notes})", result.p(95))
    return growable


def _stall(stalled: dict[str, dict], step: Step, replicas: dict[str, int], p95: float) -> None:
    stalled[step.pool] = {"replicas": replicas[step.pool], "p95_ms": round(p95, 1),
                          "tried": [{"replicas": n, "p95_ms": round(r.p(95), 1)} for n, r in step.tried]}


def _most_queued(pools: set[str], result: SimResult, w: Workload) -> str:
    """The pool where a request spends the most time queued (``queued_ms_per_request``)."""
    queued = {p: q for p, q in queued_ms_per_request(result, calls_per_request(w)).items() if p in pools}
    return max(queued, key=queued.get)


def _past_the_cap(profile: Profile, slo_ms: float, rate: float, result: SimResult, replicas: dict[str, int],
                  notes: str) -> Unreachable:
    most = f"{MAX_REPLICAS_ON_CORES} replicas in all on the profile's cores" if profile.cores is not None \
        else f"{MAX_REPLICAS} replicas a pool"
    return Unreachable(f"--slo-ms: p95 {slo_ms:g} ms at {rate:g} req/s is not reachable within {most} "
                       f"(p95 {result.p(95):.0f} ms with {replicas}{notes})", result.p(95))


def _best_step(sim: _Simulations, profile: Profile, replicas: dict[str, int], growable: set[str], p95: float,
               ranks: dict[str, tuple[float, float]], weighed: dict[str, Step]) -> Step | None:
    """The step that lowers ``p95`` the most per GPU (``_gain_per_gpu``), weighed lazily, and
    where none of those weighed lowers it, every pool's (the ranks may have misled); None when
    no step lowers it."""
    steps = _weigh(sim, profile, replicas, growable, p95, ranks, weighed)
    if _most_gain_per_gpu(steps, p95) is None:
        steps = _weigh(sim, profile, replicas, growable, p95, ranks, steps, lazy=False)
    return _most_gain_per_gpu(steps, p95)




def search_replicas(profile: Profile, policy: str, target_fraction: float, rate: float, slo_ms: float,
                    seed: int = 0, floor: float | None = None, rule: str = GAIN_PER_GPU,
                    most_gpus: int | None = None, sim: _Simulations | None = None) -> Search:
    """Carry the rate (``_carry_the_rate``), then, while the p95 misses the SLO by no more than
    a request's queueing (the part more replicas can remove), take a step: with ``rule``
    ``GAIN_PER_GPU`` the pools' next step that lowers p95 the most per GPU it adds
    (``_best_step``), with ``MOST_QUEUED`` (or where no step lowers p95) that of the pool where a
    request queues the most. That pool's step is simulated first if it is packed: it puts
    replicas on a shared GPU, which slows the calls there, so where neither it nor the step
    after lowers p95 the pool is left as it is (``stalled``) while the search goes on with the
    others. An unpacked pool's step is taken even so (a replica on a GPU of its own slows no
    call: its p95 moved by sampling noise only; on a CPU profile's shared cores it may slow
    them all, and a refusal then names the lowest p95 the search held, ``_with_best``).
    ``floor``: the no-load p95, for the messages; ``most_gpus``: _PastTheBudget once the plan
    holds more and misses the SLO; ``sim``: the simulations, shared between searches."""
    w = workload(profile, policy, target_fraction)
    replicas = _carry_the_rate(profile, w, rate)
    per_device = {p: profile.replicas_per_device.get(p, 1) for p in replicas}
    sim = sim or _Simulations(profile, policy, target_fraction, rate, seed)
    result = sim(replicas)
    path = [(dict(replicas), result.p(95))]
    stalled: dict[str, dict] = {}
    ranks: dict[str, tuple[float, float]] = {}
    try:
        while not (result.stable and result.p(95) <= slo_ms):
            if most_gpus is not None and plan_gpus(profile, replicas) > most_gpus:
                raise _PastTheBudget
            notes, p95 = _notes(floor, stalled, per_device), result.p(95)
            growable = _growable(result, slo_ms, rate, replicas, stalled, notes)
            pool = _most_queued(growable, result, w)
            queued = _next_step(sim, profile, replicas, pool, p95) if per_device[pool] > 1 else None
            if queued is not None and queued.gain_ms(p95) <= 0:  # or its next GPU's worth passes the cap
                _stall(stalled, queued, replicas, p95)
                continue
            weighed = {} if queued is None else {pool: queued}
            best = _best_step(sim, profile, replicas, growable, p95, ranks, weighed) if rule == GAIN_PER_GPU else None
            best = best or queued or _next_step(sim, profile, replicas, pool, p95)
            if not best.tried:
                raise _past_the_cap(profile, slo_ms, rate, result, replicas, notes)
            replicas[best.pool], result = best.tried[-1]
            path.append((dict(replicas), result.p(95)))
    except Unreachable as exc:
        raise _with_best(exc, path) from None
    return Search(replicas, result, path, stalled)


def _with_best(exc: Unreachable, path: list[tuple[dict[str, int], float]]) -> Unreachable:
    """``exc`` told of the lowest p95 among the states the search kept, where that is not the
    state it stopped at (on shared cores or GPUs a step can raise p95)."""
    best, p95 = min(path, key=lambda state: state[1])
    if exc.best_p95_ms is not None and exc.best_p95_ms <= p95:
        return exc
    return Unreachable(f"{exc}; the lowest p95 it reached was {p95:.0f} ms, with {best}", p95)


def cheapest_search(profile: Profile, policy: str, target_fraction: float, rate: float, slo_ms: float,
                    seed: int = 0, floor: float | None = None) -> Search:
    """The cheaper plan (``_cost``) of the two rules' searches. ``MOST_QUEUED`` (the planner's
    search before) runs first: its plan bounds the other, and its refusal is raised as before.
    ``GAIN_PER_GPU`` mostly plans fewer GPUs, but it is greedy on p95s that sampling noise moves
    and can buy many steps that gain little, so it stops once it holds more GPUs than the first
    plan, or once it has run twice as many simulations of its own as the first search ran (it
    weighs more than one pool a step; ``plan`` takes at most about three times as long as the
    first search alone). The two share their simulations. Then ``_trim`` drops the replicas the
    plan can spare."""
    sim = _Simulations(profile, policy, target_fraction, rate, seed)
    args = (profile, policy, target_fraction, rate, slo_ms, seed, floor)
    queued = search_replicas(*args, rule=MOST_QUEUED, sim=sim)
    sim.most = 3 * len(sim.seen)
    try:
        weighed = search_replicas(*args, rule=GAIN_PER_GPU, most_gpus=plan_gpus(profile, queued.replicas), sim=sim)
        found = min((weighed, queued), key=lambda s: _cost(profile, s))
    except (Unreachable, _PastTheBudget):
        found = queued
    sim.most = None
    return _trim(sim, profile, found, slo_ms)


def _trim(sim: _Simulations, profile: Profile, found: Search, slo_ms: float) -> Search:
    """``found`` less each GPU whose replicas it can spare and still hold the SLO, one at a
    time: a greedy search buys steps that gains within the sampling noise justified, and a step
    bought early may be spare once later ones are in. A packed pool drops a GPU's worth (the
    replicas on its last GPU): one fewer replica on a shared GPU frees nothing."""
    replicas, result, path = dict(found.replicas), found.result, list(found.path)
    while True:
        for pool, n in replicas.items():
            per_device = profile.replicas_per_device.get(pool, 1)
            kept = (math.ceil(n / per_device) - 1) * per_device if per_device > 1 else n - 1
            if kept < 1:
                continue
            fewer = {**replicas, pool: kept}
            trimmed = sim(fewer)
            if trimmed.stable and trimmed.p(95) <= slo_ms:
                replicas, result = fewer, trimmed
                path.append((dict(replicas), result.p(95)))
                break
        else:  # a stalled pool the trim shrank is no longer as it stalled
            return Search(replicas, result, path, {p: s for p, s in found.stalled.items()
                                                   if replicas[p] == s["replicas"]})


def _cost(profile: Profile, found: Search) -> tuple[int, float, float]:
    """What a plan costs, compared in order: its GPUs, the GPU shares its replicas use (a packed
    GPU may be part full), its p95."""
    shares = sum(n / profile.replicas_per_device.get(p, 1) for p, n in found.replicas.items())
    return plan_gpus(profile, found.replicas), shares, found.result.p(95)


def stalled_note(stalled: dict[str, dict], per_device: dict[str, int]) -> str:
    """One clause per stalled pool (``Search.stalled``): the counts tried, and why they could not help."""
    notes = []
    for pool, s in stalled.items():
        kept = f"pool {pool} kept at {s['replicas']} replica{'s' * (s['replicas'] != 1)} (p95 {s['p95_ms']:.0f} ms " \
               f"when it stalled"
        if not s["tried"]:
            notes.append(f"{kept}): its next GPU's worth of replicas passes the cap of {MAX_REPLICAS} a pool")
            continue
        tried = ", ".join(f"{t['replicas']}: {t['p95_ms']:.0f} ms" for t in s["tried"])
        notes.append(f"{kept}; tried {tried}): its replicas share a GPU {per_device.get(pool, 1)} at a "
                     f"time, and a busy GPU serves no more for being shared; with replicas_per_device.{pool} 1 "
                     f"(num_gpus 1) each replica gets a GPU of its own")
    return "; ".join(notes)


def plan(profile: Profile, policy: str, target_fraction: float, rate: float, slo_ms: float,
         seed: int = 0) -> dict:
    """The cheapest replicas per pool ``cheapest_search`` finds to hold the SLO. An SLO under the
    no-load p95 and a rate the cores cannot carry are refused up front."""
    check_inputs(rate, slo_ms, target_fraction, profile, policy)
    w = workload(profile, policy, target_fraction)
    _check_cores_carry(profile, w, rate)
    floor, floor_rate = no_load_p95(profile, policy, target_fraction, seed)
    if floor > slo_ms:
        raise Unreachable(f"--slo-ms: p95 {slo_ms:g} ms is not reachable at any replica count: with no load (a "
                          f"simulation at {floor_rate:.3g} req/s) the p95 is already {floor:.0f} ms, the service "
                          f"time of the requests themselves; ask for {math.ceil(floor):.0f} ms or more", floor)
    found = cheapest_search(profile, policy, target_fraction, rate, slo_ms, seed, floor)
    result = found.result
    out = {"policy": policy, "target_fraction": round(w.target_fraction, 4), "rate": rate, "slo_p95_ms": slo_ms,
           "replicas": found.replicas, "predicted_p50_ms": round(result.p(50), 1),
           "predicted_p95_ms": round(result.p(95), 1), "no_load_p95_ms": round(floor, 1),
           "utilization": {k: round(v, 3) for k, v in result.utilization.items()},
           "load_at_max_batch": {k: round(v, 3) for k, v in result.load_at_max_batch.items()},
           "headroom_warning": headroom_warning(result), "stalled_pools": found.stalled}
    others = [predict(profile, policy, target_fraction, rate, found.replicas, seed + k).p(95)
              for k in range(1, SEEDS_CHECKED + 1)]
    out["p95_other_seeds_ms"] = [round(p95, 1) for p95 in others]
    out["sampling_warning"] = sampling_warning(slo_ms, seed, others)
    if result.core_load is not None:
        out["core_load"] = round(result.core_load, 3)
    return out


def sampling_warning(slo_ms: float, seed: int, others: list[float]) -> str | None:
    """A warning when the plan misses the SLO at one of the other seeds (``others``, seeds
    ``seed`` + 1, ...), else None: its margin is within the simulation's sampling noise."""
    if max(others) <= slo_ms:
        return None
    at = ", ".join(f"{p95:.0f} ms at seed {seed + k}" for k, p95 in enumerate(others, 1))
    return (f"sampling noise: the plan meets the SLO at seed {seed}, but its p95 is {at}; the margin is within the "
            f"simulation's noise: plan for a lower --slo-ms, or add a replica to the busiest pool")


def headroom_warning(result: SimResult) -> str | None:
    """A warning when the plan's largest load (a pool's at max batch, or the cores') is above
    ``HEADROOM_LOAD``, else None: such a plan meets the SLO only in a finite simulation."""
    loads = dict(result.load_at_max_batch)
    if result.core_load is not None:
        loads["cores"] = result.core_load
    busiest = max(loads, key=loads.get)
    if loads[busiest] <= HEADROOM_LOAD:
        return None
    what = "the cores are" if busiest == "cores" else f"pool {busiest} is"
    return (f"no headroom: {what} at load {loads[busiest]:.3f} (above {HEADROOM_LOAD:g}); a small rise in rate "
            f"overloads it, and the predicted p95 has not settled (it grows with the requests simulated)")


def calibrate(profile: Profile, policy: str, target_fraction: float, capacity_rps: float) -> Profile:
    """``profile`` with every time scaled so that the model saturates the cores at the measured
    capacity: ``core_load`` (full-batch cost per request, hops and overhead, over the cores) is 1
    at ``capacity_rps``. The capacity is measured with the cores busy, so that is what a request
    costs inside the running service; ``scaled_by`` records the factor."""
    if profile.cores is None:
        raise ValueError("calibrate: the profile has no cores (a GPU profile); calibration is against a CPU machine")
    if not (math.isfinite(capacity_rps) and capacity_rps > 0):
        raise ValueError(f"calibrate: the measured capacity must be a finite number > 0 req/s, got {capacity_rps}")
    w = workload(profile, policy, target_fraction)
    per_request = core_ms_per_request(_pools(profile, w, {}), w)
    return profile.scaled(profile.cores * 1000.0 / capacity_rps / per_request)


def packing_warning(profile: Profile, cfg, preset: str) -> str | None:
    """A warning when a GPU profile's ``replicas_per_device`` differs from how the preset packs a
    pool's replicas on a GPU (``num_gpus`` 0.5: two), else None: the plan then simulated other
    devices than the GPUs it counts. A CPU profile (``cores``) gets one too: its pools share its
    cores, while the preset's Pods hold CPUs of their own."""
    from ..kuberay.sizing import group_sizes, replica_demand

    if profile.cores is not None:
        pods = ", ".join(f"{size.name} {size.cpus:g}" for size in group_sizes(cfg))
        return (f"the profile's pools share its {profile.cores:g} cores (the machine it was measured on), but --preset "
                f"{preset} runs them in Pods with CPUs of their own (CPUs a Pod: {pods}): the plan's p95 and loads "
                f"are for the shared cores; profile on the Pods' nodes to plan them")
    off = []
    for pool, spec in cfg.pools.configured():
        gpus = replica_demand(pool, spec).gpus
        if pool not in profile.curves or gpus <= 0:
            continue
        packed = max(int(1.0 / gpus + 1e-9), 1)  # as Ray fits fractional GPUs on one device
        if profile.replicas_per_device.get(pool, 1) != packed:
            off.append(f"replicas_per_device.{pool} is {profile.replicas_per_device.get(pool, 1)}, but --preset "
                       f"{preset} gives each {pool} replica {gpus:g} GPU ({packed} a GPU)")
    if not off:
        return None
    return (f"the profile simulates other GPUs than the preset packs: {'; '.join(off)}; the plan's p95 and loads are "
            f"for the profile's packing")


def gpus_and_pods(replicas: dict[str, int], cfg) -> dict:
    """GPUs per pool and worker-group Pods for an AppConfig (a preset) at these replica counts,
    packed as ``arbitrage k8s render`` packs them. The coordinator's group, and every configured
    pool the plan does not size (the other policy's scorer, which the preset still deploys), are
    included at their initial replica counts (``unplanned_replicas``). ``gpus_requested`` sums
    the replicas' (maybe fractional) GPU shares; ``gpus_provisioned`` is what the Pods hold."""
    from ..kuberay.sizing import coordinator_pods, group_sizes, pods_needed, replica_bounds, replica_demand

    specs = {**dict(cfg.pools.configured()), "coordinator": cfg.coordinator}
    unplanned = {p: replica_bounds(spec).initial for p, spec in specs.items() if p not in replicas}
    counts = {**{p: n for p, n in replicas.items() if p in specs}, **unplanned}
    gpus = {p: round(n * replica_demand(p, specs[p]).gpus, 3) for p, n in counts.items() if p != "coordinator"}
    groups = {}
    for size in group_sizes(cfg):
        demands = [replica_demand(d, specs[d]) for d in size.deployments if d in counts for _ in range(counts[d])]
        if demands:
            pods = pods_needed(demands, size.cpus, size.gpus)
            if size.name == "coordinator":  # as render sizes the group
                pods = coordinator_pods(pods, cfg.coordinator)
            groups[size.name] = {"pods": pods, "gpus_per_pod": size.gpus, "cpus_per_pod": size.cpus}
    over = {p: {"planned": n, "max_replicas": replica_bounds(specs[p]).max} for p, n in replicas.items()
            if p in specs and n > replica_bounds(specs[p]).max}
    return {"gpus_per_pool": gpus, "gpus_requested": round(sum(gpus.values()), 3),
            "gpus_provisioned": sum(g["pods"] * g["gpus_per_pod"] for g in groups.values()),
            "coordinator_replicas": counts["coordinator"], "worker_groups": groups, "above_config_max_replicas": over,
            "unplanned_replicas": {p: n for p, n in unplanned.items() if p != "coordinator"}}
