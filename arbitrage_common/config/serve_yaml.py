"""The Serve YAML of a config, and the config back from a Serve YAML application."""
from __future__ import annotations

from typing import Any

from .app import AppConfig
from .common import (
    APP_IMPORT_PATH,
    COORDINATOR,
    COORDINATOR_SCALING_KEY,
    GRPC_SERVICER_FUNCTIONS,
    LIVE_KNOBS_IN_ARGS,
    LIVE_SCALING_IN_ARGS,
    merge_scaling,
)


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

