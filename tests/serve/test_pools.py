"""The pools batch dynamically: concurrent step calls share one forward pass."""
from __future__ import annotations

from serve_helpers import SLOW_APP, problems

from arbitrage_common.interfaces import GenerationOptions, ScoreItem


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


def test_scorer_pool_scores_in_order(serve_cluster):
    from ray import serve

    handle = serve.get_deployment_handle("prm", app_name=serve_cluster[0].name)
    items = [ScoreItem(p.prompt, (), "Answer: 1") for p in problems(3)]
    one_by_one = [handle.score.remote([item]).result()[0] for item in items]
    together = handle.score.remote(items).result()
    assert len(together) == 3 and all(0.0 <= s <= 1.0 for s in together)
    assert together == [pytest_approx(s) for s in one_by_one]


def pytest_approx(value):
    import pytest

    return pytest.approx(value, abs=1e-4)


def test_the_router_caches_a_requests_prefix_and_drops_it_at_the_end(serve_cluster, stub, main_metadata):
    """Served requests hit the router's per-request cache after their first step, and the
    coordinator releases each request's cache when it ends."""
    import time

    from ray import serve

    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    router = serve.get_deployment_handle("router", app_name=serve_cluster[0].name)
    before = router.info.remote().result()["scorer_cache"]
    if before is None:
        import pytest

        pytest.skip("the router checkpoint is not a causal-LM scorer (no prefix cache)")
    replies = [stub.Generate(pb.GenerateRequest(prompt=p.prompt, policy="arbitrage", max_steps=6),
                             metadata=main_metadata) for p in problems(3, seed=31)]
    assert all(len(r.steps) >= 2 for r in replies)
    deadline = time.monotonic() + 20
    while (after := router.info.remote().result()["scorer_cache"])["sessions"] > before["sessions"] \
            and time.monotonic() < deadline:
        time.sleep(0.2)  # the release is fire-and-forget
    assert after["hits"] > before["hits"], (before, after)
    assert after["sessions"] <= before["sessions"], (before, after)  # all three released
