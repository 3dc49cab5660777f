"""Readiness of one coordinator replica: can the pools its default policy needs each serve?
Asked of the Serve controller (``serve.status()``), which knows each replica's state, so a
pool that is still loading (a vLLM engine takes about a minute on CPU) or whose replicas
all died reads as not serving, while a busy pool still reads as serving (a probe call would
queue behind its work and time out). A pool whose autoscaling allows zero replicas
(``min_replicas: 0``) and that the autoscaler scaled to zero still serves: its next call
starts a replica, and a load balancer that stopped sending would never wake it. Only its
replicas failing (``UNHEALTHY``, ``DEPLOY_FAILED``) makes it not serving.

The same probe tells the load controller whether the target pool can still add replicas
(``can_add_replicas``), through ``on_probe``.

When the controller cannot be asked (it is restarting after a crash), the last answer
stands: traffic flows without the controller, and so should readiness. So it does while the
restarted controller answers before it has re-attached to the live replicas
(``controller_catching_up``), for at most ``RECOVERY_GRACE_S``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from arbitrage_common.policies import POLICIES

logger = logging.getLogger("ray.serve")
STATUS_TIMEOUT_S = 5.0
DOWN_PROBE_S = 1.0
# Serve's DeploymentStatus values for a deployment whose replicas fail to start or died.
FAILED_STATUSES = frozenset({"UNHEALTHY", "DEPLOY_FAILED"})
# How long answers from a controller still catching up keep the last answer. Serve itself
# gives a replica it recovers 30 s (SLOW_STARTUP_WARNING_S) before it stops it as failed.
RECOVERY_GRACE_S = 30.0


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


def placed_replicas(deployments: dict) -> dict[str, int]:
    """Replicas per deployment that run or are coming up (every state but STOPPING): a replica
    restarting after a crash, or waiting for a node, already holds one of ``max_replicas``."""
    return {name: sum(int(n) for state, n in status.replica_states.items() if state != "STOPPING")
            for name, status in deployments.items()}


def deployment_statuses(deployments: dict) -> dict[str, str]:
    """Serve's status name per deployment ('HEALTHY', 'UPSCALING', 'UNHEALTHY', ...)."""
    return {name: str(getattr(d.status, "value", d.status)) for name, d in deployments.items()}


def pool_serving(running: int, status: str | None, scales_to_zero: bool) -> bool:
    """A pool serves with a running replica, or, allowed zero replicas, at zero with none
    failed (its next call cold-starts one) and not mid-deploy (``UPDATING``: its first replica
    may take minutes to load). Unlisted (``status`` None): not serving."""
    if running > 0:
        return True
    return scales_to_zero and status is not None and status not in FAILED_STATUSES | {"UPDATING"}


def can_add_replicas(placed: int, status: str | None, max_replicas: int | None) -> bool:
    """Whether an autoscaling pool can still grow: fewer replicas placed (``placed_replicas``)
    than its ``max_replicas``, and not failing. A pool of fixed size (``max_replicas`` None),
    one at its max with a replica restarting, or one the controller does not list cannot."""
    if max_replicas is None or status is None or status in FAILED_STATUSES:
        return False
    return placed < max_replicas


def controller_catching_up(app, needed: Iterable[str]) -> bool:
    """Whether ``serve.status()``'s answer for the app (None: not listed) is a restarted
    controller's that has not re-attached to its replicas yet. A restarted controller answers
    at once, from its checkpoint: each replica it found alive is RECOVERING (Serve sets that
    state nowhere else) until it answers the controller, a moment later. Not knowing yet is:
    the app unlisted, or no replica of it RUNNING, though the replica that asks is one (it
    probes once it serves a request); or a needed pool with RECOVERING replicas and none
    RUNNING. A pool whose replicas died shows STARTING or none, while the rest run: an outage."""
    if app is None:
        return True
    states = [d.replica_states for d in app.deployments.values()]
    if not any(s.get("RUNNING", 0) for s in states):
        return True
    return any(not d.replica_states.get("RUNNING", 0) and d.replica_states.get("RECOVERING", 0)
               for name, d in app.deployments.items() if name in needed)


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
    ``wait_change(old)`` returns when ``serving`` differs from ``old`` (gRPC Watch).
    ``scale_to_zero``: the pools whose autoscaling allows zero replicas. ``on_probe`` is
    called after every probe, answered or not (the load controller's refresh)."""

    def __init__(self, app_name: str, needed: list[str], period_s: float, *, scale_to_zero: Iterable[str] = (),
                 on_probe: Callable[[], None] | None = None, fail_fast_after_s: float = 0.0,
                 recovery_grace_s: float = RECOVERY_GRACE_S) -> None:
        self.app_name, self.needed, self.period_s = app_name, needed, period_s
        self.scale_to_zero, self.on_probe = frozenset(scale_to_zero), on_probe
        self.fail_fast_after_s, self.recovery_grace_s = fail_fast_after_s, recovery_grace_s
        self._catching_up_since: float | None = None  # first of the answers in a row from a controller catching up
        self._failing_since: dict[str, float] = {}  # deployment -> first answered probe that found it failing
        self.serving: bool | None = None
        self.running: dict[str, int] = {}
        self.replicas: dict[str, int] = {}  # every deployment of the app, as last probed
        self.placed: dict[str, int] = {}  # replicas running or coming up, by deployment
        self.statuses: dict[str, str] = {}  # every deployment's Serve status, as last probed
        self._probed_at: float | None = None  # the last answer believed
        self._asked_at: float | None = None  # the last probe made, answered or not
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

        answered, self._asked_at = False, time.monotonic()  # failure paths ask at most once a period
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), STATUS_TIMEOUT_S)
            app = status.applications.get(self.app_name)
            if not self._keep_last_answer(app):  # else: as for an error, below
                deployments = app.deployments if app is not None else {}
                self.replicas = running_pools(deployments, deployments)
                self.running = running_pools(deployments, self.needed)
                self.statuses = deployment_statuses(deployments)
                self.placed = placed_replicas(deployments)
                self._probed_at, answered = time.monotonic(), True
                self._failing_since = {name: self._failing_since.get(name, self._probed_at) for name in deployments
                                       if self.replicas.get(name, 0) == 0
                                       and self.statuses.get(name) in FAILED_STATUSES}
        except Exception as exc:  # noqa: BLE001 (controller restarting: keep the last answer)
            logger.warning("health probe: serve.status() failed (%s); keeping the last answer", type(exc).__name__)
            if self.serving is None:
                self.running = dict.fromkeys(self.needed, 0)
        if answered or self.serving is None:
            await self._set_serving(self.serving_now())
        self._probed()

    def _keep_last_answer(self, app) -> bool:
        """An answer from a controller catching up (``controller_catching_up``) leaves the last
        one standing, as an error does: believed, it would report every pool down while the
        replicas serve, and pull a healthy replica out of its load balancer. Believed when there
        is no last answer, and after ``recovery_grace_s`` of such answers in a row."""
        if not controller_catching_up(app, self.needed):
            self._catching_up_since = None
            return False
        now = time.monotonic()
        if self._catching_up_since is None:
            self._catching_up_since = now
            if self.serving is not None:
                logger.warning("health probe: the Serve controller has not recovered its replicas yet; "
                               "keeping the last answer")
        return self.serving is not None and now - self._catching_up_since < self.recovery_grace_s

    def serving_now(self) -> bool:
        """Readiness from the last probe: every needed pool serves (``pool_serving``)."""
        return all(pool_serving(n, self.statuses.get(name), name in self.scale_to_zero)
                   for name, n in self.running.items())

    def failed(self, name: str) -> bool:
        """Deployment ``name`` has had no running replica, with Serve reporting it failing (its
        replicas died or cannot start: ``FAILED_STATUSES``), at every answered probe for at least
        ``fail_fast_after_s``. A call to it would wait for a replica that may be minutes away (a
        lost node's Pod), so callers fail fast instead; a replica restarting in place within
        that time is waited for. A pool that is loading (``UPDATING``) or scaled to zero is not
        failed: its replica comes."""
        since = self._failing_since.get(name)
        return since is not None and time.monotonic() - since >= self.fail_fast_after_s

    def can_add_replicas(self, name: str, max_replicas: int | None) -> bool:
        """``can_add_replicas`` of deployment ``name`` by the last probe (False before one)."""
        return can_add_replicas(self.placed.get(name, 0), self.statuses.get(name), max_replicas)

    def _probed(self) -> None:
        if self.on_probe is None:
            return
        try:
            self.on_probe()
        except Exception:  # a bug there must not stop readiness polling
            logger.exception("health probe: on_probe failed")

    async def _set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            if self.serving is not None:
                logger.warning("readiness: %s (running replicas %s)", "SERVING" if serving else "NOT_SERVING",
                               self.running)
            self.serving = serving
            if self._changed is not None:
                async with self._changed:
                    self._changed.notify_all()

    async def down(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` with no running replica, by the last answer believed, from a probe
        asked at most ``period_s`` ago (one is made if needed); [] when the controller cannot say."""
        import ray

        if not ray.is_initialized():  # not in a replica (a unit test): nothing to ask
            return []
        if self._asked_at is None or time.monotonic() - self._asked_at > self.period_s:
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


class WatchSlots:
    """The health Watch streams open on a replica, for its cap and the autoscaler. A stream
    counts while its client pulls messages (one at least every ``stale_s``: the stream re-sends
    its status more often). Serve may drop a cancelled stream's generator while it is parked at
    a ``yield``, without closing it, so its ``finally`` runs only when the garbage collector
    finds it, or never; silence frees its slot instead."""

    def __init__(self, cap: int, stale_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cap, self.stale_s, self._clock = cap, stale_s, clock
        self._pulled: dict[int, float] = {}
        self._next_id = 0

    def open_count(self) -> int:
        now = self._clock()
        for key in [k for k, t in self._pulled.items() if now - t > self.stale_s]:
            del self._pulled[key]
        return len(self._pulled)

    def take(self) -> int | None:
        """A slot's key, or None when ``cap`` streams are open."""
        if self.open_count() >= self.cap:
            return None
        self._next_id += 1
        self._pulled[self._next_id] = self._clock()
        return self._next_id

    def pulled(self, key: int) -> bool:
        """The stream's client took a message: it is still there. False when its slot went
        to silence and ``cap`` streams are open now: the stream must end, not exceed the cap."""
        if key not in self._pulled and self.open_count() >= self.cap:
            return False
        self._pulled[key] = self._clock()
        return True

    def release(self, key: int) -> None:
        self._pulled.pop(key, None)
