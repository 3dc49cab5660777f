"""`arbitrage bench --dataset`: the sweep on the hand-written MATH500 / OlympiadBench / GSM8K
fixtures. Scripted models check the grading exactly; one real run checks the command end to end."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from arbitrage_common.cli.main import main
from arbitrage_common.datasets import load_benchmark
from arbitrage_common.evaluation import dataset_bench as db
from arbitrage_common.evaluation.runners import EndpointRunner
from arbitrage_common.evaluation.stack import step_outcomes
from arbitrage_common.evaluation.sweep import summarize
from arbitrage_common.evaluation.tasks import DatasetTask
from arbitrage_common.interfaces import Generation
from arbitrage_common.steps import format_scorer_input

pytest.importorskip("math_verify")

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "datasets"
GRID = {"draft": [None], "target": [None], "rsd": [0.5], "arbitrage": [0.5], "oracle": [0.0]}
WRONG = "So the answer is $\\boxed{12345}$."


class ScriptedGenerator:
    """Step 0: a working line; step 1: the final answer (the gold for the target, a wrong one
    for the draft), then EOS."""

    def __init__(self, golds: dict[str, str], right: bool):
        self.golds, self.right = golds, right  # problem text -> gold answer

    def _one(self, prefix: str) -> Generation:
        problem = next(p for p in self.golds if prefix.startswith(p))
        if prefix[len(problem):].count("\n\n") <= 1:  # problems may hold blank lines themselves
            return Generation("Let us work it out.", 6, "delimiter", 0.001)
        text = f"So the answer is $\\boxed{{{self.golds[problem]}}}$." if self.right else WRONG
        return Generation(text, 8, "eos", 0.001)

    def generate_batch(self, prefixes, options):
        return [self._one(p) for p in prefixes]


class ScriptedScorer:
    """Low score for the draft's wrong final step, high otherwise (PRM and router alike)."""

    def texts(self, items):
        return [format_scorer_input(item, False) for item in items]

    def score_texts(self, texts):
        return [0.1 if text.endswith(WRONG) else 0.9 for text in texts]

    def score_batch(self, items):
        return self.score_texts(self.texts(items))


def _backends(problems):
    golds = {p.problem: p.answer for p in problems}
    return {"draft": ScriptedGenerator(golds, right=False), "target": ScriptedGenerator(golds, right=True),
            "prm": ScriptedScorer(), "router": ScriptedScorer()}


@pytest.mark.parametrize("dataset", ["math500", "olympiadbench", "gsm8k"])
def test_every_answer_is_graded_against_its_gold(tmp_path, dataset):
    problems = load_benchmark(dataset, FIXTURES / f"{dataset}.jsonl")
    out = tmp_path / "bench"
    result = db.run_dataset_bench(problems, out, _backends(problems), dataset=dataset, source="fixture", grid=GRID,
                                  confirm_n=2, show_progress=False)
    assert result["n"] == len(problems) == 5 and result["skipped"] == []
    acc = {(p["policy"], p["threshold"]): p["accuracy"] for p in result["points"]}
    # the target states every gold answer in its own form (2000 for "2,000", \frac, intervals, ...)
    assert acc[("target", None)] == 1.0 and acc[("draft", None)] == 0.0
    assert acc[("rsd", 0.5)] == 1.0 and acc[("oracle", 0.0)] == 1.0  # the wrong final step is rewritten
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == result["graded"] == len(problems) * 5
    assert {a["id"] for a in answers} == {p.id for p in problems}
    assert all(isinstance(a["correct"], bool) and a["extracted"] for a in answers)
    assert [a["correct"] for a in answers if a["policy"] == "draft"] == [False] * 5
    assert json.loads((out / "bench.json").read_text()) == result
    for name in ("points.csv", "accuracy_vs_latency.png", "answers.jsonl", "bench.json"):
        assert (out / name).is_file()
    assert result["wallclock"]["n"] == 2 and result["wallclock"]["rsd"]["accuracy"] == 1.0
    # No step checker on real problems: the PRM judges each target call (each one fixes a wrong answer).
    waste = {(w["policy"], w["threshold"]): w for w in result["waste_by_point"]}
    assert waste[("rsd", 0.5)]["target_calls_judged"] == len(problems) and waste[("rsd", 0.5)]["waste"] == 0.0


def test_problems_longer_than_the_context_are_skipped_and_named(tmp_path):
    problems = load_benchmark("gsm8k", FIXTURES / "gsm8k.jsonl")
    backends = _backends(problems)
    longest = max(problems, key=lambda p: len(p.problem))
    context = len(longest.problem) + 2 + db.CONTEXT_SLACK  # the longest leaves no room; the others do
    for role in ("draft", "target"):  # one token per character, as the bundled models
        backends[role].context = context
        backends[role].tokenizer = lambda text: SimpleNamespace(input_ids=list(text))
    budgets = [db.token_budget(backends, p.problem) for p in problems]
    too_long = [p.id for p, b in zip(problems, budgets) if b is None]
    assert too_long == [longest.id]
    assert all(b == context - len(p.problem) - 2 - db.CONTEXT_SLACK for p, b in zip(problems, budgets) if b is not None)
    result = db.run_dataset_bench(problems, tmp_path / "b", backends, dataset="gsm8k", source="fixture",
                                  grid={"draft": [None], "target": [None]}, show_progress=False)
    assert [s["id"] for s in result["skipped"]] == too_long
    assert result["n"] == len(problems) - len(too_long) and result["matched"] is None


def test_endpoint_runs_send_the_problem_and_grade_the_reply():
    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    problems = load_benchmark("math500", FIXTURES / "math500.jsonl", limit=2)
    task = DatasetTask("math500", problems, "fixture")
    sent = []

    def call(request):
        sent.append(request)
        right = request.prompt == problems[0].problem
        answer = f"So $\\boxed{{{problems[0].answer if right else 'nope'}}}$"
        steps = [pb.Step(text="Step.", source=pb.SOURCE_DRAFT),
                 pb.Step(text=answer, source=pb.SOURCE_TARGET, draft_discarded=True, discarded_draft_text="d")]
        usage = pb.Usage(draft_tokens_kept=3, draft_tokens_discarded=1, target_steps=1)
        return pb.GenerateResponse(text=f"Step.\n\n{answer}", steps=steps, usage=usage)

    runner = EndpointRunner(call, "t")
    traces = runner.run(task, "rsd", 0.7)
    assert [r.prompt for r in sent] == [p.problem for p in problems]
    assert all(r.policy == "rsd" and r.HasField("threshold") and r.threshold == 0.7 for r in sent)
    assert all(r.max_steps == task.max_steps for r in sent)
    point = summarize("rsd", 0.7, traces, [task.grade(p, t.text) for p, t in zip(task.problems, traces)])
    assert point.accuracy == 0.5 and point.acceptance_rate == 0.75 and point.target_step_fraction == 0.5
    assert traces[0].steps[1].discarded_draft_text == "d" and traces[0].steps[0].discarded_draft_text is None
    # No step checker and no PRM over an endpoint: waste is not judged rather than guessed.
    assert step_outcomes(task, runner, traces) == []
    runner.run(task, "draft", None)
    assert not sent[-1].HasField("threshold")


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "aime"], "argument --dataset: unknown dataset 'aime' (choose from gsm8k, math500, olympiadbench)"),
    (["--dataset", "math500", "--data-file", "no/such.jsonl"], "argument --data-file: no/such.jsonl: no such file"),
    (["--dataset", "gsm8k", "--limit", "0"], "argument --limit"),
])
def test_bad_arguments_name_the_argument(capsys, args, needle):
    with pytest.raises(SystemExit) as info:
        main(["bench", *args])
    assert info.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--limit", "3"], "--limit: only with --dataset"),
    (["--dataset", "gsm8k", "--mix", "olympiad"], "--mix: the synthetic task's mixes do not apply to --dataset"),
    (["--data-file", str(FIXTURES / "gsm8k.jsonl")], "--data-file: only with --dataset"),
    (["--dataset", "MATH-500", "--data-file", str(ROOT / "tests")], "--data-file: math500: "),
])
def test_misused_arguments_fail_before_any_model_loads(tmp_path, capsys, args, needle):
    assert main(["bench", *args, "--out", str(tmp_path / "out")]) == 1
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_runs_the_sweep_on_a_fixture_with_the_bundled_models(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for role in ("draft", "target", "router"):
        (models / role).symlink_to(ROOT / "models" / role)
    # The plumbing does not depend on which scorer is the PRM: the router checkpoint stands in.
    (models / "prm").symlink_to(ROOT / "models" / "router")
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "arbitrage_common.cli", "bench", "--dataset", "math500",
                           "--data-file", str(FIXTURES / "math500.jsonl"), "--limit", "2", "--models-dir", str(models),
                           "--out", str(out), "--confirm-n", "1", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["dataset"] == "math500" and result["n"] == 2
    assert {p["policy"] for p in result["points"]} == {"draft", "target", "rsd", "arbitrage", "oracle"}
    assert result["graded"] == 2 * len(result["points"])
    answers = (out / "answers.jsonl").read_text().splitlines()
    assert len(answers) == result["graded"]
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in result["points"])  # ~0 with tiny models: plumbing only
