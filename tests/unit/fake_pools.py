"""Fake pool deployment handles for the real ``Coordinator``, no Ray (unit tests only).

Each handle answers the pool methods the coordinator calls (``generate``, ``generate_rows``,
``score``, ``score_rows``, ``release``, ``context_info``, ``count_tokens``) as the real pools
do, with a per-session "prefix cache" like theirs: a step hits when its session's cached
prefix starts the step's prefix. ``PoolRecord`` logs the sessions and releases it saw.
A prompt ``Start with N.`` ends with ``Answer`` after N steps (3 for any other prompt).
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from fakes import HandleResponse

from arbitrage_common.config import default_config
from arbitrage_common.interfaces import Generation
from services.coordinator import Coordinator

_STEPS = re.compile(r"Start with (\d+)\.")


@dataclass
class PoolRecord:
    """What the fake pools saw, shared by the four handles."""

    fail: dict[str, BaseException] = field(default_factory=dict)  # role -> raised by its step calls
    context: int = 4096  # each generator's context, in tokens
    tokens: int = 10  # what count_tokens answers
    affinity: list[tuple[str, str]] = field(default_factory=list)  # (role, session_id of the handle's options)
    steps: list[tuple[str, str | None, str, bool]] = field(default_factory=list)  # (role, session, prefix, hit)
    released: list[tuple[str, str]] = field(default_factory=list)  # (role, session)
    cache: dict[tuple[str, str], str] = field(default_factory=dict)  # (role, session) -> last prefix

    def step(self, role: str, session: str | None, prefix: str) -> None:
        cached = self.cache.get((role, session)) if session else None
        self.steps.append((role, session, prefix, cached is not None and prefix.startswith(cached)))
        if session:
            self.cache[(role, session)] = prefix

    def release(self, role: str, session: str) -> None:
        self.released.append((role, session))
        self.cache.pop((role, session), None)


class FakePool:
    def __init__(self, role: str, record: PoolRecord, method: str | None = None) -> None:
        self.role, self.record, self.method = role, record, method

    def options(self, method_name: str | None = None, session_id: str | None = None, **kw: Any) -> FakePool:
        if session_id:
            self.record.affinity.append((self.role, session_id))
        return FakePool(self.role, self.record, method_name or self.method)

    def remote(self, *args: Any) -> HandleResponse:
        return HandleResponse(self._answer(*args))

    async def _generation(self, prefix: str, session: str | None) -> Generation:
        await asyncio.sleep(0)  # concurrent requests interleave their steps
        if self.role in self.record.fail:
            raise self.record.fail[self.role]
        self.record.step(self.role, session, prefix)
        k = prefix.count("\n\n") - 1
        m = _STEPS.search(prefix)
        if k >= (int(m.group(1)) if m else 3):
            return Generation(f"Answer: {k}", 3, "eos", 0.0)
        return Generation(f"{self.role} step {k}", 3, "delimiter", 0.0)

    async def _scores(self, items: list[Any], session: str | None) -> list[float]:
        await asyncio.sleep(0)
        if self.role in self.record.fail:
            raise self.record.fail[self.role]
        for item in items:  # the scorers cache the problem and kept steps: those grow step by step
            self.record.step(self.role, session, "\n\n".join([item.problem, *(text for text, _ in item.history)]))
        return [0.9 for _ in items]

    async def _answer(self, *args: Any) -> Any:
        method = self.method
        if method == "context_info":
            return {"context": self.record.context}
        if method == "count_tokens":
            return self.record.tokens
        if method == "release":
            self.record.release(self.role, args[0])
            return True
        if method == "generate":
            prefixes, session = args[0], args[2] if len(args) > 2 else None
            return [await self._generation(p, session) for p in prefixes]
        if method == "generate_rows":
            prefix_lists, _, sessions, _, release = args
            for session in release:
                self.record.release(self.role, session)
            return [[await self._generation(p, s) for p in prefixes] for prefixes, s in zip(prefix_lists, sessions)]
        if method == "score":
            return await self._scores(args[0], args[1] if len(args) > 1 else None)
        if method == "score_rows":
            item_lists, sessions, release = args
            for session in release:
                self.record.release(self.role, session)
            return [await self._scores(items, s) for items, s in zip(item_lists, sessions)]
        raise AssertionError(f"unexpected pool method {method!r}")


def coordinator(record: PoolRecord | None = None, **sections: dict[str, Any]) -> Coordinator:
    """The real Coordinator (default config, ``sections`` merged into it) over fake pools;
    no pool retries, so a pool made to fail fails the request at once."""
    cfg = default_config().model_dump(mode="json")
    cfg["coordinator"]["pool_retries"] = 0
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    record = record or PoolRecord()
    coord = Coordinator(cfg, *(FakePool(role, record) for role in ("draft", "target", "router", "prm")))
    coord.pool_record = record

    # Readiness asks Serve's controller (serve.status() would start a local Ray): every pool runs here.
    async def nothing_down(names):
        return []

    async def serving():
        return True
    coord.health.down, coord.health.current = nothing_down, serving
    coord.health.running = {role: 1 for role in ("draft", "target", "router", "prm")}
    return coord


def count_records(coord: Coordinator) -> list[tuple[str, str, str]]:
    """Make ``coord.record`` also log (transport, policy label, status); returns that log."""
    seen: list[tuple[str, str, str]] = []
    original = coord.record

    def record(transport: str, policy: str | None, status: str, started: float | None = None) -> None:
        seen.append((transport, coord.policy_label(policy), status))
        original(transport, policy, status, started)
    coord.record = record
    return seen
