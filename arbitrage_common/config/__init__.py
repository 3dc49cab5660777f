"""The application config: one validated pydantic model, many renderings.

``AppConfig`` describes the whole service: four model pools (draft, target, router, PRM),
the coordinator, the default policy, request limits and the ports. ``services.app:build_app``
builds the Ray Serve application from it, ``render_serve_config`` renders the Serve YAML
(whose ``applications[0].args`` is this config again), and the RayService manifest embeds
that YAML. No Ray, torch or transformers imports here: configs load and validate anywhere.

The package's modules: ``common`` (roles, names, the Serve YAML's stand-ins), ``deployments``
(pool and coordinator sections), ``app`` (``AppConfig``, the request-facing sections, the
embedded default), ``files`` (loading and one-line problems) and ``serve_yaml`` (the rendering
and its inverse). Import from the package.
"""
from __future__ import annotations

from .app import (
    MAX_APP_NAME_LEN,
    AppConfig,
    AuthSpec,
    GRPCSpec,
    HTTPSpec,
    LimitsSpec,
    LoadControlSpec,
    PolicySpec,
    PromptSpec,
    default_config,
)
from .common import (
    APP_IMPORT_PATH,
    COORDINATOR,
    COORDINATOR_SCALING_KEY,
    GENERATOR_ROLES,
    GRPC_SERVICER_FUNCTIONS,
    LANES_PER_REPLICA,
    LIVE_KNOBS_IN_ARGS,
    LIVE_SCALING_IN_ARGS,
    MIN_HEALTH_PROBE_S,
    RAY_CLUSTER_ENV,
    SCORER_ROLES,
    Backend,
    Role,
    StrictModel,
    merge_scaling,
)
from .deployments import (
    RAY_BUILTIN_RESOURCES,
    SERVE_LOOK_BACK_PERIOD_S,
    SERVE_METRICS_INTERVAL_S,
    ActorOptionsSpec,
    AutoscalingSpec,
    CoordinatorSpec,
    DeploymentSpec,
    EngineSpec,
    ModelSpec,
    PoolSpec,
    PoolsSpec,
)
from .files import ConfigError, load_config, validation_problems, yaml_error
from .serve_yaml import (
    application_args,
    application_config,
    coordinator_user_config,
    render_serve_config,
    render_serve_yaml,
    serve_application,
)

__all__ = [
    "APP_IMPORT_PATH",
    "COORDINATOR",
    "COORDINATOR_SCALING_KEY",
    "GENERATOR_ROLES",
    "GRPC_SERVICER_FUNCTIONS",
    "LANES_PER_REPLICA",
    "LIVE_KNOBS_IN_ARGS",
    "LIVE_SCALING_IN_ARGS",
    "MAX_APP_NAME_LEN",
    "MIN_HEALTH_PROBE_S",
    "RAY_BUILTIN_RESOURCES",
    "RAY_CLUSTER_ENV",
    "SCORER_ROLES",
    "SERVE_LOOK_BACK_PERIOD_S",
    "SERVE_METRICS_INTERVAL_S",
    "ActorOptionsSpec",
    "AppConfig",
    "AuthSpec",
    "AutoscalingSpec",
    "Backend",
    "ConfigError",
    "CoordinatorSpec",
    "DeploymentSpec",
    "EngineSpec",
    "GRPCSpec",
    "HTTPSpec",
    "LimitsSpec",
    "LoadControlSpec",
    "ModelSpec",
    "PolicySpec",
    "PoolSpec",
    "PoolsSpec",
    "PromptSpec",
    "Role",
    "StrictModel",
    "application_args",
    "application_config",
    "coordinator_user_config",
    "default_config",
    "load_config",
    "merge_scaling",
    "render_serve_config",
    "render_serve_yaml",
    "serve_application",
    "validation_problems",
    "yaml_error",
]
