"""Start and stop the application on a Ray cluster from Python: the embedded default
(a local cluster started here) or an existing cluster (``address``)."""
from __future__ import annotations

import time
from typing import Any

from arbitrage_common.config import AppConfig, render_serve_config

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # small machines: Ray's default (30% of RAM) is far too much


def start(cfg: AppConfig, address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """ray.init (local unless ``address``), Serve with the config's HTTP/gRPC options, then
    the app. Blocks until every deployment is ready; returns where it listens."""
    from arbitrage_common.backends.checkpoints import check_checkpoint_dir

    started = time.perf_counter()
    if not address:  # local cluster, same filesystem: fail fast, naming the path, before Ray starts
        for _role, spec in cfg.pools.configured():
            check_checkpoint_dir(cfg.resolve_path(spec.model.path))

    import ray
    from ray import serve

    from .app import build_app

    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False)
        else:
            ray.init(num_cpus=num_cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False)
    rendered = render_serve_config(cfg)
    try:
        serve.start(http_options=rendered["http_options"], grpc_options=rendered["grpc_options"])
        serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    except BaseException:
        stop(shutdown_ray=not address)
        raise
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    return {"grpc": f"{host}:{cfg.grpc.port}", "http": f"http://{host}:{cfg.http.port}",
            "seconds": time.perf_counter() - started}


def stop(shutdown_ray: bool = True) -> None:
    """Delete the apps, stop Serve, and (for a cluster started here) Ray."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            if shutdown_ray:
                ray.shutdown()
