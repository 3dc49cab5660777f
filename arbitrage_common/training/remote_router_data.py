"""`arbitrage router data --endpoint`: the router's training rows from a running service.

The oracle at threshold 0 is the data-collection procedure itself: both models write each
step, the PRM scores both, the trajectory continues with the better one, and every reply
step carries the advantage (``score``) and the draft step (its text, or
``discarded_draft_text`` when the target's step replaced it). So rows for real model pairs
come from the served preset on its GPUs, with its prompt template, engines and PRM; this
module only asks and writes. Without an exact step checker the correctness columns are None.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from .router_data import DEFAULT_LABEL_MARGIN


class OracleStep(NamedTuple):
    """What a row needs of one decided step (from a reply's ``Step`` or a ``StepRecord``)."""

    text: str
    source: str
    score: float | None
    discarded_draft_text: str | None
    draft_score: float | None = None


def rows_from_oracle(problem_id: int, problem: str, steps: Sequence[OracleStep],
                     label_margin: float = DEFAULT_LABEL_MARGIN) -> list[dict]:
    """One row per oracle step that has both a score and its draft step."""
    rows, history = [], []
    for index, step in enumerate(steps):
        draft = step.discarded_draft_text if step.source == "target" else step.text
        if step.score is not None and draft is not None:
            rows.append({"problem_id": problem_id, "problem": problem, "history": [list(h) for h in history],
                         "step_index": index, "tier": None, "draft_step": draft,
                         "target_step": step.text if step.source == "target" else None,
                         "advantage": step.score, "label": int(step.score > label_margin),
                         "prm_draft": step.draft_score,
                         "prm_target": None if step.draft_score is None else step.draft_score + step.score,
                         "draft_correct": None, "target_correct": None})
        history.append((step.text, step.source))
    return rows


def oracle_step(step) -> OracleStep:
    """A reply's ``Step`` (proto) as an ``OracleStep``."""
    from ..client import source_name

    def opt(name: str):
        return getattr(step, name) if step.HasField(name) else None

    return OracleStep(step.text, source_name(step), opt("score"), opt("discarded_draft_text"), opt("draft_score"))


def collect_remote_rows(endpoint: str, problems: Sequence[str], app: str | None = None, max_steps: int = 64,
                        label_margin: float = DEFAULT_LABEL_MARGIN, timeout_s: float = 600.0,
                        progress: Callable[[int], None] | None = None) -> list[dict]:
    """Runs ``oracle(0)`` on each problem over gRPC, one at a time; any failed request fails the
    whole collection (a dataset with silent holes would bias the router)."""
    from ..client import Client, build_request

    rows: list[dict] = []
    with Client(endpoint, app) as client:
        for i, problem in enumerate(problems):
            request = build_request(problem, "oracle", threshold=0.0, max_steps=max_steps,
                                    request_id=f"router-data-{i}")
            reply = client.generate(request, timeout=timeout_s)
            steps = [oracle_step(s) for s in reply.steps]
            rows += rows_from_oracle(i, problem, steps, label_margin)
            if progress is not None:
                progress(len(rows))
    return rows
