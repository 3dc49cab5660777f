"""Steps as text: build the generation prefix, split text into steps, format scorer input,
and the rule that fits a scorer input into a model's context (``fit_scorer_input``).

Pure functions. A step is a paragraph; steps are separated by ``STEP_DELIMITER``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .interfaces import ScoreItem, Source

# The one definition: the synthetic task imports it from here, so the generic step code
# does not depend on the task.
STEP_DELIMITER = "\n\n"

# History annotation used by the router (paper's convention): who wrote each kept step.
SOURCE_TAGS: dict[Source, str] = {"draft": "Model 0: ", "target": "Model 1: "}


# How a problem becomes the head of a generator's prefix. "{problem}" is replaced by the
# stripped problem (str.replace, not str.format: templates may hold LaTeX braces). Chat
# models get their chat template here (see configs/presets/).
DEFAULT_PROMPT_TEMPLATE = "{problem}" + STEP_DELIMITER
PROBLEM_FIELD = "{problem}"


def render_prompt(prompt: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """The prompt template with the stripped problem filled in."""
    return template.replace(PROBLEM_FIELD, prompt.strip())


def build_prefix(prompt: str, steps: Sequence[str], template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """The text a generator continues: the rendered prompt, the kept steps, and a trailing
    delimiter so the model starts a fresh step."""
    head = render_prompt(prompt, template)
    if not steps:
        return head
    return head + join_steps(steps) + STEP_DELIMITER


def as_written(text: str, finish_reason: str) -> str:
    """A generated step as it followed its prefix: its text, plus the delimiter if it ended
    there (the best guess of another model's continuation of the same prefix)."""
    return text + STEP_DELIMITER if finish_reason == "delimiter" else text


def join_steps(steps: Sequence[str]) -> str:
    """Steps joined by the delimiter (the answer text of a request)."""
    return STEP_DELIMITER.join(steps)


def split_steps(text: str) -> list[str]:
    """Split text into steps on the delimiter, dropping blank paragraphs and the surrounding
    whitespace of each one. Inverse of ``join_steps`` for stripped, non-empty steps."""
    return [part.strip() for part in text.split(STEP_DELIMITER) if part.strip()]


def format_scorer_input(item: ScoreItem, annotate: bool) -> str:
    """The text a scorer reads: problem, history, candidate, separated by the delimiter.

    With ``annotate`` each history step is prefixed by its writer's tag ("Model 0: " for the
    draft, "Model 1: " for the target); the candidate is never annotated.
    """
    problem, history, candidate = scorer_pieces(item, annotate)
    return problem + "".join(history) + candidate


def scorer_pieces(item: ScoreItem, annotate: bool) -> tuple[str, list[str], str]:
    """``format_scorer_input`` in pieces: the problem, each history step with the delimiter
    before it, and the candidate with the delimiter before it (their concatenation is the input)."""
    history = [STEP_DELIMITER + ((SOURCE_TAGS[source] + text) if annotate else text) for text, source in item.history]
    return item.problem, history, STEP_DELIMITER + item.candidate


# -- context limits -----------------------------------------------------------------------
@dataclass(frozen=True)
class ScorerFit:
    """How a scorer input is cut to fit a model's context (token counts; see ``fit_scorer_input``)."""

    drop_history: int  # oldest history steps left out
    problem_tokens: int  # problem tokens kept; fewer than all: its middle is cut (``cut_middle``)
    candidate_tokens: int  # candidate tokens kept; fewer than all: its head is cut (``keep_tail``)


def fit_scorer_input(problem: int, history: Sequence[int], candidate: int, budget: int) -> ScorerFit:
    """The one truncation rule of every scorer, over token costs: the candidate first, then the
    problem, then the newest history steps, oldest dropped first, until ``budget`` is spent.

    A kept history is always the newest steps without a gap. Only when the problem and the
    candidate alone exceed the budget is the problem cut (its middle: the setup at its head
    and the question at its tail both stay), and only when the candidate alone does is the
    candidate cut (its head: scorers read the end of the step)."""
    room = max(budget, 0)
    candidate_kept = min(candidate, room)
    room -= candidate_kept
    problem_kept = min(problem, room)
    room -= problem_kept
    kept = 0
    for cost in reversed(history):
        if cost > room:
            break
        room -= cost
        kept += 1
    return ScorerFit(len(history) - kept, problem_kept, candidate_kept)


def cut_middle(text: str, spans: Sequence[tuple[int, int]], keep: int) -> str:
    """``text`` cut to its first ``ceil(keep/2)`` and last ``floor(keep/2)`` tokens (``spans``:
    each token's character span, in order)."""
    if keep >= len(spans):
        return text
    if keep <= 0:
        return ""
    head, tail = (keep + 1) // 2, keep // 2
    return text[: spans[head - 1][1]] + (text[spans[len(spans) - tail][0]:] if tail else "")


def keep_tail(text: str, spans: Sequence[tuple[int, int]], keep: int) -> str:
    """``text`` cut to its last ``keep`` tokens (``spans`` as for ``cut_middle``)."""
    if keep >= len(spans):
        return text
    return text[spans[len(spans) - keep][0]:] if keep > 0 else ""
