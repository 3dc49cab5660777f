"""`arbitrage router data --endpoint`: oracle(0) replies over gRPC become router training rows."""
import itertools

from arbitrage_common.training.remote_router_data import collect_remote_rows
from arbitrage_common.training.router import router_item
from arbitrage_common.training.router_data import router_problems


def test_remote_rows_rebuild_the_oracle_trajectories(app_config):
    problems = [p.prompt for p in router_problems(4, 5)]
    rows = collect_remote_rows(f"127.0.0.1:{app_config.grpc.port}", problems, app=app_config.name, max_steps=12)
    assert {r["problem_id"] for r in rows} == {0, 1, 2, 3}
    for r in rows:
        assert r["problem"] == problems[r["problem_id"]] and r["draft_step"]
        assert r["label"] == int(r["advantage"] > 0.1) and -1.0 <= r["advantage"] <= 1.0
        # The oracle keeps the target's step exactly when it scored higher (threshold 0).
        assert (r["target_step"] is not None) == (r["advantage"] > 0)
        assert router_item(r).candidate == r["draft_step"]
    for pid in range(4):  # histories grow step by step with the kept steps
        mine = [r for r in rows if r["problem_id"] == pid]
        assert [len(r["history"]) for r in mine] == list(range(len(mine)))
        for prev, nxt in itertools.pairwise(mine):
            kept = prev["target_step"] if prev["target_step"] is not None else prev["draft_step"]
            source = "target" if prev["target_step"] is not None else "draft"
            assert nxt["history"][-1] == [kept, source]
