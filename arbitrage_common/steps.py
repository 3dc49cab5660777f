"""Steps as text: build the generation prefix, split text into steps, format scorer input.

Pure functions. A step is a paragraph; steps are separated by ``STEP_DELIMITER``.
"""
from __future__ import annotations

from collections.abc import Sequence

from .interfaces import ScoreItem, Source

# Same value as arbitrage_common.synthetic.STEP_DELIMITER; kept here so the generic step
# code does not depend on the synthetic task.
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
    history = [(SOURCE_TAGS[source] + text) if annotate else text for text, source in item.history]
    return STEP_DELIMITER.join([item.problem, *history, item.candidate])
