"""``AppConfig``, its request-facing sections (policy, limits, auth, ports) and the embedded default."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from ..errors import InvalidArgument
from ..kuberay.spec import RESERVED_PORTS, ClusterSpec
from ..paths import project_home
from ..policies import POLICIES, make_policy
from ..steps import DEFAULT_PROMPT_TEMPLATE, PROBLEM_FIELD, STEP_DELIMITER
from ..threshold_control import ADJUSTABLE_POLICIES, FEWER_TARGET_CALLS
from .common import COORDINATOR, GENERATOR_ROLES, SCORER_ROLES, Role, StrictModel, merge_scaling
from .deployments import ActorOptionsSpec, CoordinatorSpec, ModelSpec, PoolSpec, PoolsSpec


class LoadControlSpec(StrictModel):
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


class PolicySpec(StrictModel):
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


class PromptSpec(StrictModel):
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


class LimitsSpec(StrictModel):
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


class AuthSpec(StrictModel):
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


_RAY_PORTS = ", ".join(str(p) for p in sorted(RESERVED_PORTS))


def _not_a_ray_port(port: int) -> int:
    """A proxy port must differ from the ports Ray itself binds on every node of a rendered
    KubeRay cluster (``kuberay.spec.RESERVED_PORTS``): the head's GCS, dashboard and client
    server, and every Pod's metrics export and dashboard agent ports."""
    if port in RESERVED_PORTS:
        fixed = ", ".join(f"{name} {p}" for p, name in sorted(RESERVED_PORTS.items()))
        raise ValueError(f"{port} is Ray's {RESERVED_PORTS[port]} port on the cluster this config renders to "
                         f"(`arbitrage k8s render`; Ray's fixed ports: {fixed}); choose another")
    return port


class HTTPSpec(StrictModel):
    """The HTTP proxy (Serve ``http_options``) on every node."""

    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 in containers).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port (FastAPI ingress, OpenAI-compatible routes); "
                                                        f"not one of Ray's ({_RAY_PORTS}), nor grpc.port.")

    _port = field_validator("port")(_not_a_ray_port)


class GRPCSpec(StrictModel):
    """The gRPC proxy (Serve ``grpc_options``) on every node."""

    port: int = Field(9000, ge=1, le=65535, description="gRPC port (ArbitrageService, health, reflection); not one "
                                                        f"of Ray's ({_RAY_PORTS}), nor http.port.")
    enable_reflection: bool = Field(True, description="Serve gRPC server reflection.")

    _port = field_validator("port")(_not_a_ray_port)


# AppConfig.name is the Serve application's name and the KubeRay RayService's metadata.name:
# KubeRay requires a DNS-1035 label of at most 63 - len("-serve-svc") - 6 = 47 characters.
MAX_APP_NAME_LEN = 47
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


class AppConfig(StrictModel):
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

