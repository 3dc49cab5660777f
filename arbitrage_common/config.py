"""The application config: one validated pydantic model, many renderings.

``AppConfig`` describes the whole service: four model pools (draft, target, router, PRM),
the coordinator, the default policy, request limits and the ports. ``services.app:build_app``
builds the Ray Serve application from it, ``render_serve_config`` renders the Serve YAML
(whose ``applications[0].args`` is this config again), and the RayService manifest embeds
that YAML. No Ray, torch or transformers imports here: configs load and validate anywhere.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .autoscaling import POLICY_FUNCTION as ROWS_POLICY_FUNCTION
from .autoscaling import REQUESTS_POLICY_FUNCTION
from .errors import InvalidArgument
from .kuberay.spec import RESERVED_PORTS, ClusterSpec
from .paths import project_home
from .policies import POLICIES, make_policy
from .steps import DEFAULT_PROMPT_TEMPLATE, PROBLEM_FIELD, STEP_DELIMITER
from .threshold_control import ADJUSTABLE_POLICIES, FEWER_TARGET_CALLS

Backend = Literal["transformers", "vllm"]
Role = Literal["draft", "target", "router", "prm"]
GENERATOR_ROLES: tuple[Role, ...] = ("draft", "target")
SCORER_ROLES: tuple[Role, ...] = ("router", "prm")
COORDINATOR = "coordinator"  # the coordinator's deployment name
# Environment of every Ray node of a cluster this project starts: a local one inherits the
# starting process's (services.local), a RayService's Pods get it as container env
# (arbitrage_common.kuberay.render). The Serve proxies then call the coordinator over Serve's
# direct gRPC channel between replicas, as coordinator.pool_calls_over_grpc does for the pools
# (serve bench, 3 runs each: overhead 1.02 against 1.07 without it). A variable already set wins.
RAY_CLUSTER_ENV: dict[str, str] = {"RAY_SERVE_PROXY_USE_GRPC": "1"}

# The shortest coordinator.health_probe_s: each probe asks the Serve controller
# (serve.status()), from every coordinator replica; faster would keep the controller busy.
MIN_HEALTH_PROBE_S = 0.1

# Merged-call lanes per pool replica when a pool can have several (PoolSpec.merge_lanes):
# more lanes than replicas so that hashing the lanes onto replicas leaves none without one.
LANES_PER_REPLICA = 4

APP_IMPORT_PATH = "services.app:build_app"
GRPC_SERVICER_FUNCTIONS = [
    # The generated registration, with request parsing that leaves a malformed message to the
    # coordinator (INVALID_ARGUMENT) rather than grpc (UNKNOWN with protobuf's exception text).
    "services.proxy_status.add_arbitrage_service",
    "services.proxy_status.add_health_service",
    # Not a servicer: the hook that runs in every proxy; a dead coordinator replica -> UNAVAILABLE.
    "services.proxy_status.install",
]


class _Strict(BaseModel):
    # No .inf / .nan: no field means "unbounded" by infinity, and a non-finite interval or
    # budget would silently switch a mechanism off.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class EngineSpec(_Strict):
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
                          "GPU, 'mp' on several). 'uni' needs tensor_parallel_size 1.")

    @model_validator(mode="after")
    def _uni_is_one_worker(self) -> EngineSpec:
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(f"distributed_executor_backend 'uni' runs one worker: tensor_parallel_size="
                             f"{self.tensor_parallel_size} needs 'mp' (or None)")
        return self


class ModelSpec(_Strict):
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
    threads: PositiveInt | None = Field(1, description="torch intra-op threads per replica (None: torch's "
                                                       "default, one per core). Keep 1 on small CPU machines.")
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
                                                                    "generators (fast Llama path) and causal-LM "
                                                                    "scorers use it; classifier scorers have none. "
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


class AutoscalingSpec(_Strict):
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


class ActorOptionsSpec(_Strict):
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


class DeploymentSpec(_Strict):
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


class PoolsSpec(_Strict):
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


class LoadControlSpec(_Strict):
    """Load-aware thresholds (``arbitrage_common.threshold_control``; off by default): each
    coordinator replica moves thresholds toward fewer target calls while its target calls run
    over budget, and back as load falls. A threshold the client sets itself is never moved."""

    enabled: bool = Field(False, description="Run the controller in every coordinator replica. Enabled, it needs "
                                             "latency_budget_ms or in_flight_budget (or both) and at least one "
                                             "entry in policies.")
    latency_budget_ms: PositiveFloat | None = Field(None, description="Budget for the EWMA of one target call's "
                                                                      "wall latency (queueing and retries "
                                                                      "included), ms. None: no latency signal.")
    in_flight_budget: PositiveFloat | None = Field(None, description="Budget for the mean target calls in flight "
                                                                     "from one coordinator replica (e.g. target "
                                                                     "replicas x max_batch_size / coordinator "
                                                                     "replicas). None: no queue signal.")
    gain: float = Field(0.05, gt=0, le=1, description="Offset raised per interval per unit of relative excess "
                                                      "over budget (capped at 1: twice the budget).")
    decay: float = Field(0.02, gt=0, le=1, description="Offset lowered per interval per unit of relative slack "
                                                       "under budget (1 when idle).")
    deadband: float = Field(0.1, ge=0, lt=1, description="Relative band around the budget in which the offset "
                                                         "holds (0.1: within 10%).")
    max_offset: float = Field(0.3, gt=0, le=1, description="Most the threshold moves from its base.")
    interval_s: PositiveFloat = Field(1.0, description="Seconds between updates of the offset.")
    latency_alpha: float = Field(0.2, gt=0, le=1, description="EWMA weight of each new latency sample.")
    policies: tuple[str, ...] = Field(ADJUSTABLE_POLICIES, description="Policies whose threshold is controlled, "
                                                                       f"each of {', '.join(ADJUSTABLE_POLICIES)} "
                                                                       "at most once.")
    threshold_limits: dict[str, float] = Field(default_factory=dict, description="Per policy, the furthest "
                                                                                 "threshold the controller may "
                                                                                 "set (arbitrage: a ceiling, "
                                                                                 "default 1; rsd: a floor, "
                                                                                 "default 0). Keys: "
                                                                                 f"{', '.join(ADJUSTABLE_POLICIES)}"
                                                                                 "; values in [0, 1]. While "
                                                                                 "enabled, each must lie beyond "
                                                                                 "its policy's base threshold "
                                                                                 "(policy.threshold for the "
                                                                                 "default policy, else the "
                                                                                 "policy's default) on the side "
                                                                                 "of fewer target calls: above "
                                                                                 "it for arbitrage, below it "
                                                                                 "for rsd.")

    @model_validator(mode="after")
    def _valid(self) -> LoadControlSpec:
        if self.enabled and self.latency_budget_ms is None and self.in_flight_budget is None:
            raise ValueError("latency_budget_ms / in_flight_budget: an enabled controller needs at least one budget")
        for field, names in (("policies", self.policies), ("threshold_limits", tuple(self.threshold_limits))):
            for name in names:
                if name not in ADJUSTABLE_POLICIES:
                    raise ValueError(f"{field}: {name!r} cannot be load-controlled; expected one of "
                                     f"{', '.join(ADJUSTABLE_POLICIES)} (policies whose threshold gates target calls)")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policies: lists a policy twice: {list(self.policies)}")
        if self.enabled and not self.policies:
            raise ValueError("policies: an enabled controller needs at least one policy")
        for name, limit in self.threshold_limits.items():
            if not (math.isfinite(limit) and 0.0 <= limit <= 1.0):
                raise ValueError(f"threshold_limits.{name}: must be in [0, 1], got {limit!r}")
        return self

    def limit_problem(self, default_policy: str, threshold: float | None) -> str | None:
        """Why a ``threshold_limits`` entry leaves the controller no room to move (it lies at or
        past the base threshold, on the side of more target calls), or None. The base is
        ``threshold`` (policy.threshold) for ``default_policy``, else the policy's default."""
        for name, limit in self.threshold_limits.items():
            base = threshold if name == default_policy and threshold is not None else POLICIES[name].default_threshold
            direction = FEWER_TARGET_CALLS[name]
            if base is not None and (limit - base) * direction <= 0:
                side, moves = ("above", "raises") if direction > 0 else ("below", "lowers")
                return (f"policy.load_control.threshold_limits.{name}: {limit:g} must lie {side} {name}'s base "
                        f"threshold {base:g} (policy.threshold for the default policy, else the policy's "
                        f"default): the controller {moves} {name}'s threshold under load, up to this limit, so "
                        f"it could never move")
        return None


# For PolicySpec.threshold's description: "rsd [0, 1]; ...".
_THRESHOLD_RANGES = "; ".join(f"{name} [{cls.threshold_range[0]:g}, {cls.threshold_range[1]:g}]"
                    for name, cls in POLICIES.items() if cls.threshold_range)


class PolicySpec(_Strict):
    """Defaults for requests that do not name a policy or threshold, and which ones they may name."""

    default: str = Field("arbitrage", description=f"Default policy, one of {', '.join(POLICIES)}. The pool its "
                                                  "scorer needs must be configured (arbitrage: pools.router; rsd, "
                                                  "oracle: pools.prm).")
    threshold: float | None = Field(None, description="Default threshold of the default policy (None: the "
                                                      "policy's own default), within its range: "
                                                      f"{_THRESHOLD_RANGES} (the others take none).")
    allowed: list[str] | None = Field(None, exclude_if=lambda v: v is None,
                                      description="Policies a client may name (None: all). oracle and target "
                                                  "run the target on every step: leave them out to keep clients "
                                                  "off them. Names as for default; must include the "
                                                  "default.")
    threshold_override: bool = Field(True, exclude_if=lambda v: v is True,
                                     description="Clients may set a request's threshold (threshold 0 sends every "
                                                 "step to the target, and an explicit threshold is exempt from "
                                                 "load control). false: refused naming 'threshold'.")
    load_control: LoadControlSpec = Field(default_factory=LoadControlSpec, exclude_if=lambda v: v == LoadControlSpec(),
                                          description="Load-aware thresholds (off; left out of renderings "
                                                      "while default).")

    @model_validator(mode="after")
    def _valid(self) -> PolicySpec:
        try:
            make_policy(self.default, self.threshold)
        except InvalidArgument as exc:
            raise ValueError(str(exc)) from None
        if self.allowed is not None:
            unknown = [name for name in self.allowed if name not in POLICIES]
            if unknown:
                raise ValueError(f"allowed: unknown policy {unknown[0]!r}; expected names from {', '.join(POLICIES)}")
            if self.default not in self.allowed:
                raise ValueError(f"allowed: must include the default policy {self.default!r}")
        return self


class PromptSpec(_Strict):
    """How a problem is shown to the generators (both pools share it: draft and target are one family)."""

    template: str = Field(DEFAULT_PROMPT_TEMPLATE, description="Text the generators continue before the first "
                                                               "step; '{problem}' is replaced by the problem. "
                                                               "Chat models put their chat template here. Scorers "
                                                               "read the raw problem.")
    step_delimiter: Literal["\n\n"] = Field(STEP_DELIMITER, description="Text between steps (a blank line, as "
                                                                         "in the paper); fixed.")

    @field_validator("template")
    @classmethod
    def _has_problem(cls, v: str) -> str:
        if PROBLEM_FIELD not in v:
            raise ValueError(f"must contain {PROBLEM_FIELD}")
        return v


class LimitsSpec(_Strict):
    """Per-request limits; requests outside them get INVALID_ARGUMENT / 422."""

    max_prompt_chars: PositiveInt = Field(4000, description="Longest prompt accepted, characters.")
    max_steps: PositiveInt = Field(64, description="Largest max_steps a request may ask for.")
    default_max_steps: PositiveInt = Field(16, description="max_steps when a request sets none; at most "
                                                           "max_steps.")
    max_new_tokens: PositiveInt = Field(2048, description="Largest max_new_tokens a request may ask for.")
    default_max_new_tokens: PositiveInt = Field(512, description="max_new_tokens when a request sets none; at "
                                                                 "most max_new_tokens.")
    step_max_tokens: PositiveInt = Field(64, description="Token limit of one generated step.")
    request_timeout_s: PositiveFloat = Field(60.0, description="Deadline of one request, seconds; past it: "
                                                               "DEADLINE_EXCEEDED / 504. Requests may ask for less. At "
                                                               "most coordinator.graceful_shutdown_timeout_s.")
    max_body_bytes: PositiveInt = Field(1024 * 1024, description="Largest HTTP request body, bytes (Content-Length, "
                                                                 "or counted as a chunked body arrives); larger: "
                                                                 "413 payload_too_large.")
    max_grpc_message_bytes: PositiveInt = Field(1024 * 1024, description="Largest gRPC request message, bytes "
                                                                         "(checked by the coordinator); larger: "
                                                                         "INVALID_ARGUMENT payload_too_large.")
    step_pipelining: bool = Field(False, exclude_if=lambda v: v is False,
                                  description="Step pipelining for arbitrage and rsd (LoopRequest.pipeline): the "
                                              "draft writes step k+1 while step k is scored, dropped if step k goes "
                                              "to the target. Same outputs, lower latency where the draft and "
                                              "scorer have a core or a device to overlap on; costs the dropped "
                                              "drafts' work (see step_pipelining_max_inflight). On in the embedded "
                                              "default (serve bench: overhead 0.97 against 1.06 off); off unless "
                                              "set. Left out of renderings while off.")
    step_pipelining_max_inflight: PositiveInt | None = Field(
        None, exclude_if=lambda v: v is None,
        description="With step_pipelining: pipeline a request only if at most this many requests (itself "
                    "included) are in flight on its coordinator replica when it starts; busier, it runs the plain "
                    "loop, so early drafts use spare capacity and never take it from other requests (as "
                    "speculative decoding is turned off above a batch size). None: every request. Needs "
                    "step_pipelining: true. Left out of renderings while None.")
    draft_lookahead: int = Field(0, ge=0, le=8, exclude_if=lambda v: v == 0,
                                 description="Draft lookahead for arbitrage and rsd (LoopRequest.lookahead): one "
                                             "draft call also writes this many steps after its step, as if each "
                                             "were kept, and one scorer call scores them all; while the draft is "
                                             "kept the next steps need no pool call, and a step that goes to the "
                                             "target drops the rest. Same outputs; fewer pool calls for the "
                                             "dropped drafts' and scores' work. 0: off; at most 8. Not "
                                             "with step_pipelining. Left out of renderings while 0.")

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> LimitsSpec:
        if self.default_max_steps > self.max_steps:
            raise ValueError("default_max_steps must be <= max_steps")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must be <= max_new_tokens")
        if self.step_pipelining_max_inflight is not None and not self.step_pipelining:
            raise ValueError("step_pipelining_max_inflight needs step_pipelining: true")
        if self.draft_lookahead and self.step_pipelining:
            raise ValueError("draft_lookahead and step_pipelining cannot both be on (both guess that a step is kept)")
        return self


class AuthSpec(_Strict):
    """Optional API key authentication (``arbitrage_common.auth``); off unless ``api_key_env`` is set."""

    api_key_env: str | None = Field(None, description="Name of the environment variable that holds the API key, "
                                                      "or keys separated by commas (never the key itself). Set, "
                                                      "every route but /healthz and /livez and every gRPC call "
                                                      "but grpc.health.v1 and reflection (grpc.enable_reflection) "
                                                      "needs 'Authorization: Bearer <key>'; the variable must be "
                                                      "set on every node (a coordinator replica without it fails "
                                                      "to start). None: no authentication.")
    k8s_secret: str | None = Field(None, description="KubeRay: the Secret whose key named like api_key_env holds "
                                                     "the keys; rendered as env on every Pod (None: "
                                                     "'<name>-api-keys').")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(f"{v!r} is not an environment variable name (letters, digits, '_'; the key itself "
                             f"never goes into the config)")
        return v

    @field_validator("k8s_secret")
    @classmethod
    def _secret_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", v):
            raise ValueError(f"{v!r} is not a Kubernetes Secret name (lowercase letters, digits, '-', '.')")
        return v


def _not_a_ray_port(port: int) -> int:
    """A proxy port must differ from the ports Ray itself binds on every node of a rendered
    KubeRay cluster (``kuberay.spec.RESERVED_PORTS``): the head's GCS, dashboard and client
    server, and every Pod's metrics export port."""
    if port in RESERVED_PORTS:
        fixed = ", ".join(f"{name} {p}" for p, name in sorted(RESERVED_PORTS.items()))
        raise ValueError(f"{port} is Ray's {RESERVED_PORTS[port]} port on the cluster this config renders to "
                         f"(`arbitrage k8s render`; Ray's fixed ports: {fixed}); choose another")
    return port


class HTTPSpec(_Strict):
    """The HTTP proxy (Serve ``http_options``) on every node."""

    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 in containers).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port (FastAPI ingress, OpenAI-compatible routes); "
                                                        "not one of Ray's (6379, 8080, 8265, 10001), nor grpc.port.")

    _port = field_validator("port")(_not_a_ray_port)


class GRPCSpec(_Strict):
    """The gRPC proxy (Serve ``grpc_options``) on every node."""

    port: int = Field(9000, ge=1, le=65535, description="gRPC port (ArbitrageService, health, reflection); not one "
                                                        "of Ray's (6379, 8080, 8265, 10001), nor http.port.")
    enable_reflection: bool = Field(True, description="Serve gRPC server reflection.")

    _port = field_validator("port")(_not_a_ray_port)


# AppConfig.name is the Serve application's name and the KubeRay RayService's metadata.name:
# KubeRay requires a DNS-1035 label of at most 63 - len("-serve-svc") - 6 = 47 characters.
MAX_APP_NAME_LEN = 47
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


class AppConfig(_Strict):
    """The whole service. ``services.app:build_app(cfg.model_dump())`` builds it."""

    name: str = Field("arbitrage", description="Serve application name (gRPC clients of a multi-app cluster send "
                                               "it as 'application' metadata) and the KubeRay RayService's "
                                               "metadata.name: a DNS-1035 label of at most 47 characters.")
    served_model_name: str = Field("arbitrage-serve", description="Model id of the default policy on the "
                                                                  "OpenAI-compatible routes (/v1/models, and the "
                                                                  "`model` a request sends; a policy name there "
                                                                  "picks that policy). Not a policy name.")
    base_dir: str | None = Field(None, description="Directory relative model paths resolve against (None: the "
                                                   "builder's working directory). Environment variables expand "
                                                   "where the app is built, e.g. '${ARBITRAGE_HOME}'.")
    model_path_check: Literal["build", "replicas"] = Field(
        "build", description="Where every model path is checked before a model loads: 'build' (where the app is "
                             "built, e.g. `arbitrage serve`; all pools at once) or 'replicas' (each pool replica "
                             "checks its own path on its node: clusters whose head Pod holds no weights). Pool "
                             "replicas always check their own path.")
    pools: PoolsSpec = Field(description="The model pools.")
    coordinator: CoordinatorSpec = Field(default_factory=CoordinatorSpec, description="The coordinator deployment.")
    policy: PolicySpec = Field(default_factory=PolicySpec, description="Default policy and threshold, the "
                                                                       "policies clients may name, and "
                                                                       "load-aware thresholds.")
    prompt: PromptSpec = Field(default_factory=PromptSpec, description="Prompt template and step delimiter.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Per-request limits (prompt, steps, "
                                                                       "tokens, message sizes), the deadline, and "
                                                                       "step pipelining and draft lookahead.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="API key authentication (off by default).")
    http: HTTPSpec = Field(default_factory=HTTPSpec, description="HTTP proxy options.")
    grpc: GRPCSpec = Field(default_factory=GRPCSpec, description="gRPC proxy options.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, exclude_if=lambda v: v == ClusterSpec(),
                                 description="KubeRay layout: image, worker-group Pod shapes and scheduling knobs "
                                             "(`arbitrage k8s render`). The app never reads it: left out of "
                                             "renderings while default, and of the RayService's serveConfigV2.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # `arbitrage k8s render` makes it the RayService's metadata.name, which KubeRay only accepts
        # as a DNS-1035 label of at most 47 characters (it appends 6 for the RayCluster's name).
        if len(v) > MAX_APP_NAME_LEN or not _DNS1035_LABEL.fullmatch(v):
            raise ValueError(f"{v!r} is not a DNS-1035 label of at most {MAX_APP_NAME_LEN} characters (lowercase "
                             f"letters, digits and '-', starting with a letter and ending with a letter or digit, "
                             f"e.g. 'arbitrage-demo'): it is the KubeRay RayService's metadata.name")
        return v

    @model_validator(mode="after")
    def _scorers_on_transformers(self) -> AppConfig:
        for role in SCORER_ROLES:
            spec = getattr(self.pools, role)
            if spec is not None and spec.model.backend != "transformers":
                raise ValueError(f"pools.{role}.model.backend: scorer pools run on 'transformers' "
                                 f"(see docs/PRESETS.md for why)")
        return self

    @model_validator(mode="after")
    def _scorer_fields_on_scorers(self) -> AppConfig:
        # Generators would ignore them: refused, so a config never says what does not happen.
        for role in GENERATOR_ROLES:
            model = getattr(self.pools, role).model
            if model.annotate_history is not None:
                raise ValueError(f"pools.{role}.model.annotate_history: only router and PRM pools annotate the "
                                 f"history they score; leave it unset on a generator pool")
            if model.device != "auto":
                raise ValueError(f"pools.{role}.model.device: only router and PRM pools take a device; a "
                                 f"generator pool runs where its backend does (transformers: the CPU, vLLM: the "
                                 f"replica's GPUs); leave it 'auto'")
        return self

    @field_validator("served_model_name")
    @classmethod
    def _not_a_policy(cls, v: str) -> str:
        if v in POLICIES:  # the OpenAI routes read a policy name in `model` as that policy
            raise ValueError(f"{v!r} is a policy name, which a request's `model` uses to pick that policy; "
                             f"choose another id (default 'arbitrage-serve')")
        return v

    @model_validator(mode="after")
    def _drain_outlasts_requests(self) -> AppConfig:
        grace, timeout = self.coordinator.graceful_shutdown_timeout_s, self.limits.request_timeout_s
        if grace < timeout:
            raise ValueError(f"coordinator.graceful_shutdown_timeout_s ({grace:g}) must be >= "
                             f"limits.request_timeout_s ({timeout:g}): a stopping coordinator replica would drop "
                             f"requests still in flight")
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> AppConfig:
        if self.grpc.port == self.http.port:
            raise ValueError(f"grpc.port: {self.grpc.port} is also http.port; the gRPC and HTTP proxies each "
                             f"bind their own port")
        return self

    @model_validator(mode="after")
    def _default_policy_runs(self) -> AppConfig:
        scorer = POLICIES[self.policy.default].scorer
        if scorer is not None and getattr(self.pools, scorer) is None:
            raise ValueError(f"policy.default: policy {self.policy.default!r} needs the {scorer} pool "
                             f"(pools.{scorer}), which is not configured")
        return self

    @model_validator(mode="after")
    def _load_control_can_move(self) -> AppConfig:
        if not self.policy.load_control.enabled:  # limits of a controller that is off bind nothing
            return self
        problem = self.policy.load_control.limit_problem(self.policy.default, self.policy.threshold)
        if problem is not None:
            raise ValueError(problem)
        return self

    def pool_options(self, role: Role) -> dict[str, Any]:
        """``serve.deployment`` options of one pool as this config runs it (``build_app``, ``config
        check``): a pool whose calls the coordinator merges autoscales on rows by default."""
        return getattr(self.pools, role).deployment_options(role, merged_calls=self.coordinator.merge_calls)

    def scaling(self) -> dict[str, dict[str, Any]]:
        """Every deployment's replica fields (``DeploymentSpec.scaling``), by deployment name:
        the coordinator's ``user_config`` (``COORDINATOR_SCALING_KEY``), so it follows a change of
        the pools' bounds in place (its merge lanes, scale-to-zero readiness, load control)."""
        specs = [*self.pools.configured(), (COORDINATOR, self.coordinator)]
        return {name: fields for name, spec in specs if (fields := spec.scaling())}

    def with_scaling(self, scaling: Any) -> AppConfig:
        """This config with the replica fields of ``scaling`` (``merge_scaling``), validated."""
        data = self.model_dump(mode="json")
        merge_scaling(data, scaling)
        return AppConfig.model_validate(data)

    def resolve_path(self, path: str) -> str:
        """Absolute model path (relative ones against base_dir or the working directory)."""
        p = Path(os.path.expandvars(path)).expanduser()
        if not p.is_absolute():
            p = Path(os.path.expandvars(self.base_dir)).expanduser() / p if self.base_dir else Path.cwd() / p
        return str(p.resolve())


def default_config() -> AppConfig:
    """The embedded default: local CPU, the bundled models, HTTP 8000, gRPC 9000."""
    def pool(name: str, **kw: Any) -> PoolSpec:
        return PoolSpec(model=ModelSpec(path=f"models/{name}"), ray_actor_options=ActorOptionsSpec(num_cpus=0), **kw)

    return AppConfig(
        base_dir=str(project_home()),  # the checkout (or install, or $ARBITRAGE_HOME) that holds models/
        pools=PoolsSpec(draft=pool("draft"), target=pool("target"), router=pool("router"), prm=pool("prm")),
        # Two pool forwards at once, one per core of the machine the pools share; rows that wait
        # merge into bigger batches (serve bench: 16-client requests/s +7-19 %).
        coordinator=CoordinatorSpec(ray_actor_options=ActorOptionsSpec(num_cpus=0), pool_calls_in_flight=2),
        # Early drafts while at most two requests run: one request leaves a core idle, and the
        # draft writes the next step on it (serve bench: overhead 0.97 against 1.06 off).
        limits=LimitsSpec(step_pipelining=True, step_pipelining_max_inflight=2),
    )


def yaml_error(exc: Exception) -> str:
    """One line for a YAML parse error: what is wrong and where (1-based line and column)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validation_problems(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, message) of every error of a pydantic ValidationError, each message on one
    line. A whole-config validator's error has no location: its message starts with the field
    it blames (``"grpc.port: ..."``), which becomes the field."""
    out = []
    for err in exc.errors():
        msg = " ".join(err["msg"].removeprefix("Value error, ").split())
        field = prefix + _loc(err["loc"]) if err["loc"] else ""
        if not field:
            named = re.match(r"([\w.\[\]]+): (.*)", msg, re.DOTALL)
            field, msg = (prefix + named[1], named[2]) if named else (prefix.rstrip(".") or "(top level)", msg)
        out.append((field, msg))
    return out


class ConfigError(ValueError):
    """A config file that does not validate: one line per problem, ``<file>: <field>: <message>``
    (what ``arbitrage config check`` prints), instead of pydantic's multi-line dump."""

    def __init__(self, file: str | Path, problems: list[tuple[str, str]]):
        self.file = str(file)
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.file}: {field}: {message}" for field, message in self.problems]

    def __reduce__(self):
        return (type(self), (self.file, self.problems))


def load_config(path: str | Path) -> AppConfig:
    """An AppConfig from a YAML (or JSON) file. Relative model paths stay relative: they
    resolve against ``base_dir`` or the builder's working directory. A file that does not
    validate raises ``ConfigError`` naming the file and each field at fault."""
    import yaml

    text = Path(path).read_text()  # OSError (missing, a directory) names the path itself
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML: {yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")  # noqa: TRY004 (a config error)
    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, validation_problems(exc)) from None


# What a rendered application's args hold for each pool's live knobs (PoolSpec.user_config): the
# real values ride in its ``deployments`` entries. Serve versions a deployment's code by a hash of
# the application's args, so a knob kept in args would restart every replica of every deployment
# when it changed; as a deployment's ``user_config`` it is applied in place (``reconfigure``).
LIVE_KNOBS_IN_ARGS: dict[str, Any] = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
# The same for every deployment's replica fields (Serve resizes in place): the real ones are the
# deployments' options, and the coordinator's user_config (AppConfig.scaling) for the app's code.
LIVE_SCALING_IN_ARGS: dict[str, Any] = {"num_replicas": None, "autoscaling_config": None}
COORDINATOR_SCALING_KEY = "scaling"


def serve_application(cfg: AppConfig) -> dict[str, Any]:
    """The Serve YAML's application of this config: ``args`` = the config, less what Serve
    changes in place (``LIVE_KNOBS_IN_ARGS``, ``LIVE_SCALING_IN_ARGS``): those are each
    deployment's options, and the coordinator's ``user_config`` holds every replica field."""
    args = cfg.model_dump(mode="json")
    deployments = []
    for role, spec in cfg.pools.configured():
        args["pools"][role].update({**LIVE_KNOBS_IN_ARGS, **LIVE_SCALING_IN_ARGS})
        deployments.append({"name": role, **spec.scaling_options(cfg.coordinator.merge_calls),
                            "user_config": spec.user_config()})
    args["coordinator"].update(LIVE_SCALING_IN_ARGS)
    deployments.append({"name": COORDINATOR, **cfg.coordinator.scaling_options(),
                        "user_config": coordinator_user_config(cfg)})
    return {"name": cfg.name, "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": args,
            "deployments": deployments}


def merge_scaling(data: dict[str, Any], scaling: Any) -> None:
    """Put ``scaling`` (``AppConfig.scaling``'s shape: deployment name -> replica fields) into
    ``data``, an AppConfig as a dict, in place: a named deployment's unnamed replica fields are
    unset, unnamed deployments keep theirs. ValueError names an entry that is not replica
    fields of a configured deployment (the coordinator's user_config holds nothing else)."""
    where = f"deployments[{COORDINATOR}].user_config.{COORDINATOR_SCALING_KEY}"
    if not isinstance(scaling, dict):
        raise ValueError(f"{where}: expected a mapping of deployment names to replica fields")  # noqa: TRY004
    pools = data.get("pools") if isinstance(data.get("pools"), dict) else {}
    for name, fields in scaling.items():
        section = data.setdefault(COORDINATOR, {}) if name == COORDINATOR else pools.get(name)
        if not isinstance(section, dict):
            raise ValueError(f"{where}.{name}: not a configured deployment")  # noqa: TRY004
        if not isinstance(fields, dict):
            raise ValueError(f"{where}.{name}: expected a mapping of replica fields")  # noqa: TRY004
        if unknown := sorted(set(fields) - set(LIVE_SCALING_IN_ARGS)):
            raise ValueError(f"{where}.{name}: {', '.join(map(str, unknown))}: not a replica field (only "
                             f"{', '.join(LIVE_SCALING_IN_ARGS)}; the rest is the app's args)")
        section.update({**LIVE_SCALING_IN_ARGS, **fields})


def coordinator_user_config(cfg: AppConfig) -> dict[str, Any]:
    """The coordinator deployment's ``user_config`` (its ``reconfigure``)."""
    return {COORDINATOR_SCALING_KEY: cfg.scaling()}


def application_args(app: dict[str, Any]) -> Any:
    """The config (a dict, unvalidated) a Serve YAML application runs: its ``args`` with each
    pool's live knobs from its deployment's ``user_config``, and every deployment's replica
    fields from the coordinator's (the inverse of ``serve_application``; ``merge_scaling``'s
    ValueError where those are not replica fields)."""
    args = app.get("args")
    if not isinstance(args, dict) or not isinstance(args.get("pools"), dict):
        return args
    out = {**args, "pools": {role: dict(pool) if isinstance(pool, dict) else pool
                             for role, pool in args["pools"].items()}}
    if isinstance(args.get(COORDINATOR), dict):
        out[COORDINATOR] = dict(args[COORDINATOR])
    scaling = None
    for deployment in app.get("deployments") or ():
        knobs = deployment.get("user_config") if isinstance(deployment, dict) else None
        if not isinstance(knobs, dict):
            continue
        if isinstance(out["pools"].get(deployment.get("name")), dict):
            out["pools"][deployment["name"]].update(knobs)
        elif deployment.get("name") == COORDINATOR and COORDINATOR_SCALING_KEY in knobs:
            scaling = knobs[COORDINATOR_SCALING_KEY]
    if scaling is not None:
        merge_scaling(out, scaling)
    return out


def application_config(app: dict[str, Any]) -> AppConfig:
    """``application_args``, validated."""
    return AppConfig.model_validate(application_args(app))


def render_serve_config(cfg: AppConfig) -> dict[str, Any]:
    """The Serve YAML (``serve run``/``serve deploy``, KubeRay ``serveConfigV2``) as a dict.
    Its single application builds from ``args`` = this config, so nothing is said twice; the
    pools' batching knobs are deployment overrides, changed in place (``serve_application``)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http.host, "port": cfg.http.port},
        "grpc_options": {
            "port": cfg.grpc.port,
            "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS),
            "enable_reflection": cfg.grpc.enable_reflection,
        },
        "applications": [serve_application(cfg)],
    }


def render_serve_yaml(cfg: AppConfig) -> str:
    import yaml

    header = ("# Rendered from an AppConfig; do not edit by hand. Regenerate with\n"
              "#   arbitrage serve --config configs/local-cpu.yaml --render -o configs/serve-local-cpu.yaml\n"
              "# Replica counts and autoscaling bounds, and the pools' max_batch_size and batch_wait_timeout_s,\n"
              "# are in `deployments` (Serve changes them in place; the coordinator's user_config repeats the\n"
              "# replica fields for its lanes); args hold stand-ins for them, so a change restarts no replica\n"
              "# (but switching a deployment between num_replicas and autoscaling_config restarts them all).\n")
    return header + yaml.safe_dump(render_serve_config(cfg), sort_keys=False, default_flow_style=False)
