"""User mistakes the CLI must answer with one clear line and a non-zero exit, never a traceback,
and output directories it must not wipe. Nothing here starts Ray or runs a sweep: the sweeps
are stubbed, so a guard that fails to fire shows as a wrong exit code, not as a long run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from arbitrage_common import config as C
from arbitrage_common.cli import config_cmd
from arbitrage_common.cli.main import build_parser, main
from arbitrage_common.evaluation import regime, stack
from arbitrage_common.evaluation.sweep import SweepPoint
from arbitrage_common.kuberay import targets

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "presets" / "llama-1b-8b.yaml"


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _preset(tmp_path: Path, edit, name: str = "edited.yaml") -> Path:
    data = yaml.safe_load(PRESET.read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# -- 1. bench / regime-map --out: never wipe a directory of the user's -----------------------
@pytest.fixture
def no_sweep(monkeypatch):
    """`bench`'s sweep stubbed out: records that it ran, writes nothing."""
    calls = []
    from arbitrage_common.evaluation import bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **kw: calls.append(a) or {"stub": True})
    return calls


def test_bench_refuses_a_directory_it_did_not_write_before_any_work(tmp_path, capsys, no_sweep):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "notes.txt").write_text("mine")
    assert main(["bench", "--out", str(runs), "--no-progress"]) == 1
    err = _err(capsys)
    assert f"--out: {runs} is a non-empty directory without bench.json" in err
    assert not no_sweep, "the sweep ran before --out was checked"
    assert (runs / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("out", ["file", "file/below"])
def test_bench_refuses_an_unusable_out_before_the_sweep(tmp_path, capsys, no_sweep, out):
    (tmp_path / "file").write_text("x")
    assert main(["bench", "--out", str(tmp_path / out), "--no-progress"]) == 1
    assert "--out:" in _err(capsys) and not no_sweep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no DIR.tmp left behind


def test_bench_accepts_an_empty_directory_and_an_earlier_runs(tmp_path, no_sweep, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["bench", "--out", str(tmp_path / "empty"), "--no-progress"]) == 0
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "bench.json").write_text("{}")
    assert main(["bench", "--out", str(tmp_path / "earlier"), "--no-progress"]) == 0
    assert len(no_sweep) == 2


def _points() -> list[SweepPoint]:
    return [SweepPoint(policy, None, acc, 0.5, 0.5, 1.0, 4) for policy, acc in (("draft", 0.5), ("target", 0.75))]


def test_a_second_bench_run_replaces_only_its_own_files(tmp_path):
    out = tmp_path / "bench"
    stack.write_outputs(_points(), out, {"run": 1}, answers=[{"a": 1}])
    assert (out / "answers.jsonl").is_file()
    (out / "notes.txt").write_text("mine")
    stack.write_outputs(_points(), out, {"run": 2})  # no answers this time
    assert json.loads((out / "bench.json").read_text())["run"] == 2
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "answers.jsonl").exists()  # the earlier run's file this run does not write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]  # no temporary directory left


def test_publish_merges_regime_cells_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "regime"
    (out / "old-cell").mkdir(parents=True)
    (out / "old-cell" / "bench.json").write_text(json.dumps({"files": ["points.csv", "bench.json"]}))
    (out / "old-cell" / "points.csv").write_text("old")
    (out / "old-cell" / "mine.txt").write_text("mine")
    (out / "regime.json").write_text(json.dumps({"files": ["regime.json", "old-cell", "../escape"]}))
    (tmp_path / "escape").write_text("outside")
    new = tmp_path / "new"
    (new / "cell").mkdir(parents=True)
    (new / "cell" / "bench.json").write_text("{}")
    (new / "regime.json").write_text(json.dumps({"files": ["regime.json", "cell"]}))
    stack.publish(new, out, regime.REGIME_MARKER)
    assert (out / "cell" / "bench.json").is_file() and (out / "regime.json").is_file()
    assert sorted(p.name for p in (out / "old-cell").iterdir()) == ["mine.txt"]  # only its own files went
    assert (tmp_path / "escape").read_text() == "outside"


def test_regime_map_refuses_a_directory_it_did_not_write_before_any_work(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "notes.txt").write_text("mine")
    # An empty models dir: were --out not checked first, the run would stop at --models-dir.
    assert main(["regime-map", "--out", str(runs), "--models-dir", str(tmp_path), "--no-progress"]) == 1
    assert f"--out: {runs} is a non-empty directory without regime.json" in _err(capsys)
    assert sorted(p.name for p in runs.iterdir()) == ["notes.txt"]


def test_regime_map_leaves_nothing_behind_when_interrupted(tmp_path, monkeypatch):
    models = tmp_path / "models"
    for name in ("prm-independent", "router-independent"):
        (models / name).mkdir(parents=True)

    def interrupted(tmp, *args):
        (tmp / "half.csv").write_text("partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(regime, "_run_cells", interrupted)
    with pytest.raises(KeyboardInterrupt):
        regime.run_regime_map(tmp_path / "out", 2, 0, ("math",), models)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


# -- 2 and 10. config check: an empty file and a malformed `applications` fail ----------------
@pytest.mark.parametrize("text,message", [
    ("", "(top level): expected a mapping (an AppConfig or a Serve YAML); the file is empty"),
    ("applications: []\n", "applications: expected a list of applications (mappings), got an empty list"),
    ("applications:\n", "applications: expected a list of applications (mappings), got nothing"),
    ("applications: 5\n", "applications: expected a list of applications (mappings), got int"),
    ("applications: [5]\n", "applications[0]: expected a mapping, got int"),
])
def test_config_check_fails_a_file_that_holds_no_config(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["config", "check", str(path)]) == 1
    assert f"{path}: {message}" in _err(capsys)


# -- 3. bad YAML names the file and the position ----------------------------------------------
@pytest.mark.parametrize("argv", [["serve", "--render", "--config"], ["k8s", "render", "--check", "--config"]])
def test_bad_yaml_names_the_file_and_the_position(tmp_path, capsys, argv):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  draft: {model: {path: x}\n")
    assert main([*argv, str(bad)]) == 1
    err = _err(capsys)
    assert f"arbitrage: error: {bad}: not YAML:" in err and "line 3, column 1" in err


# -- 4. output paths that are directories or under a file ----------------------------------------
@pytest.mark.parametrize("out,reason", [("adir", "Is a directory"), ("afile/x.yaml", "Not a directory")])
def test_render_to_an_unusable_path_is_one_line(tmp_path, capsys, out, reason):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    assert main(["serve", "--render", "-o", str(tmp_path / out)]) == 1
    assert _err(capsys).strip() == f"arbitrage: error: {tmp_path / out}: {reason}"


def test_k8s_render_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["k8s", "render", "--preset", "cpu-demo", "--out", str(tmp_path / "afile")]) == 1
    err = _err(capsys)
    assert err.startswith(f"arbitrage: error: {tmp_path / 'afile'}") and err.count("\n") == 1


def test_analyze_out_under_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    from arbitrage_common.evaluation import analyze

    monkeypatch.setattr(analyze, "analyze", lambda rows, **kw: {"stub": True})
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prm_draft": 0.5}\n')
    (tmp_path / "afile").write_text("x")
    assert main(["analyze", "--data", str(data), "--out", str(tmp_path / "afile" / "x.json")]) == 1
    assert _err(capsys).startswith(f"arbitrage: error: {tmp_path / 'afile'}")


# -- 5. Ctrl-C ----------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(config_cmd, "check_file", interrupted)
    try:
        rc = main(["config", "check", str(PRESET)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() (a traceback)")
    assert rc == 130
    assert _err(capsys) == "arbitrage: interrupted\n"


# -- 6. a preset that does not validate is not "unknown" -----------------------------------------
def test_a_preset_that_fails_validation_names_the_field_not_unknown(tmp_path, monkeypatch):
    bad = _preset(tmp_path, lambda d: d["cluster"].setdefault("draft", {}).update(memory="lots"))
    monkeypatch.setattr(targets, "preset_path", lambda name: bad)
    with pytest.raises(ValueError, match="cluster.draft.memory") as info:
        targets.target_config("llama-1b-8b")
    assert "unknown preset" not in str(info.value) and str(bad) in str(info.value)


# -- 7. clashing ports ----------------------------------------------------------------------------
def test_grpc_and_http_on_one_port_are_refused(tmp_path, capsys):
    with pytest.raises(ValidationError, match="grpc.port: 8000 is also http.port"):
        C.AppConfig(pools=C.default_config().pools, grpc=C.GRPCSpec(port=8000))
    path = _preset(tmp_path, lambda d: d.update(grpc={"port": 8000}, http={"port": 8000}))
    assert main(["config", "check", str(path)]) == 1
    assert f"{path}: grpc.port: 8000 is also http.port" in _err(capsys)


# -- 8. serve -o without --render ---------------------------------------------------------------
def test_serve_out_without_render_is_refused_before_starting_anything(tmp_path, capsys, monkeypatch):
    import services.local

    def start(*args, **kw):
        raise RuntimeError("the service was started")

    monkeypatch.setattr(services.local, "start", start)
    assert main(["serve", "-o", str(tmp_path / "x.yaml")]) == 1
    assert "-o/--out: only with --render" in _err(capsys)
    assert not (tmp_path / "x.yaml").exists()


# -- 9. Pod memory is a Kubernetes quantity -----------------------------------------------------
@pytest.mark.parametrize("group", ["draft", "head"])
def test_pod_memory_must_be_a_kubernetes_quantity(tmp_path, capsys, group):
    path = _preset(tmp_path, lambda d: d["cluster"].setdefault(group, {}).update(memory="lots"))
    assert main(["config", "check", str(path)]) == 1
    assert f"{path}: cluster.{group}.memory: 'lots' is not a Kubernetes quantity" in _err(capsys)
    assert main(["k8s", "render", "--config", str(path), "--out", str(tmp_path / "k8s")]) == 1
    assert f"cluster.{group}.memory" in _err(capsys) and not (tmp_path / "k8s").exists()


@pytest.mark.parametrize("value,ok", [("8Gi", True), ("512Mi", True), ("1.5G", True), ("1e9", True), ("64Mi", True),
                                      ("8GB", False), ("8gi", False), ("0", False), ("-1Gi", False),
                                      ("100", False), ("1m", False), ("1e3", False), ("63Mi", False)])
def test_memory_quantities(value, ok):
    from arbitrage_common.kuberay.spec import GroupSpec

    if ok:
        assert GroupSpec(memory=value).memory == value
    else:
        with pytest.raises(ValidationError, match="memory"):
            GroupSpec(memory=value)


# -- the smaller ones ----------------------------------------------------------------------------
def test_a_default_policy_without_its_pool_is_blamed_on_policy_default(tmp_path, capsys):
    path = _preset(tmp_path, lambda d: d["pools"].pop("router"))
    assert main(["config", "check", str(path)]) == 1
    assert f"{path}: policy.default: policy 'arbitrage' needs the router pool" in _err(capsys)


def test_an_unset_gpu_memory_utilization_is_reported_as_vllms_default(tmp_path):
    path = _preset(tmp_path, lambda d: d["pools"]["draft"]["model"]["engine"].pop("gpu_memory_utilization"))
    errors = config_cmd.check_file(path)["errors"]
    assert any(e.startswith("pools.draft.model.engine.gpu_memory_utilization: unset (vLLM: 0.92) exceeds")
               for e in errors), errors


def test_malformed_json_inputs_name_the_flag_and_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["plan", "--profile", str(bad), "--rate", "1", "--slo-ms", "100"]) == 1
    assert f"--profile: {bad}: not valid JSON" in _err(capsys)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prm_draft": 0.5}\n\nnot json\n')
    assert main(["analyze", "--data", str(rows)]) == 1
    assert f"--data: {rows}: not JSON Lines (line 3, column 1" in _err(capsys)


def test_plan_bench_that_is_not_json_names_it(tmp_path, capsys, monkeypatch):
    from arbitrage_common.cli import plan_cmd

    monkeypatch.setattr(plan_cmd, "load_profile", lambda path: object())
    bad = tmp_path / "bench.json"
    bad.write_text("")
    assert main(["plan", "--rate", "1", "--slo-ms", "100", "--bench", str(bad)]) == 1
    assert f"--bench: {bad}: not valid JSON" in _err(capsys)


def test_a_profile_that_is_a_directory_is_not_called_missing(tmp_path, capsys):
    assert main(["plan", "--profile", str(tmp_path), "--rate", "1", "--slo-ms", "100"]) == 1
    assert f"--profile: {tmp_path} is a directory, not a file" in _err(capsys)


def test_rsd_threshold_must_lie_in_the_unit_interval(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["analyze", "--data", str(tmp_path / "rows.jsonl"), "--rsd-threshold", "7"])
    assert info.value.code == 2 and "--rsd-threshold: must lie in [0, 1], got 7" in capsys.readouterr().err


def test_help_shows_defaults_but_not_empty_ones():
    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in dict.fromkeys(action.choices.values()):
                    yield from parsers(child)

    texts = [p.format_help() for p in parsers(build_parser())]
    every = "\n".join(texts)
    assert "(default: None)" not in every and "(default: False)" not in every and "(default: [])" not in every
    bench = next(t for t in texts if t.startswith("usage: arbitrage bench"))
    assert "(default: 200)" in bench and "(default: runs/bench)" in bench and "(default: 2000)" in bench


# -- 10. k8s render refuses what config check fails ----------------------------------------------
@pytest.mark.parametrize("edit", [
    # a fractional vLLM draft asking for more of its GPU than its share (the GPU rule of config check)
    lambda d: d["pools"]["draft"]["model"]["engine"].update(gpu_memory_utilization=0.9),
    # options Ray Serve itself refuses: the actor does not fit its first bundle
    lambda d: d["pools"]["target"].update(placement_group_bundles=[{"GPU": 1}]),
], ids=["gpu-utilization", "serve-options"])
def test_k8s_render_refuses_a_config_that_config_check_fails(tmp_path, capsys, edit):
    path = _preset(tmp_path, edit)
    assert main(["config", "check", str(path)]) == 1
    checked = [line for line in _err(capsys).splitlines() if line.startswith(f"{path}: ")]
    assert checked
    out = tmp_path / "k8s"
    assert main(["k8s", "render", "--config", str(path), "--out", str(out)]) == 1
    rendered = _err(capsys).splitlines()
    assert rendered == [f"arbitrage: error: {line}" for line in checked]  # the same lines, one per problem
    assert not out.exists()
    assert main(["k8s", "render", "--config", str(path), "--out", str(out), "--check"]) == 1
    assert _err(capsys).splitlines() == rendered


def test_k8s_render_still_renders_every_bundled_target(tmp_path, capsys):
    assert main(["k8s", "render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "base" / "llama-1b-8b" / "rayservice.yaml").is_file()


# -- 11. an invalid config is one line per problem, naming the file and the field, everywhere -----
def _two_bad_fields(d):
    d["pools"]["draft"]["max_batch_size"] = "sixteen"
    d["limits"]["max_steps"] = 0


@pytest.mark.parametrize("argv", [["serve", "--config"], ["serve", "--render", "--config"],
                                  ["k8s", "render", "--config"], ["plan", "profile", "--config"]])
def test_an_invalid_config_is_one_line_per_problem_naming_file_and_field(tmp_path, capsys, monkeypatch, argv):
    import services.local

    def start(*args, **kw):
        raise RuntimeError("the service was started")

    monkeypatch.setattr(services.local, "start", start)
    path = _preset(tmp_path, _two_bad_fields)
    assert main([*argv, str(path)]) == 1
    lines = _err(capsys).splitlines()
    assert lines == [(f"arbitrage: error: {path}: pools.draft.max_batch_size: Input should be a valid integer, "
                      f"unable to parse string as an integer"),
                     f"arbitrage: error: {path}: limits.max_steps: Input should be greater than 0"], lines
    # the lines `config check` prints for the same file
    assert main(["config", "check", str(path)]) == 1
    assert [f"arbitrage: error: {line}" for line in _err(capsys).splitlines() if line.startswith(str(path))] == lines


def test_load_config_raises_one_line_per_problem(tmp_path):
    path = _preset(tmp_path, _two_bad_fields)
    with pytest.raises(C.ConfigError) as exc:
        C.load_config(path)
    assert isinstance(exc.value, ValueError) and exc.value.file == str(path)
    assert [field for field, _ in exc.value.problems] == ["pools.draft.max_batch_size", "limits.max_steps"]
    assert str(exc.value).splitlines() == exc.value.lines() and "errors.pydantic.dev" not in str(exc.value)


def test_a_ray_serve_refusal_is_one_line(monkeypatch):
    """Ray's own messages (a pydantic dump among them) can span several lines; config check and
    k8s render print each problem on one."""
    from ray import serve

    from arbitrage_common.cli.config_cmd import _serve_option_problems

    def refuse(cls, **options):
        raise ValueError("1 validation error for DeploymentConfig\nmax_queued_requests\n  "
                         "max_queued_requests must be -1 (no limit) or a positive integer.")

    monkeypatch.setattr(serve, "deployment", refuse)
    errors, _ = _serve_option_problems(C.load_config(PRESET))
    assert [f.field for f in errors] == ["pools.draft", "pools.target", "pools.router", "pools.prm", "coordinator"]
    assert all(f.message == "Ray Serve refuses the deployment options: 1 validation error for DeploymentConfig "
                            "max_queued_requests max_queued_requests must be -1 (no limit) or a positive integer."
               for f in errors), errors


@pytest.mark.parametrize("argv,flag", [(["plan", "--rates", "4"], "--rates"),  # was "invalid choice: '4'"
                                       (["plan", "--rate=4", "--slo-mss", "300"], "--slo-mss"),
                                       (["serve", "--foo", "x"], "--foo")])
def test_a_misspelt_flag_before_an_optional_subcommand_is_named(capsys, argv, flag):
    with pytest.raises(SystemExit):
        main(argv)
    assert f"unrecognized arguments: {flag}" in _err(capsys)


def test_a_wrong_subcommand_is_still_an_invalid_choice(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "chek"])
    assert "invalid choice: 'chek'" in _err(capsys)


def test_serve_bench_refuses_an_unknown_policy_before_starting_anything(capsys, monkeypatch):
    import services.local

    def start(*args, **kw):
        raise RuntimeError("the service was started")

    monkeypatch.setattr(services.local, "start", start)
    with pytest.raises(SystemExit):
        main(["serve", "bench", "--policy", "nope"])
    assert "argument --policy: invalid choice: 'nope'" in _err(capsys)
