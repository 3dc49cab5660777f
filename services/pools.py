"""Model pools: one generator class (bound as draft and target) and one scorer class (bound
as router and PRM). No ``@serve.deployment`` here: ``services.app`` turns them into
deployments from the AppConfig.

Each pool batches dynamically with ``@serve.batch``: step calls of concurrent requests
share one forward pass. ``@serve.batch`` seals the next batch ``batch_wait_timeout_s``
after its first call even while a forward pass still runs, so under load it would queue
batches of one behind the running pass. A gate fixes that: a call that arrives while a
forward pass runs waits for it to end, and all such calls then enter the queue together
and form one batch. Idle, a call goes straight through (no waiting with a zero timeout).
The blocking backend runs in a worker thread so the replica's event loop (and
``check_health``) stays free. Batch size and wait are live knobs (``user_config`` ->
``reconfigure``).

A transformers generator keeps each session's (request's) prefix keys/values
(``backends.generator_cache``), so a step prefills only what is new since the request's
last step; affinity keeps the session on one replica and ``release`` drops it at the end.

A generator on the vLLM backend (``model.backend: vllm``) skips all of that: its engine
batches concurrent requests itself (continuous batching, ``max_num_seqs``), so each call
goes straight to the async backend. Cancelling the call (a Serve ``response.cancel()``)
aborts its engine requests; ``check_health`` raises once the engine died, so Serve
replaces the replica; ``info()["prefix_cache"]`` reports the engine's prefix-cache counters.

Every pool replica counts the rows (prefixes, items) of the step calls it holds and reports
them to Serve's autoscaler (``record_autoscaling_stats``): a merged call carries many requests'
steps, so pools autoscale on rows, not calls (``arbitrage_common.autoscaling``).
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray import serve
from ray.serve.metrics import Counter, Histogram

from arbitrage_common.autoscaling import HeldRows
from arbitrage_common.counter_deltas import CounterDeltas
from arbitrage_common.interfaces import Generation, GenerationOptions, ScoreItem, row_options
from arbitrage_common.lookahead import DraftAhead, chain, chain_rows
from arbitrage_common.presets import check_pool_model

from .engine_metrics import EngineMetrics
from .gauge_clock import GaugeClock

# Rows of one forward pass (arbitrage_pool_batch_size): up to max_batch_size calls, each with
# several rows on scorer pools (a router call scores 1 + draft_lookahead items, up to 9), so
# 1 .. 4096 covers max_batch_size 64 x 9 = 576 of the presets and pools up to 455 calls a batch.
BATCH_ROWS_BOUNDARIES = [2**i for i in range(13)]
BATCH_ROWS_DESCRIPTION = ("Rows in one batched forward pass: prefixes generated (generator pools) or items "
                          "scored (scorer pools; a call can carry several, e.g. a router call 1 + "
                          "draft_lookahead), over all the calls batched into it.")
# Up to 120 s: a vLLM call's time includes its wait inside a loaded engine, and a p95 above
# the last bound would read as that bound.
_MS_BOUNDARIES = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]


def _trust_remote_code(model: dict[str, Any]) -> bool:
    return bool(model.get("trust_remote_code", False))  # off unless the pool's ModelSpec says so


def _load_generator(model: dict[str, Any]):
    backend = model.get("backend", "transformers")
    if backend == "transformers":
        from arbitrage_common.backends.hf_generator import HFStepGenerator

        cache = {} if model.get("prefix_cache_mb") is None else {"prefix_cache_bytes": int(model["prefix_cache_mb"]) * 2**20}
        return HFStepGenerator(model["path"], threads=model.get("threads"), trust_remote_code=_trust_remote_code(model),
                               **cache)
    if backend == "vllm":
        from arbitrage_common.backends.vllm_generator import VLLMStepGenerator, generator_kwargs

        # build_app passes absolute paths: always a local checkpoint, checked before vllm loads.
        return VLLMStepGenerator(model["path"], local=True, trust_remote_code=_trust_remote_code(model),
                                 **generator_kwargs(model.get("engine")))
    raise ValueError(f"model.backend: unsupported generator backend {backend!r}")


def replica_device(device: str | None, gpu_ids: Callable[[], Sequence[Any]] | None = None) -> str:
    """Where a transformers model of this replica runs: ``model.device`` when it names one,
    else (None / 'auto') 'cuda' only when Ray assigned the replica GPUs (``ray.get_gpu_ids()``,
    from its ``num_gpus``), else 'cpu'. torch's own view is not enough: Ray 2.60 no longer
    hides the GPUs from an actor that asked for none (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO``
    defaults to off), so a scorer pool given no GPU would land on GPU 0, unaccounted.
    ``gpu_ids``: the call that lists them (default ``ray.get_gpu_ids``; tests inject one).
    Outside a Ray worker (no ``gpu_ids`` and Ray not initialized: a script building a pool by
    hand) nothing was assigned, and 'auto' is kept for the backend's own choice."""
    if device not in (None, "auto"):
        return device
    if gpu_ids is None:
        if not ray.is_initialized():
            return "auto"
        gpu_ids = ray.get_gpu_ids
    return "cuda" if list(gpu_ids()) else "cpu"


def cap_gpu_share(device: str, share: float | None,
                  set_fraction: Callable[[float, int | None], None] | None = None) -> bool:
    """On a GPU given in part (``num_gpus`` 0.25: four replicas share it), hold this process to
    its ``share`` of the GPU's memory, as each vLLM engine holds to ``gpu_memory_utilization``:
    torch's caching allocator would otherwise grow into its neighbours' memory, and the
    replica that runs out would be whichever allocates next, not the one that grew. True when
    capped (on ``device`` itself: ``cuda:1`` caps GPU 1, ``cuda`` the current one). ``set_fraction``:
    torch's ``set_per_process_memory_fraction`` (tests inject one)."""
    if not device.startswith("cuda") or share is None or not 0 < share < 1:
        return False
    import torch

    set_fraction = set_fraction or torch.cuda.set_per_process_memory_fraction
    # torch takes a device index, or None for the current device ("cuda" has no index)
    set_fraction(float(share), torch.device(device).index)
    return True


def _assigned_gpu_share() -> float | None:
    """The GPUs Ray assigned this replica (its ``num_gpus``); None outside a Ray worker (a driver
    building a pool by hand has no assigned resources: Ray asserts on asking)."""
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None
    return context.get_assigned_resources().get("GPU")


def _load_scorer(model: dict[str, Any]):
    backend = model.get("backend", "transformers")
    if backend == "transformers":
        from arbitrage_common.backends.scorers import load_step_scorer

        device = replica_device(model.get("device"))
        if device.startswith("cuda"):
            cap_gpu_share(device, _assigned_gpu_share())
        return load_step_scorer(model["path"], threads=model.get("threads"),
                                annotate_history=model.get("annotate_history"),
                                device=device,
                                trust_remote_code=_trust_remote_code(model), prefix_cache_mb=model.get("prefix_cache_mb"))
    raise ValueError(f"model.backend: unsupported scorer backend {backend!r}")


class _Pool:
    """Shared plumbing: metrics, live batching knobs, a cheap health check, cache releases."""

    kind = "pool"

    def __init__(self, role: str, model: dict[str, Any]) -> None:
        check_pool_model(role, model)  # on this replica's node: clear error naming pool and path, before loading
        self.role = role
        self.model_path = model["path"]
        self.backend_name = model.get("backend", "transformers")
        tags = ("role",)
        self._batch_size = Histogram("arbitrage_pool_batch_size", description=BATCH_ROWS_DESCRIPTION,
                                     boundaries=BATCH_ROWS_BOUNDARIES, tag_keys=tags)
        self._batch_ms = Histogram("arbitrage_pool_batch_ms", description="Wall ms of one batched forward pass.",
                                   boundaries=_MS_BOUNDARIES, tag_keys=tags)
        self._items = Counter("arbitrage_pool_items_total", description="Prefixes generated or items scored.",
                              tag_keys=tags)
        for metric in (self._batch_size, self._batch_ms, self._items):
            metric.set_default_tags({"role": role})
        # calls: Serve calls received (a merged call counts once); items: rows run.
        self._stats = {"calls": 0, "batches": 0, "items": 0, "max_batch_items": 0, "forward_s": 0.0}
        self._idle: asyncio.Event | None = None  # created on the replica's event loop
        # Rows (prefixes, items) of the step calls this replica holds: its autoscaling load.
        self._held = HeldRows()

    async def _wait_idle(self) -> None:
        """Hold a new call while a forward pass runs, so the calls that pile up meanwhile
        join one batch instead of each sealing its own."""
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        await self._idle.wait()

    def _count(self, items: int) -> None:
        self._batch_size.observe(items)
        self._items.inc(items)
        self._stats["batches"] += 1
        self._stats["items"] += items
        self._stats["max_batch_items"] = max(self._stats["max_batch_items"], items)

    def _batched_method(self):
        raise NotImplementedError

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        method = self._batched_method()
        if "max_batch_size" in user_config:
            method.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            method.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    async def check_health(self) -> None:
        """Cheap by design: the replica is healthy if its event loop answers and its backend,
        if it can tell (a vLLM engine), is alive (a flag check, no request)."""
        check = getattr(self.backend, "check_health", None)
        if check is not None:
            await check()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook for custom autoscaling metrics, called every few seconds on the
        replica's event loop: the mean rows and step calls held since the last call
        (``arbitrage_common.autoscaling``; the rows policy scales on them)."""
        return self._held.sample()

    async def release(self, session: str) -> bool:
        """Drop a finished request's cached prefix; True if this replica held one."""
        return bool(self.backend.release(session)) if self.cached else False

    async def _release_all(self, sessions: Sequence[str]) -> None:
        """The releases a merged call carries, run before its rows."""
        for session in sessions:
            await self.release(session)

    def info(self) -> dict[str, Any]:
        """What this replica serves and how it has batched so far (tests, debugging, and the
        figures of ``services.bench`` and ``services.affinity_bench``); ``held_rows`` /
        ``held_calls``: rows and step calls it holds now."""
        return {"role": self.role, "kind": self.kind, "model_path": self.model_path,
                "backend": self.backend_name, "pid": os.getpid(),
                "params": getattr(self.backend, "params", None), "prefix_cache": None, "engine": None,
                "held_rows": self._held.rows, "held_calls": self._held.calls, **self._stats}

    def __del__(self) -> None:
        # Serve calls this when it stops the replica: engine processes must not outlive it.
        shutdown = getattr(getattr(self, "backend", None), "shutdown", None)
        if shutdown is not None:
            shutdown()

    async def _run(self, fn, *args):
        started = time.perf_counter()
        if self._idle is not None:
            self._idle.clear()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            if self._idle is not None:
                self._idle.set()
            seconds = time.perf_counter() - started
            self._stats["forward_s"] += seconds
            self._batch_ms.observe(seconds * 1000.0)


async def _gather_rows(calls: list, row_error: type | tuple[type, ...] = ()) -> list:
    """Run one merged call's rows (``arbitrage_common.coalesce``) side by side, so they join one
    batch. A row's own failure (``row_error``) comes back in its place; any other failure
    (a dead engine, a failed pass) is the whole call's, raised so the caller can retry it."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, row_error):
            raise result
    return results


def _split(flat: list, sizes: list[int]) -> list[list]:
    """Cut one batch's flat results back into each caller's share."""
    out, pos = [], 0
    for size in sizes:
        out.append(flat[pos:pos + size])
        pos += size
    return out


class GeneratorPool(_Pool):
    """Serves the draft or target model: ``generate(prefixes, options, session, ahead)`` (one
    request's step; ``ahead``: the draft lookahead's planned steps), ``generate_rows`` (merged
    calls, what the coordinator sends by default), ``release(session)``, ``context_info``,
    ``count_tokens`` and ``reset_prefix_cache``."""

    kind = "generator"

    def __init__(self, role: str, model: dict[str, Any]) -> None:
        super().__init__(role, model)
        self.backend = _load_generator(model)
        # An engine that batches inside itself (vLLM) is called directly, once per call.
        self.engine_batched = self.backend_name == "vllm"
        # A session prefix cache of its own (transformers); vLLM's engine caches by content.
        self.cached = not self.engine_batched and getattr(self.backend, "prefix_cache", None) is not None
        if self.engine_batched or self.cached:
            # Counters, not a since-start ratio: rate(hits) / rate(queries) over a window shows a
            # regression at once, where a ratio since start barely moves after hours of uptime.
            self._prefix_tokens = {
                "hits": Counter("arbitrage_pool_prefix_cache_hit_tokens_total", tag_keys=("role",),
                                description="Prefix tokens found in this replica's prefix cache (its engine's, "
                                            "or its session cache's)."),
                "queries": Counter("arbitrage_pool_prefix_cache_query_tokens_total", tag_keys=("role",),
                                   description="Prefix tokens looked up in this replica's prefix cache."),
            }
            for counter in self._prefix_tokens.values():
                counter.set_default_tags({"role": role})
            self._prefix_seen = CounterDeltas()
        self._engine_metrics = EngineMetrics(role) if self.engine_batched else None
        # Only on the clock: set as a call ends, the gauges would read the engine as its batch
        # ends (often empty), and the export keeps the last value set.
        self._engine_export = GaugeClock(self._export_engine)  # started by the first health check
        # Token-level speculation (a transformers target verifying the draft's step): counts since start.
        speculation = getattr(self.backend, "speculation", None)
        self._speculation_seen = CounterDeltas(speculation) if speculation else None
        if self._speculation_seen is not None:
            self._proposal_tokens = Counter(
                "arbitrage_pool_proposal_tokens_total", tag_keys=("role", "outcome"),
                description="Tokens of the draft's step that calls ran as their proposal (outcome=proposed) "
                            "and kept as their own (outcome=accepted).")
            self._proposal_tokens.set_default_tags({"role": role})

    def _batched_method(self):
        return self._generate_batched

    def _export_speculation(self) -> None:
        """Add the proposal tokens run and kept since the last export to the counter."""
        if self._speculation_seen is None:
            return
        for outcome, grown in self._speculation_seen.since_last(self.backend.speculation).items():
            self._proposal_tokens.inc(grown, tags={"outcome": outcome})

    def _export_engine(self) -> None:
        """A vLLM pool's engine counters (prefix cache, preemptions) and state to the metrics."""
        engine = self.backend.stats()
        self._export_prefix_cache(engine["prefix_cache_hits"], engine["prefix_cache_queries"])
        self._engine_metrics.export(engine)

    async def check_health(self) -> None:
        """``_Pool``'s; and, on a vLLM pool, the engine metrics' clock started (Serve checks a
        replica's health soon after it starts, on its event loop)."""
        if self._engine_metrics is not None:
            self._engine_export.start()
        await super().check_health()

    def _export_prefix_cache(self, hits: int, queries: int) -> None:
        """Add the prefix-cache tokens looked up and reused since the last export (``hits`` and
        ``queries``: the cache's totals since start) to the counters."""
        for name, grown in self._prefix_seen.since_last({"hits": hits, "queries": queries}).items():
            self._prefix_tokens[name].inc(grown)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        if not self.engine_batched:  # the Serve batch knobs do not apply to an engine-batched pool
            super().reconfigure(user_config)

    async def generate(self, prefixes: list[str], options: GenerationOptions, session: str | None = None,
                       ahead: DraftAhead | None = None) -> list[Generation]:
        """One caller's prefixes (usually one); merged with concurrent callers' into a batch.
        ``session`` keys the prefix cache (the engine's own cache needs none). With ``ahead``
        (draft lookahead, one prefix) the step and the steps planned after it, each run as its
        own call here (joining whatever batch forms), all in this one Serve call."""
        self._stats["calls"] += 1
        with self._held.hold(len(prefixes)):
            return await self._generate_ahead(prefixes, options, session, ahead)

    async def _generate_ahead(self, prefixes: list[str], options: GenerationOptions, session: str | None,
                              ahead: DraftAhead | None) -> list[Generation]:
        if ahead is None or len(prefixes) != 1:
            return await self._generate(prefixes, options, session)
        if self.engine_batched:
            return await chain(lambda more, opts: self._generate(list(more), opts, session), prefixes[0], options,
                               ahead)
        # The planned steps run in the same batched pass, right after the step (``chain_rows``).
        await self._wait_idle()
        return await self._generate_batched(list(prefixes), options, session, ahead)

    async def _generate(self, prefixes: list[str], options: GenerationOptions,
                        session: str | None) -> list[Generation]:
        if not prefixes:
            return []
        if self.engine_batched:
            return await self._generate_in_engine(list(prefixes), options)
        await self._wait_idle()
        return await self._generate_batched(list(prefixes), options, session, None)

    async def generate_rows(self, prefix_lists: list[list[str]], option_list: list[GenerationOptions],
                            sessions: list[str | None] | None = None, aheads: list[DraftAhead | None] | None = None,
                            release: list[str] | tuple[str, ...] = ()) -> list[list[Generation] | Exception]:
        """A merged call: the calls of several requests, each ``(prefixes, options, session,
        ahead)`` as ``generate`` takes them, one result (or that row's own engine error) per
        call; plus the sessions that finished since (their cached prefixes are dropped first)."""
        from arbitrage_common.backends.vllm_generator import EngineDeadError, EngineRequestError

        self._stats["calls"] += 1
        await self._release_all(release)
        sessions = sessions or [None] * len(prefix_lists)
        aheads = aheads or [None] * len(prefix_lists)
        calls = [self._generate_ahead(prefixes, options, session, ahead)
                 for prefixes, options, session, ahead in zip(prefix_lists, option_list, sessions, aheads)]
        with self._held.hold(sum(len(prefixes) for prefixes in prefix_lists)):
            results = await _gather_rows(calls, EngineRequestError)
        dead = next((r for r in results if isinstance(r, EngineDeadError)), None)
        if dead is not None:  # the replica's fault, not the row's: the caller retries elsewhere
            raise dead
        return results

    async def _generate_in_engine(self, prefixes: list[str], options: GenerationOptions) -> list[Generation]:
        """One call straight to the async engine: concurrent calls batch inside it. Metrics
        count calls (``batches``, ``arbitrage_pool_batch_size``: prefixes per call) and their
        wall time; the engine's own batching shows in ``info()["engine"]``."""
        from arbitrage_common.backends.vllm_generator import EngineRequestError

        self._count(len(prefixes))
        started = time.perf_counter()
        try:
            return await self.backend.generate(prefixes, options)
        except EngineRequestError as exc:
            raise type(exc)(f"{self.role} pool: {exc}") from None  # name the pool in the client's error
        finally:
            seconds = time.perf_counter() - started
            self._stats["forward_s"] += seconds
            self._batch_ms.observe(seconds * 1000.0)  # the engine's own metrics go on a clock (_engine_export)

    def info(self) -> dict[str, Any]:
        """``_Pool.info()``, plus the prefix cache: the session cache's counters (transformers),
        or an engine-batched pool's engine prefix cache and engine state; and ``speculation``:
        proposal tokens verified and kept (transformers; None where proposals are ignored)."""
        out = super().info()
        out["speculation"] = dict(self.backend.speculation) if getattr(self.backend, "speculation", None) else None
        if self.cached:
            out["prefix_cache"] = self.backend.prefix_cache.info()
        if self.engine_batched:
            s = self.backend.stats()
            out["prefix_cache"] = {"requests": s["prefix_cache_requests"], "queries": s["prefix_cache_queries"],
                                   "hits": s["prefix_cache_hits"], "hit_rate": s["prefix_cache_hit_rate"]}
            out["engine"] = {"max_running_requests": s["max_running_requests"],
                             **{k: s[k] for k in ("running_requests", "waiting_requests", "kv_cache_usage",
                                                  "peak_kv_cache_usage", "preempted_requests")},
                             "unfinished_requests": self.backend.unfinished_requests(),
                             "aborted_requests": self.backend.aborted, "pids": self.backend.engine_pids(),
                             "served_dir": self.backend.served_dir, "args": dict(self.backend.engine_args)}
        return out

    async def reset_prefix_cache(self) -> bool:
        """Empty the engine's prefix cache (benchmarks start cold); a no-op for transformers.
        False when the engine could not (a request still held its blocks)."""
        return await self.backend.reset_prefix_cache() if self.engine_batched else True

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _generate_batched(self, prefix_lists: list[list[str]], option_list: list[GenerationOptions],
                                sessions: list[str | None], aheads: list[DraftAhead | None]) -> list[list[Generation]]:
        # Every call of the batch shares one forward pass, each row decoding with its own
        # call's options (budget, temperature, seed) over its own session's cached prefix: a
        # row's result is what its call alone would get, so merging calls never changes an output.
        # A call with a lookahead plan (one prefix) gets its planned steps too, the next steps
        # of all such calls in one more pass each round (``chain_rows``).
        flat = [p for prefixes in prefix_lists for p in prefixes]
        rows = [o for prefixes, opts in zip(prefix_lists, option_list) for o in row_options(opts, len(prefixes))]
        per_row = [session for prefixes, session in zip(prefix_lists, sessions) for _ in prefixes]
        plans = [ahead if len(prefixes) == 1 else None for prefixes, ahead in zip(prefix_lists, aheads)
                 for _ in prefixes]

        def run(indices: list[int], prefixes: list[str], options: list[GenerationOptions]) -> list[Generation]:
            self._count(len(prefixes))
            if self.cached:
                return self.backend.generate_batch(prefixes, options, [per_row[i] for i in indices])
            return self.backend.generate_batch(prefixes, options)

        chains = await self._run(chain_rows, run, flat, rows, plans)
        self._export_speculation()
        if self.cached:
            cache = self.backend.prefix_cache.info()
            self._export_prefix_cache(cache["hits"], cache["queries"])
        return [[gen for row in part for gen in row] for part in _split(chains, [len(ps) for ps in prefix_lists])]

    async def context_info(self) -> dict[str, int | None]:
        """The model's context in tokens (prompt + generated); None if the backend cannot tell."""
        return {"context": getattr(self.backend, "context", None)}

    async def count_tokens(self, prefix: str) -> int:
        """The exact token count this pool's backend would feed its model for ``prefix``."""
        return self.backend.count_tokens(prefix)


class ScorerPool(_Pool):
    """Serves ``score(items, session)`` for the router or the PRM.

    A backend with a prefix cache (the causal-LM scorers: ``backends.prefix_cache``) keeps
    each session's scored prefix, so a step runs only its new tokens; session affinity
    keeps a request on one replica, a miss (a failover) recomputes the same score, and
    ``release(session)`` drops the cache when the request ends (an LRU bounds it anyway)."""

    kind = "scorer"

    def __init__(self, role: str, model: dict[str, Any]) -> None:
        super().__init__(role, model)
        self.backend = _load_scorer(model)
        self.cached = hasattr(self.backend, "release")

    def _batched_method(self):
        return self._score_batched

    async def score(self, items: list[ScoreItem], session: str | None = None) -> list[float]:
        self._stats["calls"] += 1
        with self._held.hold(len(items)):
            return await self._score(items, session)

    async def _score(self, items: list[ScoreItem], session: str | None) -> list[float]:
        if not items:
            return []
        await self._wait_idle()
        return await self._score_batched(list(items), session)

    async def score_rows(self, item_lists: list[list[ScoreItem]], sessions: list[str | None],
                         release: list[str] | tuple[str, ...] = ()) -> list[list[float]]:
        """A merged call: the score calls of several requests (one session each), plus the
        sessions that finished since (their cached prefixes are dropped first)."""
        self._stats["calls"] += 1
        await self._release_all(release)
        with self._held.hold(sum(len(items) for items in item_lists)):
            return await _gather_rows([self._score(items, session) for items, session in zip(item_lists, sessions)])

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["scorer_cache"] = self.backend.prefix_cache.info() if self.cached else None
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _score_batched(self, item_lists: list[list[ScoreItem]],
                             sessions: list[str | None]) -> list[list[float]]:
        flat = [item for items in item_lists for item in items]
        self._count(len(flat))
        if self.cached:
            per_item = [session for items, session in zip(item_lists, sessions) for _ in items]
            scores = await self._run(self.backend.score_batch, flat, per_item)
        else:
            scores = await self._run(self.backend.score_batch, flat)
        return _split(scores, [len(items) for items in item_lists])
