"""Seeded generator of multi-step arithmetic problems with scratchpad solutions.

Format (see docs/TASK.md): the problem is one line of operations on a running
value; each solution step is one paragraph showing partial results; the last
paragraph is ``Answer: N``. Paragraphs are separated by ``STEP_DELIMITER``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from ..steps import STEP_DELIMITER

Tier = Literal["easy", "medium", "hard"]
OpKind = Literal["add", "sub", "mul", "teen"]

_VERB = {"add": "Add", "sub": "Subtract", "mul": "Multiply by", "teen": "Multiply by"}


@dataclass(frozen=True)
class Op:
    kind: OpKind
    operand: int

    def text(self) -> str:
        return f"{_VERB[self.kind]} {self.operand}."


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[Op, ...]

    @property
    def prompt(self) -> str:
        """Problem text; the solution starts after one STEP_DELIMITER."""
        return " ".join([f"Start with {self.start}."] + [op.text() for op in self.ops])

    def values(self) -> list[int]:
        """Running value before op 0, after op 0, ..., after the last op."""
        out = [self.start]
        for op in self.ops:
            out.append(apply_op(out[-1], op))
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def solution_steps(self) -> list[str]:
        vals = self.values()
        steps = [render_step(v, op) for v, op in zip(vals, self.ops)]
        return steps + [answer_step(vals[-1])]

    def step_tiers(self) -> list[Tier]:
        vals = self.values()
        return [op_tier(v, op) for v, op in zip(vals, self.ops)] + ["easy"]


def apply_op(value: int, op: Op) -> int:
    if op.kind == "add":
        return value + op.operand
    if op.kind == "sub":
        return value - op.operand
    return value * op.operand


def render_step(value: int, op: Op) -> str:
    """The canonical scratchpad line for applying ``op`` to ``value``."""
    b = op.operand
    if op.kind == "add":
        mid = value + (b // 10) * 10
        return f"{value} + {b} = {mid} + {b % 10} = {mid + b % 10}"
    if op.kind == "sub":
        mid = value - (b // 10) * 10
        return f"{value} - {b} = {mid} - {b % 10} = {mid - b % 10}"
    if op.kind == "mul":
        tens, units = (value // 10) * 10 * b, (value % 10) * b
        return f"{value} * {b} = {tens} + {units} = {tens + units}"
    # teen: value*10 + tens(value)*u*10 + units(value)*u, u = b - 10
    u = b - 10
    a, t, w = value * 10, (value // 10) * 10 * u, (value % 10) * u
    return f"{value} * {b} = {a} + {t} + {w} = {a + t + w}"


def answer_step(value: int) -> str:
    return f"Answer: {value}"


def op_tier(value: int, op: Op) -> Tier:
    if op.kind == "teen":
        return "hard"
    if op.kind == "mul":
        return "medium"
    if op.kind == "add":
        return "medium" if value % 10 + op.operand % 10 >= 10 else "easy"
    return "medium" if value % 10 < op.operand % 10 else "easy"


def _random_op(rng: random.Random, value: int) -> Op:
    choices: list[OpKind] = ["add", "sub", "mul"]
    while True:
        kind = rng.choice(choices)
        if kind == "add" and value <= 89:
            return Op("add", rng.randint(10, 99 - value))
        if kind == "sub" and value >= 10:
            return Op("sub", rng.randint(10, value))
        if kind == "mul" and 1 <= value <= 49:
            return Op("mul", rng.randint(2, min(9, 99 // value)))


def generate_problem(rng: random.Random, hard_prob: float = 0.2) -> Problem:
    """2-4 easy/medium ops on a value kept in 0..99, then a hard op with ``hard_prob``."""
    value = rng.randint(10, 99)
    start, ops = value, []
    for _ in range(rng.randint(2, 4)):
        op = _random_op(rng, value)
        ops.append(op)
        value = apply_op(value, op)
    if value >= 10 and rng.random() < hard_prob:
        ops.append(Op("teen", rng.randint(11, 19)))
    return Problem(start, tuple(ops))


def generate_problems(n: int, seed: int, hard_prob: float = 0.2) -> list[Problem]:
    rng = random.Random(seed)
    return [generate_problem(rng, hard_prob) for _ in range(n)]


# Problem mixes: ``math`` is the task the LMs were trained on (a hard final step in ~20% of
# problems); ``olympiad`` gives every problem a hard step (only the final operation can be
# hard: the LMs never saw a hard step elsewhere).
MIXES = {"math": 0.2, "olympiad": 1.0}


def has_hard_step(problem: Problem) -> bool:
    return "hard" in problem.step_tiers()


def generate_mix_problem(rng: random.Random, mix: str) -> Problem:
    """One problem of ``mix``; olympiad problems are redrawn until they hold a hard step (a
    chain that ends below 10 gets none)."""
    if mix not in MIXES:
        raise ValueError(f"mix: unknown mix {mix!r} (choose from {', '.join(MIXES)})")
    while True:
        problem = generate_problem(rng, MIXES[mix])
        if mix != "olympiad" or has_hard_step(problem):
            return problem


def generate_mix(n: int, seed: int, mix: str = "math") -> list[Problem]:
    """``n`` problems of ``mix``; ``math`` equals ``generate_problems(n, seed)``."""
    rng = random.Random(seed)
    return [generate_mix_problem(rng, mix) for _ in range(n)]


def parse_mixes(text: str) -> tuple[str, ...]:
    """``math``, ``olympiad`` or a comma list (problems alternate between the mixes)."""
    mixes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in mixes if m not in MIXES]
    if not mixes or bad:
        raise ValueError(f"mix: unknown mix {', '.join(bad) or repr(text)} (choose from {', '.join(MIXES)}, "
                         f"or a comma list of them)")
    return mixes


def solution_text(problem: Problem) -> str:
    return STEP_DELIMITER.join(problem.solution_steps())


def parse_prompt(prompt: str) -> Problem:
    """Inverse of ``Problem.prompt``; raises ValueError naming what is wrong."""
    parts = [p.strip() for p in prompt.strip().split(".") if p.strip()]
    if not parts or not parts[0].startswith("Start with "):
        raise ValueError("prompt: must begin with 'Start with N.'")
    start = int(parts[0][len("Start with "):])
    ops = []
    for part in parts[1:]:
        for kind, verb in (("mul", "Multiply by"), ("add", "Add"), ("sub", "Subtract")):
            if part.startswith(verb + " "):
                operand = int(part[len(verb) + 1:])
                ops.append(Op("teen" if kind == "mul" and operand >= 10 else kind, operand))
                break
        else:
            raise ValueError(f"prompt: unknown operation {part!r}")
    return Problem(start, tuple(ops))
