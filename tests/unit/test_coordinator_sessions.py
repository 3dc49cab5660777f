"""Session isolation: the pools' session key (replica affinity, merge lane, prefix cache, its
release) is the server's own per request, never the client's request_id, so two requests
that send one request_id neither share nor release each other's cache. Real Coordinator
over fake pools (tests/unit/fake_pools.py), no Ray."""
from __future__ import annotations

import asyncio

import pytest
from fake_pools import PoolRecord, coordinator

from services.validation import RequestFields, prepare

PROMPT_LONG, PROMPT_SHORT = "Start with 5. Add 1.", "Start with 2. Add 1."


async def _run(coord, fields: RequestFields):
    prepared, stream = await coord.open_stream(fields)
    async for _ in coord.steps_of(stream, prepared):
        pass
    return prepared, stream.result


async def _settle() -> None:
    """Let the fire-and-forget release tasks run."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.parametrize("merge_calls", [False, True])
@pytest.mark.parametrize("policy", ["draft", "arbitrage"])
def test_two_requests_with_one_request_id_keep_their_own_sessions(merge_calls, policy):
    record = PoolRecord()
    coord = coordinator(record, coordinator={"merge_calls": merge_calls, "pool_calls_in_flight": None})

    async def both():
        a = asyncio.create_task(_run(coord, RequestFields(prompt=PROMPT_LONG, policy=policy, request_id="job-1")))
        b = asyncio.create_task(_run(coord, RequestFields(prompt=PROMPT_SHORT, policy=policy, request_id="job-1")))
        (pa, ra), (pb, rb) = await asyncio.gather(a, b)
        await _settle()
        return pa, ra, pb, rb

    pa, ra, pb, rb = asyncio.run(both())
    assert pa.request_id == pb.request_id == "job-1"  # echoed as sent
    assert pa.session_id != pb.session_id and "job-1" not in (pa.session_id, pb.session_id)
    assert ra.finish_reason == rb.finish_reason == "eos" and len(ra.steps) > len(rb.steps)
    sessions = {session for _, session, _, _ in record.steps}
    assert sessions <= {pa.session_id, pb.session_id}
    if policy == "draft":  # (others draft ahead on speculation, which misses by design when discarded)
        # Every step after a request's first found its own cached prefix: the short request's
        # release (it ended first) and its steps never touched the long one's entry.
        hits = [hit for role, session, _, hit in record.steps if session == pa.session_id]
        assert len(hits) == len(ra.steps) and hits[1:] == [True] * (len(hits) - 1), hits
    assert {session for _, session in record.released} <= {pa.session_id, pb.session_id}
    if not merge_calls:  # merged pools carry the release on the lane's next call (or a timer)
        assert {session for _, session in record.released} == {pa.session_id, pb.session_id}
        assert {session for _, session in record.affinity} == {pa.session_id, pb.session_id}


def test_every_prepared_request_gets_a_fresh_session_id():
    from arbitrage_common.config import default_config

    cfg = default_config()
    first, second = (prepare(RequestFields(prompt=PROMPT_SHORT, request_id="same"), cfg) for _ in range(2))
    assert first.request_id == second.request_id == "same"
    assert first.session_id != second.session_id and len(first.session_id) == 32


def test_models_and_readiness_list_only_the_policies_the_server_allows():
    coord = coordinator(policy={"default": "arbitrage", "allowed": ["arbitrage", "draft"]})
    listed = [m["id"] for m in coord.list_models()["data"]]
    assert sorted(listed[1:]) == ["arbitrage", "draft"]
    assert sorted(coord.available) == ["arbitrage", "draft"]  # /healthz's "policies"


def test_a_release_sent_alone_to_a_failing_pool_goes_once(monkeypatch):
    """Without merged calls a release goes alone: best effort (the LRU bounds the caches), so a
    pool whose replica died is not retried with it, as a merged release sent alone is not."""
    from ray.exceptions import RayActorError

    record = PoolRecord()
    attempts: list[tuple[str, str]] = []

    def dead_replica(role: str, session: str) -> None:
        attempts.append((role, session))
        raise RayActorError()

    monkeypatch.setattr(record, "release", dead_replica)
    coord = coordinator(record, coordinator={"merge_calls": False, "pool_calls_in_flight": None, "pool_retries": 3,
                                             "retry_backoff_s": 0.001})

    async def one():
        prepared, _ = await _run(coord, RequestFields(prompt=PROMPT_SHORT, policy="draft"))
        for _ in range(50):
            await asyncio.sleep(0.002)
        return prepared

    prepared = asyncio.run(one())
    assert attempts == [("draft", prepared.session_id)]
