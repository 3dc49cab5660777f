"""`arbitrage bench --endpoint`: the policy sweep over gRPC against the running service."""
from arbitrage_common.evaluation.remote import run_remote_bench


def test_remote_sweep_reports_points_and_the_matched_comparison(app_config):
    grid = {"draft": [None], "target": [None], "rsd": [0.5, 0.99], "arbitrage": [0.5, 0.01]}
    result = run_remote_bench(f"127.0.0.1:{app_config.grpc.port}", n=3, seed=99, app=app_config.name,
                              grid=grid, show_progress=False)
    points = {(p["policy"], p["threshold"]): p for p in result["points"]}
    assert set(points) == {("draft", None), ("target", None), ("rsd", 0.5), ("rsd", 0.99),
                           ("arbitrage", 0.5), ("arbitrage", 0.01)}
    assert points[("draft", None)]["target_step_fraction"] == 0.0
    assert points[("target", None)]["target_step_fraction"] == 1.0
    assert points[("target", None)]["acceptance_rate"] == 0.0
    assert all(p["n"] == 3 and p["latency_s_mean"] > 0 for p in result["points"])
    assert "latency_ratio_rsd_over_arbitrage" in result["matched"]
