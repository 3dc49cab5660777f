"""Load-run summaries: accuracy and the threshold used, from hand-built records."""
from types import SimpleNamespace

from loadtests import records
from loadtests.records import Record
from loadtests.report import summarize


class Reply(SimpleNamespace):
    def HasField(self, name):
        return getattr(self, name, None) is not None


def test_accuracy_counts_graded_answers_and_threshold_used_is_reported(monkeypatch):
    monkeypatch.setattr(records, "EXPECTED", {"p1": 7, "p2": 9})
    recs = []
    for prompt, answer, threshold in (("p1", 7, 0.5), ("p2", 8, 0.7), ("p1", None, 0.6), ("unknown", 3, None)):
        rec = Record("grpc", 0.0, 100.0, "OK", steps=2, target_steps=1)
        records.grade(rec, prompt, Reply(answer=answer, threshold=threshold))
        recs.append(rec)
    recs.append(Record("grpc", 0.0, 5.0, "UNAVAILABLE"))
    out = summarize(recs, duration_s=10.0, slo_ms=None, timeline=[], settings={})
    assert out["accuracy"] == round(1 / 3, 4)  # p1 right, p2 wrong, p1 unanswered; unknown prompt ungraded
    assert out["threshold_used"]["n"] == 3 and out["threshold_used"]["mean"] == 0.6
    assert [r.correct for r in recs[:4]] == [True, False, False, None]


def _target_counters(proposed: float, accepted: float) -> list:
    from loadtests.service_metrics import parse

    text = "\n".join([
        'ray_serve_deployment_replica_healthy{application="a",deployment="target",replica="r1"} 1',
        f'ray_arbitrage_pool_proposal_tokens_total{{role="target",outcome="proposed"}} {proposed}',
        f'ray_arbitrage_pool_proposal_tokens_total{{role="target",outcome="accepted"}} {accepted}',
    ])
    return parse(text)


def test_proposal_tokens_kept_counts_the_run_only_and_skips_a_stopped_replicas_drop():
    from loadtests.service_metrics import ReplicaTracker, interval_figures, snapshot

    tracker, previous, timeline = ReplicaTracker(), {}, []
    # Counts since the replica started: 100/40 before the run (the baseline), then +50/+30,
    # then a replica stopped (the sum falls), then +20/+5 over the new sum.
    for t, (proposed, accepted) in enumerate([(100, 40), (150, 70), (60, 20), (80, 25)]):
        samples = _target_counters(proposed, accepted)
        pools, previous = interval_figures(snapshot(samples, "a"), tracker.update(samples, "a", now=t), previous)
        timeline.append({"t": t, "pools": pools})
    assert [row["pools"]["target"].get("proposal_tokens") for row in timeline] == [
        None, {"proposed": 50, "accepted": 30}, None, {"proposed": 20, "accepted": 5}]
    out = summarize([Record("grpc", 0.0, 100.0, "OK", steps=2, target_steps=1)], duration_s=10.0, slo_ms=None,
                    timeline=timeline, settings={})
    assert out["proposal_tokens_kept"] == {"target": round(35 / 70, 4)}
    assert summarize([], 10.0, None, timeline[:1], {})["proposal_tokens_kept"] == {}


def test_unsampled_pool_metrics_are_null_not_empty():
    out = summarize([Record("grpc", 0.0, 100.0, "OK", steps=2)], 10.0, None, None, {})
    assert out["proposal_tokens_kept"] is None and out["pools_over_time"] is None  # {} and [] mean "none ran"


def test_the_pool_metrics_note_tells_unsampled_empty_and_repeated_apart():
    from loadtests.report import pool_metrics_note

    assert "not sampled: pass --metrics URL" in pool_metrics_note(None, [])
    assert pool_metrics_note([{"t": 0, "pools": {}}], ["http://h:1/metrics"]).startswith(
        "--metrics http://h:1/metrics: no sample held a pool's metrics")
    row = {"t": 0, "pools": {"draft": {"replicas": 1}}}
    assert "4 sample(s) repeated" in pool_metrics_note([row], ["u"], repeats=4)
    assert "--metrics-interval-s 2" in pool_metrics_note([row], ["u"], repeats=4)
    assert pool_metrics_note([row], ["u"]) is None


def _draft_counters(items: float, batches: float) -> list:
    from loadtests.service_metrics import parse

    return parse("\n".join([
        'ray_serve_deployment_replica_healthy{application="a",deployment="draft",replica="r1"} 1',
        f'ray_arbitrage_pool_items_total{{role="draft"}} {items}',
        f'ray_arbitrage_pool_batch_size_count{{role="draft"}} {batches}',
    ]))


def test_the_sampler_leaves_out_samples_that_repeat_the_last_export():
    """Ray exports every 10 s by default: sampled every 2 s, four samples in five repeat the one
    before, and read as idle intervals (batch_size null) unless left out."""
    from loadtests.service_metrics import Sampler

    sampler = Sampler([], "a")
    for t, (items, batches) in enumerate([(10, 5), (10, 5), (10, 5), (40, 15), (40, 15)]):
        sampler.sample(_draft_counters(items, batches), now=sampler._t0 + 2 * t)
    assert [row["t"] for row in sampler.timeline] == [0, 6]
    # the first row has no row before it: 10 items in 5 calls since the service started is not its interval
    assert sampler.timeline[0]["pools"]["draft"]["batch_size"] is None
    assert sampler.timeline[1]["pools"]["draft"]["batch_size"] == 3.0  # 30 items in 10 calls since the baseline
    assert sampler.repeats == 3


def test_a_vllm_pools_engines_are_in_the_timeline_summed_and_the_fullest_kv_cache():
    from loadtests.service_metrics import ReplicaTracker, interval_figures, parse, snapshot

    def engines(preempted_a: float, preempted_b: float, kv_a: float, kv_b: float) -> list:
        lines = []
        for replica, preempted, kv, running in (("r1", preempted_a, kv_a, 3), ("r2", preempted_b, kv_b, 2)):
            tags = f'application="a",deployment="draft",replica="{replica}",role="draft"'
            lines += [f"ray_serve_deployment_replica_healthy{{{tags}}} 1",
                      f"ray_arbitrage_pool_engine_running_requests{{{tags}}} {running}",
                      f"ray_arbitrage_pool_engine_waiting_requests{{{tags}}} 1",
                      f"ray_arbitrage_pool_engine_kv_cache_usage{{{tags}}} {kv}",
                      f"ray_arbitrage_pool_engine_preempted_requests_total{{{tags}}} {preempted}"]
        lines.append('ray_arbitrage_pool_items_total{application="a",role="router"} 5')  # a transformers pool
        return parse("\n".join(lines))

    tracker, previous, rows = ReplicaTracker(), {}, []
    for t, sample in enumerate([engines(4, 1, 0.5, 0.25), engines(6, 2, 0.25, 0.75)]):
        pools, previous = interval_figures(snapshot(sample, "a"), tracker.update(sample, "a", now=t), previous)
        rows.append(pools)
    assert rows[0]["draft"]["engine"] == {"running": 5, "waiting": 2, "kv_cache_usage": 0.5, "preempted": None}
    assert rows[1]["draft"]["engine"] == {"running": 5, "waiting": 2, "kv_cache_usage": 0.75, "preempted": 3}
    assert "engine" not in rows[1]["router"]


def test_e2e_is_labelled_successes_only_and_e2e_all_counts_failures_at_their_time():
    """Was one e2e_ms, of the successes only: a run where the slowest hit the deadline read fast."""
    recs = [Record("grpc", 0.0, 100.0 + i, "OK", steps=2) for i in range(10)]
    recs += [Record("grpc", 0.0, 30000.0, "DEADLINE_EXCEEDED") for _ in range(10)]
    recs.append(Record("grpc", 0.0, 0.0, "DROPPED"))  # never sent: not a time
    out = summarize(recs, duration_s=10.0, slo_ms=None, timeline=None, settings={})
    assert out["e2e_ms"]["p95"] < 200 and out["e2e_ms"]["of"].startswith("succeeded requests only")
    assert out["e2e_ms_all"]["n"] == 20 and out["e2e_ms_all"]["p95"] == 30000.0
    assert out["e2e_ms_all"]["p50"] == (109.0 + 30000.0) / 2
    assert "a failed one at the time it took" in out["e2e_ms_all"]["of"]


def test_goodput_is_the_share_of_all_requests_answered_within_the_slo():
    """Goodput counts successes at or under slo_ms over every request (a failure, however
    fast, is not good); goodput_requests_per_s divides the same count by the duration."""
    recs = [Record("grpc", 0.0, ms, "OK", steps=1) for ms in (50.0, 100.0, 150.0, 400.0)]
    recs.append(Record("grpc", 0.0, 10.0, "UNAVAILABLE"))
    out = summarize(recs, duration_s=10.0, slo_ms=100.0, timeline=None, settings={})
    assert out["slo_ms"] == 100.0 and out["goodput"] == 0.4 and out["goodput_requests_per_s"] == 0.2
    no_slo = summarize(recs, duration_s=10.0, slo_ms=None, timeline=None, settings={})
    assert no_slo["goodput"] == 0.8


def test_an_unreachable_metrics_url_is_named_not_reported_as_a_url_without_pools(monkeypatch):
    """Was "no sample held a pool's metrics", as if the URL had answered without them."""
    import urllib.error

    from loadtests import service_metrics
    from loadtests.report import pool_metrics_note

    def refuse(url, timeout):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(service_metrics.urllib.request, "urlopen", refuse)
    sampler = service_metrics.Sampler(["http://h:1/metrics"], "a", interval_s=60)
    sampler.start()
    timeline = sampler.stop()
    assert sampler.unreachable == {"http://h:1/metrics": "[Errno 111] Connection refused"}
    note = pool_metrics_note(timeline, sampler.urls, sampler.repeats, sampler.unreachable)
    assert note.startswith("--metrics: never answered with metrics during the run: http://h:1/metrics ([Errno 111] "
                           "Connection refused); no pool metrics were sampled")
    assert "no sample held" not in note
    monkeypatch.undo()
    errors: dict = {}
    service_metrics.scrape(["localhost:1/metrics"], errors=errors)  # no scheme: urllib's ValueError, named too
    assert "unknown url type" in errors["localhost:1/metrics"]
