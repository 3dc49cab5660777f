"""Final-answer extraction (``\\boxed{}`` with nested braces) and grading with math-verify."""
from __future__ import annotations

import re
import threading

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_LINE = re.compile(r"(?:^|\n)\s*(?:final\s+answer|answer)\s*[:：]\s*(.+?)\s*$", re.IGNORECASE)
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*[:：]?\s*(.+?)\s*(?:\.\s*)?$", re.IGNORECASE)


class GradingUnavailable(RuntimeError):
    """``math-verify`` is not installed; grading has no fallback."""


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[start] == '{'`` and the index after it."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped character (\{ \} \\) never opens or closes a group
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None  # unbalanced


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``,
    braces nested to any depth; None when there is none or it never closes."""
    best: tuple[int, str] | None = None
    for cmd in _BOX_COMMANDS:
        pos = text.rfind(cmd)
        while pos != -1:
            after = pos + len(cmd)
            rest = text[after:]
            content: str | None = None
            if rest.startswith("{"):
                got = _braced(text, after)
                content = got[0] if got else None
            elif rest[:1] == " ":  # "\boxed 5": one token up to whitespace or '$'
                m = re.match(r" +([^\s$]+)", rest)
                content = m.group(1) if m else None
            # "\boxedx" (another command) or an unclosed brace: look further left
            if content is not None:
                if best is None or pos > best[0]:
                    best = (pos, content.strip())
                break
            pos = text.rfind(cmd, 0, pos)
    return best[1] if best else None


def extract_gsm8k_answer(solution: str) -> str | None:
    """GSM8K's gold answer: what follows the last ``####``, thousands separators removed."""
    if "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip()
    return answer.replace(",", "") or None


def extract_answer(text: str) -> str | None:
    """A model output's final answer: the last ``\\boxed{}``; else a GSM8K-style ``#### X``; else a
    last line ``Answer: X`` / ``Final answer: X``; else ``the answer is X``. None when absent."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    hashes = extract_gsm8k_answer(text)
    if hashes is not None:
        return hashes
    stripped = text.strip()
    for pattern in (_ANSWER_LINE, _ANSWER_IS):
        m = pattern.search(stripped)
        if m:
            return m.group(1).strip().strip("$").strip() or None
    return None


def _math_verify():
    try:
        import math_verify
    except ImportError as exc:  # no fallback grader: a silent approximation would skew accuracy
        raise GradingUnavailable(
            "grading needs math-verify: pip install 'arbitrage-serve[bench]' (or 'math-verify')") from exc
    return math_verify


def _as_latex(answer: str) -> str:
    answer = answer.strip()
    if answer.startswith(("$", "\\(", "\\[")):
        return answer
    return f"${answer}$"


def grade_answer(prediction: str, gold: str, *, extract: bool = True) -> bool:
    """True when ``prediction`` states an answer mathematically equal to ``gold``.

    ``prediction`` is a model output (its answer is found with :func:`extract_answer`) or, with
    ``extract=False``, a bare answer. ``gold`` is a bare answer (``\\frac{1}{2}``, ``42``,
    ``$x^2$``). Equality is math-verify's (symbolic, numeric, sets, intervals, ...). Outside the
    main thread (Ray actors, ``asyncio.to_thread``) math-verify's signal-based timeouts cannot
    work, so they are switched off there.
    """
    mv = _math_verify()
    answer = extract_answer(prediction) if extract else prediction.strip()
    if not answer or not gold.strip():
        return False
    timeouts = threading.current_thread() is threading.main_thread()
    parse_kw = {} if timeouts else {"parsing_timeout": None}
    verify_kw = {} if timeouts else {"timeout_seconds": None}
    gold_parsed = mv.parse(_as_latex(gold), **parse_kw)
    pred_parsed = mv.parse(_as_latex(answer), **parse_kw)
    if not gold_parsed or not pred_parsed:
        # math-verify could not read one side: equal only when the strings agree exactly
        return answer.strip().strip("$").strip() == gold.strip().strip("$").strip()
    return bool(mv.verify(gold_parsed, pred_parsed, **verify_kw))
