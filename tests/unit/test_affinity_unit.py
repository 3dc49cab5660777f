"""Session affinity: the pure replica choice (rendezvous hashing) and the session-bound
handle adapters. No Ray cluster; the router over a real cluster is in tests/serve."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter

import pytest

from arbitrage_common.interfaces import GenerationOptions
from services.affinity import preferred_replicas, router_config
from services.handles import PoolHandles

SESSIONS = [f"req-{i:05d}" for i in range(4000)]
REPLICAS = ["a1b2c3", "d4e5f6", "g7h8i9", "j0k1l2"]


def owner(session: str, replicas: list[str]) -> str:
    return preferred_replicas(session, replicas, fallbacks=0)[0]


def test_same_session_same_replica_whatever_the_order():
    for session in SESSIONS[:200]:
        first = owner(session, REPLICAS)
        assert owner(session, list(reversed(REPLICAS))) == first
        assert owner(session, REPLICAS[1:] + REPLICAS[:1]) == first


def test_sessions_spread_evenly():
    counts = Counter(owner(s, REPLICAS) for s in SESSIONS)
    assert set(counts) == set(REPLICAS)
    expected = len(SESSIONS) / len(REPLICAS)
    assert all(abs(n - expected) < 0.15 * expected for n in counts.values()), counts


def test_removing_a_replica_moves_only_its_sessions():
    before = {s: owner(s, REPLICAS) for s in SESSIONS}
    gone = REPLICAS[2]
    after = {s: owner(s, [r for r in REPLICAS if r != gone]) for s in SESSIONS}
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert moved and all(before[s] == gone for s in moved)
    assert len(moved) == sum(1 for s in SESSIONS if before[s] == gone)
    # Its sessions go to the next in rank, so they spread over the rest, not onto one replica.
    assert all(after[s] == preferred_replicas(s, REPLICAS, fallbacks=1)[1] for s in moved)
    assert len({after[s] for s in moved}) == len(REPLICAS) - 1


def test_adding_a_replica_takes_about_its_share_and_nothing_else_moves():
    grown = REPLICAS + ["m3n4o5"]
    before = {s: owner(s, REPLICAS) for s in SESSIONS}
    after = {s: owner(s, grown) for s in SESSIONS}
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert all(after[s] == "m3n4o5" for s in moved)
    share = len(moved) / len(SESSIONS)
    assert 0.8 / len(grown) < share < 1.2 / len(grown), share  # ~1/5, never a reshuffle


def test_fallbacks_are_distinct_ranked_and_bounded():
    for session in SESSIONS[:100]:
        ranked = preferred_replicas(session, REPLICAS, fallbacks=10)
        assert sorted(ranked) == sorted(REPLICAS)
        assert ranked[0] == owner(session, REPLICAS)
        assert preferred_replicas(session, REPLICAS, fallbacks=1) == ranked[:2]
    assert preferred_replicas("s", ["only"], fallbacks=3) == ["only"]
    assert preferred_replicas("s", REPLICAS + REPLICAS, fallbacks=0) == [owner("s", REPLICAS)]


def test_no_session_or_no_replica_means_no_preference():
    assert preferred_replicas("", REPLICAS) == []
    assert preferred_replicas("s", []) == []


def test_choice_is_the_same_in_every_process():
    """Each coordinator replica runs its own router: the choice must not use Python's
    per-process salted hash()."""
    code = ("from services.affinity import preferred_replicas as p; "
            f"print([p(s, {REPLICAS!r}, 3) for s in {SESSIONS[:50]!r}])")
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert outs == {repr([preferred_replicas(s, REPLICAS, 3) for s in SESSIONS[:50]]) + "\n"}


def test_router_config_follows_the_flag():
    assert router_config(False) is None
    cfg = router_config(True)
    assert cfg["request_router_class"] == "services.affinity.SessionAffinityRouter"
    from ray._common.utils import import_attr

    from services.affinity import SessionAffinityRouter

    assert import_attr(cfg["request_router_class"]) is SessionAffinityRouter  # how Serve loads it


# -- the coordinator's side: one request's calls carry its session id ---------------------
class RecordingHandle:
    """Stands in for a DeploymentHandle: records ``options`` and ``remote`` calls."""

    def __init__(self, log: list, opts: dict | None = None) -> None:
        self.log, self.opts = log, opts or {}

    def options(self, **kw):
        return RecordingHandle(self.log, {**self.opts, **kw})

    def remote(self, *args):
        self.log.append(self.opts)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result([0.5] * len(args[0]) if self.opts["method_name"] == "score" else [])
        return fut


@pytest.mark.parametrize("session", ["req-1", ""])
def test_every_pool_call_of_a_request_carries_its_session(session):
    log: list = []
    models = PoolHandles(*(RecordingHandle(log) for _ in range(4))).models(session)

    async def steps():
        for _ in range(3):
            await models.draft.generate(["p"], GenerationOptions())
            await models.router.score([object()])
            await models.target.generate(["p"], GenerationOptions())
        await models.prm.score([object()])

    asyncio.run(steps())
    assert len(log) == 10
    assert [o["method_name"] for o in log[:3]] == ["generate", "score", "generate"]
    if session:
        assert all(o["session_id"] == session for o in log)
    else:
        assert all("session_id" not in o for o in log)


@pytest.mark.parametrize("timed", [False, True])
def test_a_requests_adapters_say_which_pools_it_called(timed):
    # The coordinator releases a finished request only on the pools it called (``called``).
    from types import SimpleNamespace

    from arbitrage_common.lookahead import DraftAhead

    load = SimpleNamespace(call_started=lambda t: None, call_finished=lambda *a, **k: None) if timed else None
    models = PoolHandles(*(RecordingHandle([]) for _ in range(4)), load=load).models("s")
    roles = ("draft", "target", "router", "prm")
    assert [getattr(models, role).called for role in roles] == [False] * 4

    async def steps():
        await models.draft.generate_ahead("p", GenerationOptions(), DraftAhead(1, 64, 4, 64))
        await models.router.score([object()])

    asyncio.run(steps())
    assert [getattr(models, role).called for role in roles] == [True, False, True, False]
    asyncio.run(models.target.generate(["p"], GenerationOptions()))
    assert models.target.called


def test_missing_scorer_pools_stay_missing():
    models = PoolHandles(RecordingHandle([]), RecordingHandle([])).models("s")
    assert models.router is None and models.prm is None


@pytest.mark.parametrize("over_grpc", [True, False])
def test_pool_calls_go_over_grpc_only_when_asked(over_grpc):
    # coordinator.pool_calls_over_grpc: every step call leaves with _by_reference=False (Serve's
    # direct gRPC channel); off, the handles keep Serve's default (actor tasks).
    log: list = []
    models = PoolHandles(*(RecordingHandle(log) for _ in range(4)), over_grpc=over_grpc).models("s")

    async def steps():
        await models.draft.generate(["p"], GenerationOptions())
        await models.router.score([object()])
        await models.target.generate(["p"], GenerationOptions())
        await models.prm.score([object()])

    asyncio.run(steps())
    assert len(log) == 4
    assert [o.get("_by_reference") for o in log] == ([False] * 4 if over_grpc else [None] * 4)


@pytest.mark.parametrize("limit", [2, None])
def test_merged_pools_share_one_call_slot_limit_only_when_asked(limit):
    # coordinator.pool_calls_in_flight: one CallSlots over every pool's merged calls.
    lanes = {role: 1 for role in ("draft", "target", "router", "prm")}
    handles = PoolHandles(*(RecordingHandle([]) for _ in range(4)), lanes=lanes, calls_in_flight=limit)
    slots = [merged.slots for merged in handles.merged.values()]
    assert len(slots) == 4
    if limit is None:
        assert slots == [None] * 4
    else:
        assert all(s is slots[0] for s in slots) and slots[0].limit == limit


def test_pools_left_out_of_slot_roles_never_wait_for_a_slot():
    # The coordinator leaves vLLM pools out: their engines batch continuously.
    lanes = {role: 1 for role in ("draft", "target", "router", "prm")}
    handles = PoolHandles(*(RecordingHandle([]) for _ in range(4)), lanes=lanes, calls_in_flight=2,
                          slot_roles={"router", "prm"})
    assert handles.merged["draft"].slots is None and handles.merged["target"].slots is None
    assert handles.merged["router"].slots is handles.merged["prm"].slots is not None
