"""Readiness of one coordinator replica: do the pools its default policy needs each have a
running replica? Asked of the Serve controller (``serve.status()``), which knows each
replica's state, so a pool that is still loading (a vLLM engine takes about a minute on
CPU) or whose replicas all died reads as not serving, while a busy pool still reads as
serving (a probe call would queue behind its work and time out).

When the controller cannot be asked (it is restarting after a crash), the last answer
stands: traffic flows without the controller, and so should readiness.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from arbitrage_common.policies import POLICIES

logger = logging.getLogger("ray.serve")
STATUS_TIMEOUT_S = 5.0
DOWN_PROBE_S = 1.0


def pools_needed(policy: str) -> list[str]:
    """The pools a policy's requests call: both generators, plus its scorer (PRM for oracle)."""
    cls = POLICIES[policy]
    needed = ["draft", "target"]
    if cls.scorer is not None:
        needed.append(cls.scorer)
    if cls.runs_both and "prm" not in needed:
        needed.append("prm")
    return needed


def running_pools(deployments: dict, names: Iterable[str]) -> dict[str, int]:
    """Running replicas per named deployment (0 when the controller does not list it)."""
    out = {}
    for name in names:
        status = deployments.get(name)
        out[name] = int(status.replica_states.get("RUNNING", 0)) if status is not None else 0
    return out


def serving_app_name(configured: str) -> str:
    """The application Serve runs this replica in: readiness must look its pools up there, and
    Serve's own name wins over the config's (``serve.run`` without ``name=``, the Serve CLI with
    an import path, a Serve YAML that renamed the app). ``configured`` outside a replica."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().app_name
    except RayServeException:
        return configured


class PoolHealth:
    """Polls the controller every ``period_s``; ``serving`` is None until the first answer.
    ``wait_change(old)`` returns when ``serving`` differs from ``old`` (gRPC Watch)."""

    def __init__(self, app_name: str, needed: list[str], period_s: float) -> None:
        self.app_name, self.needed, self.period_s = app_name, needed, period_s
        self.serving: bool | None = None
        self.running: dict[str, int] = {}
        self.replicas: dict[str, int] = {}  # every deployment of the app, as last probed
        self._probed_at: float | None = None
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start polling on the running event loop (idempotent)."""
        if self._task is None:
            self._changed = asyncio.Condition()
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def current(self) -> bool:
        """The latest answer; the first call waits for the first probe."""
        self.start()
        if self.serving is None:
            await self.probe()
        return bool(self.serving)

    async def wait_change(self, old: bool | None) -> bool:
        self.start()
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(lambda: self.serving is not None and self.serving != old)
        return bool(self.serving)

    async def probe(self) -> None:
        from ray import serve

        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), STATUS_TIMEOUT_S)
            app = status.applications.get(self.app_name)
            deployments = app.deployments if app is not None else {}
            self.replicas = running_pools(deployments, deployments)
            self.running = running_pools(deployments, self.needed)
            self._probed_at = time.monotonic()
        except Exception as exc:  # noqa: BLE001 (controller restarting: keep the last answer)
            logger.warning("health probe: serve.status() failed (%s); keeping the last answer", type(exc).__name__)
            if self.serving is not None:
                return
            self.running = dict.fromkeys(self.needed, 0)
        serving = all(n > 0 for n in self.running.values())
        if serving != self.serving:
            if self.serving is not None:
                logger.warning("readiness: %s (running replicas %s)", "SERVING" if serving else "NOT_SERVING",
                               self.running)
            self.serving = serving
            if self._changed is not None:
                async with self._changed:
                    self._changed.notify_all()

    async def down(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` with no running replica, by a probe at most ``period_s`` old
        (one is made if needed); [] when the controller cannot say."""
        import ray

        if not ray.is_initialized():  # not in a replica (a unit test): nothing to ask
            return []
        if self._probed_at is None or time.monotonic() - self._probed_at > self.period_s:
            try:  # on a failure path: the client waits for this answer
                await asyncio.wait_for(self.probe(), DOWN_PROBE_S)
            except TimeoutError:
                pass
        if self._probed_at is None:
            return []
        return [name for name in names if self.replicas.get(name, 0) == 0]

    async def _poll(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self.period_s)
