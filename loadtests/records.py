"""Per-request records of a load run: what locust's CSVs do not hold (time to first step,
time per step, steps written by the target, status names). One list per locust process,
written as JSONL when the run stops."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STARTED = time.time()
_RECORDS: list[Record] = []


@dataclass
class Record:
    transport: str
    start_s: float                    # seconds since the locust process started
    e2e_ms: float
    status: str                       # "OK", a gRPC status name, "HTTP_503", "DROPPED", ...
    ttfs_ms: float | None = None
    step_ms: list[float] = field(default_factory=list)   # gaps between streamed steps
    steps: int = 0
    target_steps: int = 0
    policy: str | None = None
    threshold: float | None = None    # the threshold the service reports it used
    correct: bool | None = None       # the answer against the problem's (None: unknown prompt)

    @property
    def ok(self) -> bool:
        return self.status == "OK"


EXPECTED: dict[str, int] = {}  # prompt -> correct answer, set by the locustfile


def grade(record: Record, prompt: str, reply) -> None:
    """Fill what a finished reply says of the request: threshold used and correctness."""
    if reply.HasField("threshold"):
        record.threshold = reply.threshold
    if prompt in EXPECTED:
        record.correct = reply.HasField("answer") and reply.answer == EXPECTED[prompt]


def grade_json(record: Record, prompt: str, result: dict) -> None:
    """``grade`` for a result in JSON (the HTTP transports): ``threshold`` and ``answer`` when set."""
    if result.get("threshold") is not None:
        record.threshold = result["threshold"]
    if prompt in EXPECTED:
        answer = result.get("answer")
        record.correct = answer is not None and answer == EXPECTED[prompt]


def add(record: Record) -> None:
    _RECORDS.append(record)


def since_start() -> float:
    return time.time() - STARTED


# Per greenlet (locust patches threading): the open loop's scheduled arrival of the request this
# greenlet is about to send.
_scheduled = threading.local()


def schedule_next(at_perf_counter: float | None) -> None:
    """The next request of this greenlet counts from ``at_perf_counter`` (its scheduled arrival)."""
    _scheduled.at = at_perf_counter


def request_start() -> tuple[float, float]:
    """(perf_counter, seconds since start) a request's times count from: its scheduled arrival
    when the open loop set one, so a send the scheduler made late counts as latency instead of
    vanishing (coordinated omission); else now. Taken once per scheduled arrival."""
    at, now = getattr(_scheduled, "at", None), time.perf_counter()
    _scheduled.at = None
    at = now if at is None or at > now else at
    return at, since_start() - (now - at)


def write(path: str | Path) -> int:
    with open(path, "w") as f:
        f.writelines(json.dumps(asdict(r)) + "\n" for r in _RECORDS)
    return len(_RECORDS)


def read(path: str | Path) -> list[Record]:
    return [Record(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
