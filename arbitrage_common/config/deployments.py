"""The deployments' sections: a pool's model, engine, replicas and batching; the coordinator's."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from ..autoscaling import POLICY_FUNCTION as ROWS_POLICY_FUNCTION
from ..autoscaling import REQUESTS_POLICY_FUNCTION
from .common import (
    GENERATOR_ROLES,
    LANES_PER_REPLICA,
    LIVE_SCALING_IN_ARGS,
    MIN_HEALTH_PROBE_S,
    SCORER_ROLES,
    Backend,
    Role,
    StrictModel,
)


class EngineSpec(StrictModel):
    """vLLM engine arguments of one pool (``backend: vllm``); the fields ``VLLMStepGenerator`` takes."""

    max_model_len: PositiveInt = Field(4096, description="Longest sequence of one request in the engine: prompt "
                                                         "plus every step generated so far, tokens.")
    dtype: str = Field("auto", description="Weights/activations dtype ('auto', 'bfloat16', 'float32' on CPU).")
    tensor_parallel_size: PositiveInt = Field(1, description="GPUs per engine. >1 needs placement_group_bundles "
                                                             "on the pool (one bundle per GPU).")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="Fraction of each GPU for weights "
                                                                               "+ KV cache (None: vLLM's default, "
                                                                               "0.92). Engines sharing a GPU split it.")
    kv_cache_memory_bytes: PositiveInt | None = Field(None, description="Explicit KV cache size (None: on CPU "
                                                                        "256 MiB, on GPU from "
                                                                        "gpu_memory_utilization). On CPU, "
                                                                        "VLLM_CPU_KVCACHE_SPACE wins when set.")
    max_num_seqs: PositiveInt | None = Field(None, description="Most sequences per engine step (None: vLLM's "
                                                               "default).")
    enable_prefix_caching: bool = Field(True, description="vLLM's automatic prefix caching: reuse the KV blocks of "
                                                          "a prefix the engine already computed, so each step of a "
                                                          "request computes only what is new since its last step "
                                                          "(on the same replica: session_affinity). Off: every step "
                                                          "recomputes the whole prefix.")
    enforce_eager: bool | None = Field(None, description="No CUDA graphs (None: on for CPU, off on GPU).")
    quantization: str | None = Field(None, description="vLLM quantization method, e.g. 'awq', 'gptq', 'fp8', "
                                                       "'bitsandbytes' (None: as the checkpoint's config.json "
                                                       "quantization_config says, else none). Methods quantized "
                                                       "ahead of time (awq, awq_marlin, gptq, gptq_marlin, "
                                                       "compressed-tensors) need a checkpoint with a "
                                                       "quantization_config (`arbitrage config check --paths`).")
    block_size: PositiveInt | None = Field(None, description="KV block size in tokens (None: 32 on CPU, vLLM's "
                                                             "default on GPU).")
    distributed_executor_backend: Literal["uni", "mp"] | None = Field(
        None, description="Where the model runs: 'uni' in the engine-core process, 'mp' in worker processes of "
                          "its own. None: 'uni' on CPU with tensor_parallel_size 1 (vLLM's CPU build would pick "
                          "'mp', whose worker busy-polls between steps), vLLM's default elsewhere ('uni' on one "
                          "GPU; with tensor_parallel_size > 1 in a Serve replica, Ray workers placed in the "
                          "replica's GPU bundles). 'uni' needs tensor_parallel_size 1. 'mp' starts its workers on "
                          "the GPUs the replica's process sees, whatever bundles Ray reserved: only for a replica "
                          "with its Pod's GPUs to itself.")

    @model_validator(mode="after")
    def _uni_is_one_worker(self) -> EngineSpec:
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(f"distributed_executor_backend 'uni' runs one worker: tensor_parallel_size="
                             f"{self.tensor_parallel_size} needs None (vLLM's choice: Ray workers in the "
                             f"replica's GPU bundles) or 'mp'")
        return self


class ModelSpec(StrictModel):
    """Which checkpoint a pool serves and how it is loaded."""

    path: str = Field(description="Hugging Face checkpoint directory (safetensors). A relative path resolves "
                                  "against AppConfig.base_dir, or the working directory of the process that "
                                  "builds the application.")
    backend: Backend = Field("transformers", description="Inference engine: 'transformers' (in the replica's "
                                                         "process; its generator decodes on the CPU only, its "
                                                         "scorers run where model.device says) or 'vllm' "
                                                         "(generator pools only: an AsyncLLM engine per replica; "
                                                         "the way to generate on GPUs). The router and PRM pools "
                                                         "must be 'transformers'.")
    threads: PositiveInt | None = Field(1, description="Transformers backend only; torch intra-op threads per "
                                                       "replica (None: torch's default, one per core). Keep 1 on "
                                                       "small CPU machines. vLLM pools ignore it: their engine's "
                                                       "CPU threads follow VLLM_CPU_OMP_THREADS_BIND "
                                                       "(ray_actor_options.runtime_env.env_vars; docs/VLLM.md).")
    annotate_history: bool | None = Field(None, description="Router and PRM pools: put 'Model 0: ' before each "
                                                            "earlier step the draft wrote and 'Model 1: ' before "
                                                            "each the target wrote, as a router trained on "
                                                            "annotated history expects. None: as the checkpoint's "
                                                            "training_meta.json says (off without one). true is "
                                                            "refused when the pool loads a verifier-head router, "
                                                            "an LM verifier or a value-head PRM (they read plain "
                                                            "history). Set on a generator pool it is refused.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Router and PRM pools (transformers): where "
                                                                      "the model runs ('auto': the GPU when Ray "
                                                                      "gave the replica one, ray_actor_options."
                                                                      "num_gpus, else the CPU). Generator pools "
                                                                      "refuse any other value than 'auto' "
                                                                      "(transformers generates on the CPU, vLLM "
                                                                      "on the replica's GPUs).")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the checkpoint (the auto_map "
                                                       "of its config.json) when transformers or vLLM loads its "
                                                       "model and tokenizer. Off unless the model needs it and "
                                                       "its source is trusted. On, transformers pools load through "
                                                       "transformers instead of the lean Llama path; a value-head "
                                                       "PRM refuses it.")
    engine: EngineSpec | None = Field(None, description="vLLM engine arguments (backend 'vllm' only: refused with "
                                                        "'transformers'; None: the defaults of its fields).")
    prefix_cache_mb: NonNegativeInt | None = Field(None, description="Transformers backend: MiB of per-request "
                                                                    "prefix KV cache per replica (an LRU; 0 turns "
                                                                    "it off; None: 256), so a step runs only what "
                                                                    "is new since the request's last step. The "
                                                                    "generators (fast Llama path) and the verifier "
                                                                    "scorers (a verifier-head router, an LM "
                                                                    "verifier) use it; classifier scorers and a "
                                                                    "value-head PRM have none. "
                                                                    "Refused with backend 'vllm' (its engine "
                                                                    "caches prefixes: engine.enable_prefix_caching).")

    @model_validator(mode="after")
    def _engine_only_with_vllm(self) -> ModelSpec:
        if self.engine is not None and self.backend != "vllm":
            raise ValueError("engine: only for backend 'vllm'")
        if self.prefix_cache_mb is not None and self.backend == "vllm":
            raise ValueError("prefix_cache_mb: not for backend 'vllm' (its engine caches prefixes itself: "
                             "engine.enable_prefix_caching)")
        return self


# Ray Serve's AutoscalingConfig defaults (Ray 2.60), for the fields left None.
SERVE_LOOK_BACK_PERIOD_S = 30.0
SERVE_METRICS_INTERVAL_S = 10.0


class AutoscalingSpec(StrictModel):
    """The common subset of Ray Serve's ``autoscaling_config``."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 allows scale to zero); at most "
                                                   "max_replicas.")
    max_replicas: PositiveInt = Field(1, description="Most replicas; at least min_replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time, within [min_replicas, "
                                                                 "max_replicas] (None: min_replicas).")
    target_ongoing_requests: PositiveFloat = Field(8.0, description="Load per replica the autoscaler aims for; "
                                                                    "above it, scale up. A model pool's load is "
                                                                    "the rows (request steps) a replica holds, "
                                                                    "running or queued in it (load_metric); the "
                                                                    "coordinator's, its requests.")
    upscale_delay_s: float = Field(5.0, ge=0, description="Seconds load must stay high before scaling up.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Seconds load must stay low before scaling down.")
    look_back_period_s: PositiveFloat | None = Field(None, description="Seconds of load history each scaling "
                                                                       "decision averages (None: Serve's 30). "
                                                                       "Must be greater than metrics_interval_s "
                                                                       "(Serve's 10 when that is None), so a "
                                                                       "decision averages more than one report.")
    metrics_interval_s: PositiveFloat | None = Field(None, description="Seconds between a replica's load reports "
                                                                       "to the autoscaler (None: Serve's 10). Must "
                                                                       "be less than look_back_period_s (Serve's 30 "
                                                                       "when that is None).")
    load_metric: Literal["rows", "calls"] | None = Field(
        None, exclude_if=lambda v: v is None,
        description="What target_ongoing_requests counts. 'rows': the request steps a replica holds "
                    "(running or queued in it), whatever Serve calls carry them "
                    "(arbitrage_common.autoscaling:rows_policy; model pools only). 'calls': Serve calls, "
                    "Serve's default policy; with merged calls one call carries many requests' steps, so "
                    "a pool would scale with the busy lanes, not the load. None: 'rows' for a pool whose "
                    "calls the coordinator merges, else 'calls'. The coordinator refuses 'rows' (it scales "
                    "on its requests). Left out of renderings while None.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie in [min_replicas, max_replicas]")
        look_back = self.look_back_period_s or SERVE_LOOK_BACK_PERIOD_S
        interval = self.metrics_interval_s or SERVE_METRICS_INTERVAL_S
        if look_back <= interval:
            unset = " (Serve's default)"
            raise ValueError(f"look_back_period_s: {look_back:g}{'' if self.look_back_period_s else unset} must be "
                             f"greater than metrics_interval_s, {interval:g}{'' if self.metrics_interval_s else unset}"
                             f": a decision would average at most one load report (Ray Serve warns, and will "
                             f"refuse it)")
        return self


# Ray's own resources, by the names a placement bundle gives them; `ray_actor_options` names
# them num_cpus, num_gpus and memory instead.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _resource_problem(name: str, amount: float, builtin_ok: bool) -> str | None:
    """Why ``name: amount`` cannot be a Ray resource request, or None."""
    if not math.isfinite(amount) or amount < 0:
        return f"{name}: {amount!r} is not an amount (a number >= 0)"
    exact = next((b for b in RAY_BUILTIN_RESOURCES if b.lower() == name.lower()), None)
    if exact is not None and not builtin_ok:
        return (f"{name}: Ray's own resource; use num_cpus, num_gpus or memory (resources holds custom ones, "
                f"e.g. {{'pool_target': 1}})")
    if exact is not None and name != exact:
        return (f"{name}: not Ray's {exact!r} (resource names are case-sensitive: Ray would wait for a custom "
                f"resource {name!r} that no node offers)")
    return None


class ActorOptionsSpec(StrictModel):
    """Ray Serve ``ray_actor_options`` of every replica of a deployment."""

    num_cpus: float | None = Field(None, ge=0, description="CPUs reserved per replica (Ray's default is 1; use 0 "
                                                           "or fractions when many deployments share few cores).")
    num_gpus: float | None = Field(None, ge=0, description="GPUs reserved per replica (fractions share one GPU).")
    memory: int | None = Field(None, ge=0, description="Heap memory reserved per replica, bytes (on KubeRay it "
                                                       "must fit the worker group's Pod memory, cluster.<group>."
                                                       "memory).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom resources, e.g. "
                                                                         "{'pool_target': 1} to pin to a worker "
                                                                         "group (`arbitrage k8s render` makes the "
                                                                         "group's Pods offer them). Amounts >= 0; "
                                                                         "names are case-sensitive. Not CPU, GPU "
                                                                         "or memory: num_cpus, num_gpus, memory.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'H100', on a cluster you "
                                                           "start yourself. `arbitrage k8s render` refuses it (no "
                                                           "worker group offers the resource Ray makes of it): "
                                                           "select the GPU there by a Ray node label, "
                                                           "cluster.<group>.labels + label_selector.")
    label_selector: dict[str, str] = Field(default_factory=dict, description="Ray node labels a replica's node "
                                                                             "must carry, e.g. {'arbitrage-serve.io/"
                                                                             "group': 'target'} (the KubeRay "
                                                                             "rendering pins every pool this way, "
                                                                             "merging the group's label into "
                                                                             "these).")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env (env_vars, ...).")

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if (problem := _resource_problem(name, amount, builtin_ok=False)) is not None:
                raise ValueError(problem)
        return v

    def to_ray(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude_defaults=True)


class DeploymentSpec(StrictModel):
    """Replica count, resources and queueing of one Ray Serve deployment."""

    num_replicas: PositiveInt | None = Field(None, description="Fixed replica count; set it or "
                                                               "autoscaling_config, not both. Neither: 1.")
    autoscaling_config: AutoscalingSpec | None = Field(None, description="Autoscale between min_replicas and "
                                                                         "max_replicas (Ray Serve's "
                                                                         "autoscaling_config). None: num_replicas.")
    ray_actor_options: ActorOptionsSpec = Field(default_factory=ActorOptionsSpec,
                                                description="Resources of each replica.")
    max_ongoing_requests: PositiveInt = Field(16, description="Requests one replica works on at once; the router "
                                                              "queues the rest.")
    max_queued_requests: int = Field(-1, description="Requests queued at callers beyond the ongoing ones "
                                                     "before new ones are rejected (RESOURCE_EXHAUSTED / "
                                                     "503); -1: unbounded, else at least 1 (Ray Serve refuses 0).")
    graceful_shutdown_timeout_s: float = Field(10.0, ge=0, description="Seconds a stopping replica may finish "
                                                                       "its requests.")
    access_log: bool = Field(True, description="Log every call to this deployment (Serve access log). Pools get "
                                               "one call per step, so they default to off.")
    health_check_period_s: PositiveFloat = Field(10.0, description="Seconds between Serve's health checks of each "
                                                                   "replica (Serve's default).")
    health_check_timeout_s: PositiveFloat = Field(30.0, description="Seconds a health check may take before it "
                                                                    "counts as failed; Serve replaces a replica "
                                                                    "after 3 failed in a row (Serve's default).")

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"{v}: must be -1 (no limit) or at least 1 (Ray Serve refuses {v})")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> DeploymentSpec:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self

    def deployment_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment(cls, **options)``."""
        opts: dict[str, Any] = {
            "name": name,
            "ray_actor_options": self.ray_actor_options.to_ray(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "logging_config": {"enable_access_log": self.access_log},
        }
        return {**opts, **self.scaling_options()}  # (a pool's deployment_options passes merged_calls)

    def scaling(self) -> dict[str, Any]:
        """This deployment's replica fields as the config holds them (``AppConfig.with_scaling``)."""
        return self.model_dump(mode="json", include=set(LIVE_SCALING_IN_ARGS), exclude_none=True)

    def scaling_options(self) -> dict[str, Any]:
        """The replica options of ``deployment_options``: Serve changes them in place."""
        if self.autoscaling_config is not None:
            return {"autoscaling_config": self.autoscaling_config.model_dump(exclude_none=True,
                                                                             exclude={"load_metric"})}
        return {"num_replicas": self.num_replicas or 1}


class PoolSpec(DeploymentSpec):
    """One model pool: a deployment serving one checkpoint with dynamic batching."""

    model: ModelSpec = Field(description="The checkpoint this pool serves.")
    access_log: bool = Field(False, description="Log every step call (Serve access log); off: one per step is "
                                                "noise and CPU.")
    # Tighter than Serve's 10 s / 30 s: a pool's health check only asks its event loop (and a
    # vLLM engine's flag), its forward passes run in a thread, so a replica whose loop fails to
    # answer for 10 s is hung (stopped, deadlocked); Serve then replaces it after about 30 s
    # instead of 90. A forward stuck in its thread still answers: coordinator.pool_stall_s
    # reports that one to clients.
    health_check_period_s: PositiveFloat = Field(5.0, description="Seconds between Serve's health checks of each "
                                                                  "replica.")
    health_check_timeout_s: PositiveFloat = Field(10.0, description="Seconds a health check may take before it "
                                                                    "counts as failed; Serve replaces a replica "
                                                                    "after 3 failed in a row: a hung replica about "
                                                                    "30 s after it stopped answering.")
    max_ongoing_requests: PositiveInt = Field(32, description="Step calls one replica holds at once (running, "
                                                              "batching, or waiting for the running pass); "
                                                              "the router queues the rest. At least "
                                                              "max_batch_size, or batches could never fill.")
    max_batch_size: PositiveInt = Field(16, description="Most calls (steps of concurrent requests) merged into one "
                                                        "batched forward pass; at most max_ongoing_requests. "
                                                        "Changed in place on running replicas (the deployment's "
                                                        "user_config).")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="Seconds an idle pool waits for more calls before "
                                                               "it runs a batch. Under load no wait is needed: calls "
                                                               "that arrive during a pass join the next one. "
                                                               "Changed in place, like max_batch_size.")

    @model_validator(mode="after")
    def _batching(self) -> PoolSpec:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        return self

    session_affinity: bool = Field(True, description="Send every step of one request to the same replica (a "
                                                     "session-affine request router: rendezvous hashing of the "
                                                     "session id the server gives each request; with merged calls "
                                                     "a request keeps its lane and a lane its replica), so the "
                                                     "replica's prefix cache (engine.enable_prefix_caching, "
                                                     "prefix_cache_mb) holds the request's earlier steps. A "
                                                     "replica with a full queue passes the call to the next in "
                                                     "rank. Matters with more than one replica. Off: Ray Serve's "
                                                     "default power-of-two-choices router, which scatters a "
                                                     "request's steps over the replicas.")
    placement_group_bundles: list[dict[str, float]] | None = Field(
        None, description="Ray placement bundles of each replica, e.g. [{'CPU': 1, 'GPU': 1}] * "
                          "tensor_parallel_size; the first bundle holds the replica actor. Required when "
                          "model.engine.tensor_parallel_size > 1. Resource names are Ray's own (CPU, GPU, memory, "
                          "case-sensitive) or custom ones; amounts >= 0.")
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = Field(
        None, description="How Ray places a replica's bundles on nodes: PACK (on as few nodes as possible), SPREAD "
                          "(on as many as possible), STRICT_PACK (all on one node, or wait), STRICT_SPREAD (each "
                          "on its own node, or wait). None: Ray's PACK. Needs placement_group_bundles.")
    placement_group_bundle_label_selector: list[dict[str, str]] | None = Field(
        None, description="Ray node labels each bundle's node must carry: one selector for all bundles, or exactly "
                          "one per bundle; needs placement_group_bundles. How a pool with bundles is pinned to a "
                          "worker group (the KubeRay rendering merges the group's label into each).")

    @field_validator("placement_group_bundles")
    @classmethod
    def _bundle_resources(cls, v: list[dict[str, float]] | None) -> list[dict[str, float]] | None:
        for i, bundle in enumerate(v or ()):
            for name, amount in bundle.items():
                if (problem := _resource_problem(name, amount, builtin_ok=True)) is not None:
                    raise ValueError(f"bundle {i}: {problem}")
        return v

    @model_validator(mode="after")
    def _placement(self) -> PoolSpec:
        tp = self.model.engine.tensor_parallel_size if self.model.engine else 1
        if tp > 1 and not self.placement_group_bundles:
            raise ValueError(f"model.engine.tensor_parallel_size={tp} needs placement_group_bundles "
                             f"(one bundle with a GPU per rank)")
        if self.placement_group_strategy and not self.placement_group_bundles:
            raise ValueError("placement_group_strategy needs placement_group_bundles")
        selectors = self.placement_group_bundle_label_selector
        if selectors is not None:
            if not self.placement_group_bundles:
                raise ValueError("placement_group_bundle_label_selector needs placement_group_bundles")
            if len(selectors) not in (1, len(self.placement_group_bundles)):
                raise ValueError(f"placement_group_bundle_label_selector: {len(selectors)} selectors for "
                                 f"{len(self.placement_group_bundles)} bundles (give 1, or one per bundle)")
        return self

    def max_replicas(self) -> int:
        """The most replicas this pool can have (autoscaling bound, or its fixed count)."""
        if self.autoscaling_config is not None:
            return self.autoscaling_config.max_replicas
        return self.num_replicas or 1

    def merge_lanes(self) -> int:
        """Lanes of the coordinator's merged calls to this pool (``arbitrage_common.coalesce``):
        one for a single replica (every concurrent call can merge); else several per replica,
        so the lanes, each pinned to a replica by affinity, spread over all of them."""
        replicas = self.max_replicas()
        return 1 if replicas <= 1 else LANES_PER_REPLICA * replicas

    def scaling_options(self, merged_calls: bool = False) -> dict[str, Any]:
        """``DeploymentSpec.scaling_options``; an autoscaling pool that counts rows
        (``load_metric``) gets the rows policy (``arbitrage_common.autoscaling``)."""
        opts = super().scaling_options()
        if self.autoscaling_config is not None and self.load_metric(merged_calls) == "rows":
            opts["autoscaling_config"]["policy"] = {"policy_function": ROWS_POLICY_FUNCTION}
        return opts

    def user_config(self) -> dict[str, Any]:
        """Live knobs (``reconfigure``): changing them updates replicas in place."""
        return {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s}

    def load_metric(self, merged_calls: bool) -> Literal["rows", "calls"]:
        """What this pool's ``target_ongoing_requests`` counts (``AutoscalingSpec.load_metric``;
        by default rows when the coordinator merges calls to it)."""
        chosen = self.autoscaling_config.load_metric if self.autoscaling_config is not None else None
        return chosen or ("rows" if merged_calls else "calls")

    def deployment_options(self, name: str, merged_calls: bool = False) -> dict[str, Any]:
        """``DeploymentSpec.deployment_options``, plus the batching knobs, placement and the
        rows policy (``scaling_options``). ``merged_calls``: the coordinator merges calls
        (``coordinator.merge_calls``; ``AppConfig.pool_options`` passes it)."""
        opts = {**super().deployment_options(name), "user_config": self.user_config(),
                **self.scaling_options(merged_calls)}
        if self.placement_group_bundles:
            opts["placement_group_bundles"] = [dict(b) for b in self.placement_group_bundles]
            if self.placement_group_strategy:
                opts["placement_group_strategy"] = self.placement_group_strategy
            if self.placement_group_bundle_label_selector:
                opts["placement_group_bundle_label_selector"] = [dict(s) for s in
                                                                 self.placement_group_bundle_label_selector]
        return opts


class CoordinatorSpec(DeploymentSpec):
    """The coordinator deployment: gRPC servicer and HTTP ingress; holds no model."""

    max_ongoing_requests: PositiveInt = Field(64, description="Requests one coordinator replica runs at once (each "
                                                              "is a step loop awaiting the pools).")
    # Bounded by default: an unbounded queue answers overload with ever longer waits, which
    # timeout_s does not cover (its clock starts when a replica takes the request), never 503.
    max_queued_requests: int = Field(512, description="Requests each Serve proxy queues for the coordinator "
                                                      "beyond the ongoing ones before it answers RESOURCE_EXHAUSTED "
                                                      "/ 503 with Retry-After; -1: unbounded, else at least 1.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After seconds advised on overload (503).")
    graceful_shutdown_timeout_s: float = Field(300.0, ge=0, description="Seconds a stopping coordinator replica "
                                                                        "may finish its requests; at least "
                                                                        "limits.request_timeout_s (validated), "
                                                                        "so a downscale drops no request in "
                                                                        "flight.")
    pool_retries: int = Field(8, ge=0, description="Retries of one pool call that failed because its replica "
                                                   "died or its pool was full (within the request's deadline).")
    retry_backoff_s: float = Field(0.05, gt=0, description="First retry backoff; it doubles per retry (full "
                                                          "jitter), capped at 1 s.")
    health_probe_s: float = Field(2.0, ge=MIN_HEALTH_PROBE_S, description="How often each coordinator replica "
                                                                          "probes the pools for gRPC Check/Watch "
                                                                          "and /healthz, seconds (at least 0.1: "
                                                                          "each probe asks the Serve controller).")
    fail_fast_after_s: float = Field(10.0, ge=0, description="How long a pool must have had no running replica, "
                                                             "with Serve reporting it failing (UNHEALTHY, "
                                                             "DEPLOY_FAILED), before calls to it end at once as "
                                                             "UNAVAILABLE instead of waiting for a replica, seconds: a "
                                                             "replica restarting in place is waited for, a lost "
                                                             "node's is not. Seen at the health probes "
                                                             "(health_probe_s). 0: at the first probe that finds it.")
    pool_stall_s: PositiveFloat | None = Field(30.0, description="A request whose deadline passes while a pool it "
                                                                "waits on has answered nothing for this long, "
                                                                "though calls were out to it, ends UNAVAILABLE / "
                                                                "503 naming the pool (a hung replica: retry later), "
                                                                "not DEADLINE_EXCEEDED (raise your deadline), "
                                                                "seconds. Time a call waits before it leaves (merge "
                                                                "lanes, call slots, backoff) does not count, nor "
                                                                "does a pool that keeps answering other calls, "
                                                                "though a merged lane (one replica) silent while "
                                                                "the others answer does. Set "
                                                                "it above the longest step call a healthy pool "
                                                                "takes alone. None: always DEADLINE_EXCEEDED.")
    merge_calls: bool = Field(True, exclude_if=lambda v: v is True,
                              description="Merge the step calls that concurrent requests make to one pool into one "
                                          "Serve call per lane (arbitrage_common.coalesce): under load a handle "
                                          "call costs as much CPU as a small model's step. An idle pool still gets "
                                          "each call at once; affinity holds (a request keeps its lane, a lane its "
                                          "replica). Off: one Serve call per step call.")
    pool_calls_in_flight: PositiveInt | None = Field(None, exclude_if=lambda v: v is None,
                                                     description="Most merged pool calls one coordinator replica "
                                                                 "has out at once, over all pools (needs "
                                                                 "merge_calls). For pools that share a few cores: "
                                                                 "rows wait for a slot and merge into bigger, "
                                                                 "cheaper batches instead of time-slicing the "
                                                                 "cores; a freed slot goes to the pool whose oldest "
                                                                 "row waited longest. vLLM pools never wait for a slot (their "
                                                                 "engines batch continuously). None: no shared "
                                                                 "limit (pools on their own nodes or GPUs).")
    pool_calls_over_grpc: bool = Field(True, exclude_if=lambda v: v is True,
                                       description="Step calls to the pools go over Serve's direct gRPC channel "
                                                   "between replicas (the handle option _by_reference=False; what "
                                                   "RAY_SERVE_THROUGHPUT_OPTIMIZED turns on cluster-wide) instead "
                                                   "of Ray actor tasks with results in the object store. Measured "
                                                   "on the CPU default (serve bench): serving overhead 0.97 against "
                                                   "1.11, 16-client throughput +15 %. Off: actor tasks.")

    @model_validator(mode="after")
    def _slots_need_merging(self) -> CoordinatorSpec:
        if self.pool_calls_in_flight is not None and not self.merge_calls:
            raise ValueError("pool_calls_in_flight limits merged calls: it needs merge_calls: true")
        return self

    def scaling_options(self) -> dict[str, Any]:
        """``DeploymentSpec.scaling_options``; autoscaling, the requests policy: Serve's count
        less the open health watches (``arbitrage_common.autoscaling.requests_policy``)."""
        opts = super().scaling_options()
        if self.autoscaling_config is not None:
            opts["autoscaling_config"]["policy"] = {"policy_function": REQUESTS_POLICY_FUNCTION}
        return opts

    @model_validator(mode="after")
    def _scales_on_requests(self) -> CoordinatorSpec:
        if self.autoscaling_config is not None and self.autoscaling_config.load_metric == "rows":
            raise ValueError("autoscaling_config.load_metric: 'rows' counts a model pool's rows; the coordinator "
                             "scales on its requests ('calls' or unset)")
        return self


class PoolsSpec(StrictModel):
    """The four pools. Router and PRM are optional: a policy that needs a missing one is refused."""

    draft: PoolSpec = Field(description="Draft generator pool (the cheap model writes first).")
    target: PoolSpec = Field(description="Target generator pool (writes routed steps).")
    router: PoolSpec | None = Field(None, description="Router scorer pool (policy 'arbitrage'). None: no router; "
                                                      "requests for 'arbitrage' are refused, and policy.default "
                                                      "may not be 'arbitrage'.")
    prm: PoolSpec | None = Field(None, description="Process reward model pool (policies 'rsd', 'oracle'). None: no "
                                                   "PRM; requests for those are refused, and policy.default may "
                                                   "be neither.")

    def configured(self) -> list[tuple[Role, PoolSpec]]:
        """(role, spec) of every configured pool, generators first."""
        return [(role, spec) for role in (*GENERATOR_ROLES, *SCORER_ROLES)
                if (spec := getattr(self, role)) is not None]

