"""Evaluation tasks: problems plus a grader. The synthetic mixes and the real math datasets
are both a ``Task``, so one sweep computes the curve, the waste and the bound for each."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..loop import LoopRequest
from ..policies import make_policy


@dataclass(frozen=True)
class TaskProblem:
    id: str
    prompt: str
    gold: Any                   # the synthetic ``Problem`` (its checker needs it) or a gold answer
    budget: int | None = None   # kept-token budget; None: the loop's default


class Task(ABC):
    """``problems``, ``grade`` and the request limits. ``step_improved`` is the exact step
    checker's verdict where the task has one (else None: the PRM judges instead)."""

    name: str
    max_steps: int
    step_max_tokens: int | None = None
    problems: list[TaskProblem]

    @abstractmethod
    def grade(self, problem: TaskProblem, text: str) -> bool: ...

    def step_improved(self, problem: TaskProblem, history: Sequence[str], draft: str, target: str) -> bool | None:
        return None

    def request(self, problem: TaskProblem, policy: str, threshold: float | None, seed: int) -> LoopRequest:
        extra = {} if problem.budget is None else {"max_new_tokens": problem.budget}
        if self.step_max_tokens is not None:
            extra["step_max_tokens"] = self.step_max_tokens
        return LoopRequest(problem.prompt, make_policy(policy, threshold, seed=seed), max_steps=self.max_steps, **extra)

    def record(self, problem: TaskProblem, text: str, correct: bool) -> dict | None:
        """One line of ``answers.jsonl`` (datasets only: synthetic answers are exact)."""
        return None

    def describe(self) -> dict:
        return {"task": self.name, "n": len(self.problems)}


class SyntheticTask(Task):
    """A mix of the synthetic arithmetic task (``synthetic.MIXES``), graded exactly."""

    max_steps = 12

    def __init__(self, n: int, seed: int, mix: str = "math"):
        from ..synthetic import generate_mix

        self.mix, self.seed, self.name = mix, seed, f"synthetic-{mix}"
        self.problems = [TaskProblem(str(i), p.prompt, p) for i, p in enumerate(generate_mix(n, seed, mix))]

    def grade(self, problem: TaskProblem, text: str) -> bool:
        from ..synthetic import grade_answer

        return grade_answer(problem.gold, text)

    def step_improved(self, problem: TaskProblem, history: Sequence[str], draft: str, target: str) -> bool:
        from ..synthetic import check_step

        return not check_step(problem.gold, history, draft) and check_step(problem.gold, history, target)

    def describe(self) -> dict:
        return {"task": self.name, "mix": self.mix, "n": len(self.problems), "seed": self.seed}


class DatasetTask(Task):
    """A real math benchmark (MATH500, OlympiadBench, GSM8K), graded with math-verify."""

    max_steps = 40          # real solutions run to tens of paragraphs
    step_max_tokens = 512   # one paragraph; a step cut here ends the request

    def __init__(self, dataset: str, problems: Sequence, source: str, budgets: Sequence[int | None] | None = None):
        from ..datasets import grade_answer

        grade_answer("\\boxed{1}", "1")  # fail now, not after the sweep, when math-verify is missing
        self.name, self.dataset, self.source = dataset, dataset, source
        budgets = budgets or [None] * len(problems)
        self.problems = [TaskProblem(p.id, p.problem, p.answer, b) for p, b in zip(problems, budgets)]

    def grade(self, problem: TaskProblem, text: str) -> bool:
        from ..datasets import grade_answer

        return grade_answer(text, problem.gold)

    def record(self, problem: TaskProblem, text: str, correct: bool) -> dict:
        from ..datasets import extract_answer

        return {"id": problem.id, "gold": problem.gold, "extracted": extract_answer(text), "correct": correct}

    def describe(self) -> dict:
        return {"dataset": self.dataset, "source": self.source, "n": len(self.problems)}
