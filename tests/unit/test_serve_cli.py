"""`arbitrage serve --render`, `arbitrage serve bench`, `arbitrage generate`: the parts that need no cluster."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from arbitrage_common.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_render_prints_the_committed_serve_config(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["serve", "--config", "configs/local-cpu.yaml", "--render"]) == 0
    assert capsys.readouterr().out == (ROOT / "configs" / "serve-local-cpu.yaml").read_text()


def test_render_to_a_file(tmp_path):
    out = tmp_path / "serve.yaml"
    assert main(["serve", "--config", str(ROOT / "configs" / "gpu-example.yaml"), "--render", "-o", str(out)]) == 0
    assert "services.app:build_app" in out.read_text()


def test_serve_parsers():
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert args.config is None and args.serve_cmd is None
    args = parser.parse_args(["serve", "bench", "--endpoint", "h:9", "--concurrency", "4"])
    assert (args.serve_cmd, args.endpoint, args.concurrency) == ("bench", "h:9", 4)
    args = parser.parse_args(["generate", "Start with 1.", "--stream", "--policy", "rsd", "--threshold", "0.3"])
    assert (args.prompt, args.stream, args.policy, args.threshold) == ("Start with 1.", True, "rsd", 0.3)


def test_generate_without_a_service_fails_cleanly(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["generate", "Start with 1.", "--endpoint", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_missing_checkpoint_fails_before_starting_ray(tmp_path, capsys):
    cfg = tmp_path / "app.yaml"
    cfg.write_text("pools:\n  draft: {model: {path: /nonexistent/draft}}\n  target: {model: {path: /nonexistent/t}}\n"
                   "policy: {default: draft}\n")
    assert main(["serve", "--config", str(cfg)]) == 1
    assert "/nonexistent/draft" in capsys.readouterr().err


def test_bench_scaling_rounds_give_both_loads_the_same_problems_in_a_time_symmetric_order():
    from collections import Counter

    from services.bench import scaling_rounds

    first, second = [f"a{i}" for i in range(8)], [f"b{i}" for i in range(8)]
    rounds = scaling_rounds(first, second, 16)
    by_load = {load: Counter() for load, _, _ in rounds}
    for load, prompts, clients in rounds:
        assert clients == {"one": 1, "many": 16}[load]
        by_load[load].update(prompts)
    assert set(by_load) == {"one", "many"}
    assert by_load["one"] == by_load["many"] == Counter(first + second)  # the same work, each problem once per load
    loads = [load for load, _, _ in rounds]
    assert loads == loads[::-1] and loads[0] == "many"  # N, 1 | 1, N: mirrored in time


def test_bench_json_stdout_holds_the_figures_alone(capsys, monkeypatch):
    import json

    import services.bench

    def fake_bench(cfg, **kwargs):
        print("(raylet) a log line the cluster forwards")  # what Ray prints while the bench runs
        return {"throughput_scaling": 2.5}

    monkeypatch.setattr(services.bench, "run_serve_bench", fake_bench)
    assert main(["serve", "bench", "--endpoint", "h:9", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"throughput_scaling": 2.5}
    assert "(raylet) a log line" in err


def test_bench_repeats_reach_the_bench_and_must_be_positive(capsys, monkeypatch):
    import pytest

    import services.bench

    seen = {}

    def fake_bench(cfg, **kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(services.bench, "run_serve_bench", fake_bench)
    assert main(["serve", "bench", "--endpoint", "h:9", "--repeats", "3", "--json"]) == 0
    assert seen["repeats"] == 3
    assert main(["serve", "bench", "--endpoint", "h:9", "--json"]) == 0
    assert seen["repeats"] == 1
    with pytest.raises(SystemExit) as exc:
        main(["serve", "bench", "--endpoint", "h:9", "--repeats", "0"])
    assert exc.value.code == 2
    assert "--repeats" in capsys.readouterr().err


def test_bench_scaling_spread_is_each_repeats_ratio_and_their_spread():
    from services.bench import scaling_spread

    # seconds for the same requests at each load: ratios 30/10 = 3.0 and 26/10 = 2.6
    spread = scaling_spread([{"one": 30.0, "many": 10.0}, {"one": 26.0, "many": 10.0}])
    assert spread == {"throughput_scaling_by_repeat": [3.0, 2.6], "throughput_scaling_repeat_mean": 2.8,
                      "throughput_scaling_repeat_sd": 0.283, "throughput_scaling_repeat_se": 0.2}


def test_bench_busy_cpu_counts_work_but_not_idle_iowait_or_steal():
    import pytest

    from services.bench import busy_cpu_seconds

    # user nice system idle iowait irq softirq steal guest guest_nice, in ticks of 1/100 s
    stat = ("cpu  1000 200 300 9000 400 10 20 500 70 0\n"
            "cpu0 500 100 150 4500 200 5 10 250 35 0\n"
            "intr 12345 0 0\n")
    assert busy_cpu_seconds(stat, 100) == pytest.approx(15.3)  # 1000 + 200 + 300 + 10 + 20 ticks
    with pytest.raises(ValueError, match="cpu"):
        busy_cpu_seconds("intr 1 2 3\n", 100)


def test_bench_rows_per_batch_is_each_pools_rows_over_its_forward_passes_between_two_counts():
    from services.bench import batches_between, rows_per_batch

    before = {"draft": (10, 10), "router": (4, 4), "prm": (2, 2)}
    after = {"draft": (14, 31), "router": (7, 28), "prm": (2, 2), "target": (3, 7)}
    ran = batches_between(before, after)
    assert ran == {"draft": (4, 21), "router": (3, 24), "prm": (0, 0), "target": (3, 7)}
    # the prm ran nothing and is left out; a pool first counted after `before` starts from zero
    assert rows_per_batch(ran) == {"draft": 5.25, "router": 8.0, "target": 2.33}


def test_serve_says_where_its_metrics_are_and_how_often_they_change():
    from arbitrage_common.cli.serve_cmd import metrics_interval_s, metrics_line
    from services.local import metrics_urls

    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.5", "MetricsExportPort": 44217},
             {"Alive": False, "NodeManagerAddress": "10.0.0.6", "MetricsExportPort": 44218}]
    urls = metrics_urls(nodes)
    assert urls == ["http://10.0.0.5:44217/metrics"]  # the dead node is left out
    assert metrics_interval_s(None, {}) == 10.0 and metrics_interval_s(None, {"RAY_metrics_report_interval_ms": "2000"}) == 2.0
    assert metrics_interval_s(3.0, {"RAY_metrics_report_interval_ms": "2000"}) == 3.0
    line = metrics_line(urls, 10.0)
    assert "http://10.0.0.5:44217/metrics" in line and "exported every 10 s" in line
    assert "--metrics-interval-s 2" in line and "--metrics-interval-s" not in metrics_line(urls, 2.0)
    assert "the cluster's export interval" in metrics_line(urls, None)


def test_metrics_interval_reaches_the_local_cluster_and_is_refused_with_address(monkeypatch, capsys):
    import os

    from services import local

    seen = []

    def start(*a, **kw):
        seen.append(os.environ.get("RAY_metrics_report_interval_ms"))
        raise KeyboardInterrupt  # stop before anything runs

    monkeypatch.setattr(local, "start", start)
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "10000")  # restored after the test
    assert main(["serve", "--metrics-interval-s", "2"]) == 130
    assert seen == ["2000"]  # Ray's processes read it when the local cluster starts
    assert main(["serve", "--address", "ray://h:10001", "--metrics-interval-s", "2"]) == 1
    assert "--metrics-interval-s: a local cluster only" in capsys.readouterr().err and len(seen) == 1


def test_serve_flags_given_before_bench_apply_to_it_or_are_refused(capsys):
    """`serve --backend vllm bench` benched the transformers pools: argparse's subcommand defaults
    overwrote the flags given to `serve`."""
    args = build_parser().parse_args(["serve", "--config", "a.yaml", "--backend", "vllm", "bench"])
    assert (args.serve_cmd, args.config, args.backend) == ("bench", "a.yaml", "vllm")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--render", "bench"])
    assert "--render: a `serve` flag; `serve bench` does not take it" in capsys.readouterr().err
