"""The config's shared names: roles, deployment names, what the Serve YAML's args leave to
the deployments, and the strict base model."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

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

# What a rendered application's args hold for each pool's live knobs (PoolSpec.user_config): the
# real values ride in its ``deployments`` entries. Serve versions a deployment's code by a hash of
# the application's args, so a knob kept in args would restart every replica of every deployment
# when it changed; as a deployment's ``user_config`` it is applied in place (``reconfigure``).
LIVE_KNOBS_IN_ARGS: dict[str, Any] = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
# The same for every deployment's replica fields (Serve resizes in place): the real ones are the
# deployments' options, and the coordinator's user_config (AppConfig.scaling) for the app's code.
LIVE_SCALING_IN_ARGS: dict[str, Any] = {"num_replicas": None, "autoscaling_config": None}
COORDINATOR_SCALING_KEY = "scaling"


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


class StrictModel(BaseModel):
    # No .inf / .nan: no field means "unbounded" by infinity, and a non-finite interval or
    # budget would silently switch a mechanism off.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
