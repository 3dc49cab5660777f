"""The pools batch dynamically: concurrent step calls share one forward pass."""
from __future__ import annotations

import time

import pytest
from serve_helpers import SLOW_APP, problems

from arbitrage_common.interfaces import GenerationOptions, ScoreItem
from arbitrage_common.steps import build_prefix


def test_concurrent_steps_share_one_forward_pass(serve_cluster):
    from ray import serve

    # The slow app's pools wait 2 s for a batch to fill: four calls sent together land in one.
    handle = serve.get_deployment_handle("draft", app_name=SLOW_APP)
    before = handle.info.remote().result()
    options = GenerationOptions(max_new_tokens=8)
    calls = [handle.generate.remote([p.prompt + "\n\n"], options) for p in problems(4)]
    outputs = [call.result() for call in calls]
    after = handle.info.remote().result()
    assert [len(o) for o in outputs] == [1, 1, 1, 1]
    assert after["batches"] - before["batches"] == 1
    assert after["items"] - before["items"] == 4 and after["max_batch_items"] >= 4


def test_serve_bench_counts_each_pools_forward_passes_and_rows(serve_cluster):
    """``serve bench``'s rows per batch: what each pool ran between two counts."""
    from ray import serve

    from services.bench import batches_between, pool_batches, rows_per_batch

    main, slow = serve_cluster
    assert set(pool_batches(main)) == {"draft", "target", "router", "prm"}
    before = pool_batches(slow)
    handle = serve.get_deployment_handle("draft", app_name=slow.name)
    calls = [handle.generate.remote([p.prompt + "\n\n"], GenerationOptions(max_new_tokens=8))
             for p in problems(4, seed=44)]
    assert all(len(call.result()) == 1 for call in calls)
    ran = batches_between(before, pool_batches(slow))
    assert ran == {"draft": (1, 4), "target": (0, 0)}  # the slow pools wait 2 s: one pass of four rows
    assert rows_per_batch(ran) == {"draft": 4.0}


def test_scorer_pool_scores_in_order(serve_cluster):
    from ray import serve

    handle = serve.get_deployment_handle("prm", app_name=serve_cluster[0].name)
    items = [ScoreItem(p.prompt, (), "Answer: 1") for p in problems(3)]
    one_by_one = [handle.score.remote([item]).result()[0] for item in items]
    together = handle.score.remote(items).result()
    assert len(together) == 3 and all(0.0 <= s <= 1.0 for s in together)
    assert together == [pytest_approx(s) for s in one_by_one]


def pytest_approx(value):
    return pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("role, field", [("router", "scorer_cache"), ("draft", "prefix_cache")])
def test_a_pool_caches_a_requests_prefix_and_drops_it_at_the_end(serve_cluster, stub, main_metadata, role, field):
    """Served requests hit the pool's per-request cache after their first step (the router's
    scored prefix, the draft's keys/values), and the coordinator releases each request's cache
    when it ends."""
    import time

    from ray import serve

    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    handle = serve.get_deployment_handle(role, app_name=serve_cluster[0].name)
    before = handle.info.remote().result()[field]
    # Both pools run the transformers backend here, which always keeps a per-request cache.
    assert before is not None, f"the {role} pool reports no {field}"
    replies = [stub.Generate(pb.GenerateRequest(prompt=p.prompt, policy="arbitrage", max_steps=6),
                             metadata=main_metadata) for p in problems(3, seed=31)]
    assert all(len(r.steps) >= 2 for r in replies)
    deadline = time.monotonic() + 20
    while (after := handle.info.remote().result()[field])["sessions"] > before["sessions"] \
            and time.monotonic() < deadline:
        time.sleep(0.2)  # the release is fire-and-forget
    assert after["hits"] - before["hits"] >= 3, (before, after)
    assert after["sessions"] <= before["sessions"], (before, after)  # all three released


def test_a_request_releases_only_the_pools_it_called(serve_cluster, stub, main_metadata):
    """Draft-only requests send the target pool nothing, not even their end-of-request release
    (an idle pool's autoscaler would count it as load); the draft pool still gets theirs."""
    import time

    from ray import serve

    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    app = serve_cluster[0].name
    draft, target = (serve.get_deployment_handle(role, app_name=app) for role in ("draft", "target"))
    time.sleep(1.0)  # earlier tests' end-of-request releases leave as calls of their own after 0.5 s idle
    target_calls, draft_sessions = (target.info.remote().result()["calls"],
                                    draft.info.remote().result()["prefix_cache"]["sessions"])
    for p in problems(3, seed=37):
        reply = stub.Generate(pb.GenerateRequest(prompt=p.prompt, policy="draft", max_steps=3), metadata=main_metadata)
        assert reply.usage.draft_steps >= 1 and reply.usage.target_steps == 0
    deadline = time.monotonic() + 20
    while (after := draft.info.remote().result()["prefix_cache"]["sessions"]) > draft_sessions \
            and time.monotonic() < deadline:
        time.sleep(0.2)  # the release is fire-and-forget
    time.sleep(1.0)  # a release-only call to the target would have left by now
    assert after <= draft_sessions
    assert target.info.remote().result()["calls"] == target_calls


def test_a_served_rewrite_verifies_the_draft_step(serve_cluster, stub, main_metadata):
    """Steps routed to the target carry the draft's step to the target pool, which runs it as
    its proposal and keeps part of it; the step equals what the target writes with none."""
    from ray import serve

    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    app = serve_cluster[0].name
    target = serve.get_deployment_handle("target", app_name=app)
    before = target.info.remote().result()["speculation"]
    held = _sessions(app)
    prompts = [p.prompt for p in problems(3, seed=47)]
    replies = [stub.Generate(pb.GenerateRequest(prompt=p, policy="arbitrage", threshold=0.0, max_steps=3),
                             metadata=main_metadata) for p in prompts]
    rewritten = [(p, r, i) for p, r in zip(prompts, replies) for i, s in enumerate(r.steps) if s.source == pb.SOURCE_TARGET]
    assert rewritten
    after = target.info.remote().result()["speculation"]
    assert after["proposed"] > before["proposed"] and after["accepted"] > before["accepted"]
    for prompt, reply, i in rewritten:
        prefix = build_prefix(prompt, [s.text for s in reply.steps[:i]])
        (plain,) = target.generate.remote([prefix], GenerationOptions(max_new_tokens=64)).result()
        assert plain.text == reply.steps[i].text
    deadline = time.monotonic() + 20
    while not _released(app, held) and time.monotonic() < deadline:
        time.sleep(0.2)  # the end-of-request releases are fire-and-forget: let none land in the next test
    assert _released(app, held)


def _released(app: str, held: dict[str, int]) -> bool:
    """No pool holds more request sessions than ``held`` (this test's requests have all left)."""
    return all(n <= held[role] for role, n in _sessions(app).items())


def _sessions(app: str) -> dict[str, int]:
    """Request sessions each pool's cache holds."""
    from ray import serve

    infos = {role: serve.get_deployment_handle(role, app_name=app).info.remote().result()
             for role in ("draft", "target", "router")}
    return {role: (info.get("prefix_cache") or info.get("scorer_cache") or {}).get("sessions", 0)
            for role, info in infos.items()}


def test_a_merged_call_equals_each_call_alone(serve_cluster):
    """generate_rows / score_rows (the coordinator's merged calls): every row gets what its
    call alone gets, with its own options; released sessions leave the scorer's cache."""
    from ray import serve

    app = serve_cluster[0].name
    draft = serve.get_deployment_handle("draft", app_name=app)
    prefixes = [[p.prompt + "\n\n"] for p in problems(3, seed=41)]
    options = [GenerationOptions(max_new_tokens=n) for n in (4, 64, 12)]
    alone = [draft.generate.remote(p, o).result() for p, o in zip(prefixes, options)]
    as_triples = lambda rows: [[(g.text, g.tokens, g.finish_reason) for g in row] for row in rows]
    merged = draft.generate_rows.remote(prefixes, options).result()
    assert as_triples(merged) == as_triples(alone)
    assert merged[0][0].tokens <= 4 < merged[1][0].tokens  # each row kept its own budget
    sessions = [f"merged-gen-{i}" for i in range(3)]
    held = draft.info.remote().result()["prefix_cache"]["sessions"]
    for _ in range(2):  # the second time over each session's cached prefix
        assert as_triples(draft.generate_rows.remote(prefixes, options, sessions).result()) == as_triples(alone)
    assert draft.info.remote().result()["prefix_cache"]["sessions"] == held + 3
    draft.generate_rows.remote([], [], [], [], sessions).result()  # a release-only merged call
    assert draft.info.remote().result()["prefix_cache"]["sessions"] == held

    router = serve.get_deployment_handle("router", app_name=app)
    items = [[ScoreItem(p.prompt, (), g[0].text)] for p, g in zip(problems(3, seed=41), alone)]
    one_by_one = [router.score.remote(i).result() for i in items]
    sessions = [f"merged-{i}" for i in range(3)]
    together = router.score_rows.remote(items, sessions).result()
    assert [[pytest_approx(s) for s in row] for row in one_by_one] == together
    cache = router.info.remote().result()["scorer_cache"]
    if cache is not None:
        held = cache["sessions"]
        router.score_rows.remote([], [], sessions).result()  # a release-only merged call
        assert router.info.remote().result()["scorer_cache"]["sessions"] == held - 3


def test_a_draft_call_with_lookahead_writes_the_next_steps_as_separate_calls_would(serve_cluster):
    """Draft lookahead in the pool (``generate`` with a plan, and a merged row with one): each
    step equals a call of its own on the prefix with the steps before it kept, and all of
    them arrive in one Serve call."""
    from ray import serve

    from arbitrage_common.lookahead import DraftAhead
    from arbitrage_common.steps import STEP_DELIMITER

    draft = serve.get_deployment_handle("draft", app_name=serve_cluster[0].name)
    options = GenerationOptions(max_new_tokens=48)
    plan = DraftAhead(extra_steps=2, tokens_left=400, steps_left=8, step_max_tokens=48)
    as_triples = lambda gens: [(g.text, g.tokens, g.finish_reason) for g in gens]
    for k, p in enumerate(problems(3, seed=43)):
        before = draft.info.remote().result()["calls"]
        if k % 2:
            (chained,) = draft.generate_rows.remote([[p.prompt + STEP_DELIMITER]], [options],
                                                    [f"ahead-{k}"], [plan]).result()
        else:
            chained = draft.generate.remote([p.prompt + STEP_DELIMITER], options, f"ahead-{k}", plan).result()
        assert draft.info.remote().result()["calls"] == before + 1
        prefix, alone = p.prompt + STEP_DELIMITER, []
        for _ in range(3):
            (gen,) = draft.generate.remote([prefix], options).result()
            alone.append(gen)
            if gen.finish_reason != "delimiter":
                break
            prefix += gen.text + STEP_DELIMITER
        assert len(alone) >= 2, "a problem whose first step ends the request tests nothing"
        assert as_triples(chained) == as_triples(alone)
    draft.generate_rows.remote([], [], [], [], [f"ahead-{k}" for k in range(3)]).result()


def test_concurrent_requests_leave_the_coordinator_as_merged_calls(serve_cluster, stub, main_metadata):
    """Under concurrency the coordinator merges step calls: the draft pool sees fewer calls
    than steps, and every reply equals the same request sent alone."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    draft = serve.get_deployment_handle("draft", app_name=serve_cluster[0].name)
    prompts = [p.prompt for p in problems(12, seed=43)]

    def ask(prompt):
        return stub.Generate(pb.GenerateRequest(prompt=prompt, policy="arbitrage"), metadata=main_metadata)

    alone = [ask(p) for p in prompts[:3]]
    before = draft.info.remote().result()
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, prompts))
    after = draft.info.remote().result()
    assert [r.text for r in together[:3]] == [r.text for r in alone]
    draft_steps = sum(1 for r in together for s in r.steps if s.source == pb.SOURCE_DRAFT or s.draft_discarded)
    assert after["items"] - before["items"] >= draft_steps
    assert after["calls"] - before["calls"] < after["items"] - before["items"]


def test_early_drafts_only_while_the_coordinator_is_not_busy(serve_cluster, stub, main_metadata, engine):
    """``limits.step_pipelining_max_inflight`` (2 in the test app): a request alone gets early
    drafts; of requests sent together, those that start with two others in flight run the
    plain loop. Either way the steps are the plain in-process loop's."""
    from concurrent.futures import ThreadPoolExecutor

    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    assert serve_cluster[0].limits.step_pipelining_max_inflight == 2
    prompts = [p.prompt for p in problems(8, seed=53)]

    def ask(prompt):
        return stub.Generate(pb.GenerateRequest(prompt=prompt, policy="arbitrage"), metadata=main_metadata)

    early = lambda r: r.usage.speculative_drafts_used + r.usage.speculative_drafts_discarded
    # An early draft is started after every step but a last one: any reply of 2+ steps had one.
    alone = [ask(p) for p in prompts[:2]]
    assert all(early(r) >= 1 for r in alone if len(r.steps) >= 2) and any(len(r.steps) >= 2 for r in alone)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert [early(r) for r in together if len(r.steps) >= 2].count(0) >= 1
    for prompt, reply in zip(prompts, together):
        plain = engine.run(prompt, "arbitrage")
        assert [(s.text, s.source == pb.SOURCE_TARGET) for s in reply.steps] \
            == [(s.text, s.source == "target") for s in plain.steps]


@pytest.mark.parametrize("merged", [False, True], ids=["handles", "merged"])
def test_the_loop_with_lookahead_over_served_pools_equals_the_plain_loop(serve_cluster, engine, merged):
    """Draft lookahead end to end through the coordinator's adapters (one ``generate`` with a
    plan per draft call, or a merged row carrying it): the steps of the in-process plain loop,
    in fewer draft and router calls than steps."""
    import asyncio
    import dataclasses
    import time

    from ray import serve

    from arbitrage_common.loop import run_loop
    from services.handles import PoolHandles
    from services.validation import RequestFields, prepare

    app = serve_cluster[0].name
    handles = {role: serve.get_deployment_handle(role, app_name=app) for role in ("draft", "target", "router", "prm")}
    pools = PoolHandles(**handles, lanes={"draft": 1, "router": 1} if merged else None)
    calls = lambda: {role: handles[role].info.remote().result()["calls"] for role in ("draft", "router")}
    for k, p in enumerate(problems(2, seed=47)):
        request = prepare(RequestFields(prompt=p.prompt, policy="arbitrage"), engine.cfg).request
        time.sleep(1.0)  # earlier tests' end-of-request releases leave as calls of their own after 0.5 s idle
        before = calls()
        served = asyncio.run(run_loop(dataclasses.replace(request, lookahead=2, pipeline=False),
                                      pools.models(f"la-{merged}-{k}")))
        after = calls()
        plain = engine.run(p.prompt, "arbitrage")
        assert [(s.text, s.source) for s in served.steps] == [(s.text, s.source) for s in plain.steps]
        assert [s.score for s in served.steps] == [pytest_approx(s.score) for s in plain.steps]
        # a step from the stash needed no call; every other step one draft and one router call
        used = served.usage.speculative_drafts_used
        assert after == {"draft": before["draft"] + len(served.steps) - used,
                         "router": before["router"] + len(served.steps) - used}
        if len(served.steps) >= 2 and served.steps[0].source == "draft":
            assert used >= 1
