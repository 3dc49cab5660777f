"""The application builder: a validated AppConfig -> the Ray Serve application.

``build_app(args)`` takes a plain dict (the AppConfig), so it is the ``import_path`` of
the rendered Serve YAML and of a KubeRay ``serveConfigV2``. Deployment classes carry no
decorator: options come from the config here, one ``serve.deployment(cls, **options)``
per pool, the generator class bound twice (draft, target) and the scorer class twice
(router, PRM). A pool with ``session_affinity`` gets the session-affine request router
(``services.affinity``); the coordinator passes each request's server-made session id (``Prepared.session_id``).
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from arbitrage_common.config import COORDINATOR, GENERATOR_ROLES, AppConfig, coordinator_user_config
from arbitrage_common.presets import check_model_paths

from .affinity import router_config
from .coordinator import Coordinator
from .pools import GeneratorPool, ScorerPool


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    if cfg.model_path_check == "build":  # a bad path fails here, naming pool and path, not at the first request
        check_model_paths(cfg)  # else (clusters) each pool replica checks its own path on its node
    pools: dict[str, Application] = {}
    for role, spec in cfg.pools.configured():
        cls = GeneratorPool if role in GENERATOR_ROLES else ScorerPool
        model = {**spec.model.model_dump(mode="json"), "path": cfg.resolve_path(spec.model.path)}
        pool_options = cfg.pool_options(role)  # merged pools autoscale on rows (arbitrage_common.autoscaling)
        if (routing := router_config(spec.session_affinity)) is not None:
            pool_options["request_router_config"] = routing
        pools[role] = serve.deployment(cls, **pool_options).bind(role=role, model=model)
    options = {**cfg.coordinator.deployment_options(COORDINATOR), "user_config": coordinator_user_config(cfg)}
    options["backpressure_config"] = BackpressureConfig(status_code=503, retry_after_s=cfg.coordinator.retry_after_s)
    ingress = serve.ingress()(Coordinator)  # FastAPI app: Coordinator.__serve_build_asgi_app__
    return serve.deployment(ingress, **options).bind(cfg.model_dump(mode="json"), **pools)
