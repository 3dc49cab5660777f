"""Batched single-model solving and teacher-forced step checks on the synthetic task."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..interfaces import GenerationOptions
from ..steps import build_prefix
from ..synthetic import Problem


@dataclass
class Trajectory:
    problem: Problem
    steps: list[str] = field(default_factory=list)
    finish_reason: str = "max_steps"


def solve_batched(backend, problems: Sequence[Problem], batch_size: int = 32,
                  step_max_tokens: int = 64, options: GenerationOptions | None = None) -> list[Trajectory]:
    """Greedy step-by-step solutions, all problems advancing together in batches."""
    options = options or GenerationOptions(max_new_tokens=step_max_tokens)
    trajs = [Trajectory(p) for p in problems]
    open_ = [t for t in trajs]
    while open_:
        still = []
        for start in range(0, len(open_), batch_size):
            chunk = open_[start: start + batch_size]
            gens = backend.generate_batch([build_prefix(t.problem.prompt, t.steps) for t in chunk], options)
            for t, g in zip(chunk, gens):
                if g.text:
                    t.steps.append(g.text)
                if g.finish_reason != "delimiter":
                    t.finish_reason = g.finish_reason
                elif len(t.steps) >= len(t.problem.ops) + 3:  # runaway: more steps than any answer needs
                    t.finish_reason = "max_steps"
                else:
                    still.append(t)
        open_ = still
    return trajs


def teacher_forced_steps(backend, problems: Sequence[Problem], batch_size: int = 64,
                         step_max_tokens: int = 64) -> list[tuple[Problem, int, str]]:
    """(problem, k, generated step k) given the gold steps 1..k-1, for every step of every problem."""
    jobs = [(p, k) for p in problems for k in range(len(p.ops) + 1)]
    options = GenerationOptions(max_new_tokens=step_max_tokens)
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start: start + batch_size]
        prefixes = [build_prefix(p.prompt, p.solution_steps()[:k]) for p, k in chunk]
        out += [(p, k, g.text) for (p, k), g in zip(chunk, backend.generate_batch(prefixes, options))]
    return out
