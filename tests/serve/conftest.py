"""One real local Ray cluster and Serve instance for the whole session, with two apps:

- ``arbitrage`` (route ``/``): the service on the bundled models (gRPC + HTTP);
- ``slow`` (route ``/slow``): draft/target only, a one-request coordinator with a one-slot
  queue and pools that wait 2 s to fill a batch, so overload and cancellation are
  deterministic.

A bundled checkpoint that is not trained yet is replaced (draft <-> target, else a tiny
random model), so the serving behaviour is tested either way; correctness is judged against
the same loop run in-process on the same checkpoints.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test cluster

import pytest
from serve_helpers import MODELS, REAL, SLOW_APP, InProcessEngine

from arbitrage_common.config import (
    ActorOptionsSpec,
    AppConfig,
    CoordinatorSpec,
    GRPCSpec,
    HTTPSpec,
    LimitsSpec,
    ModelSpec,
    PolicySpec,
    PoolSpec,
    PoolsSpec,
    render_serve_config,
)
from services.local import use_cluster_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(path: Path, scorer: bool) -> str:
    """A tiny random checkpoint with the bundled tokenizer, for a role not trained yet."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from arbitrage_common.tokenizer import build_char_tokenizer
    from arbitrage_common.training.shapes import SHAPES

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    extra = {"num_labels": 1} if scorer else {}
    cls = LlamaForSequenceClassification if scorer else LlamaForCausalLM
    cls(SHAPES["draft"].llama_config(len(tok), **extra)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _model_paths(tmp: Path) -> dict[str, str]:
    """Bundled checkpoints where trained; else draft <-> target, else tiny random ones."""
    paths = {role: str(MODELS / role) for role, ok in REAL.items() if ok}
    paths.setdefault("draft", paths.get("target"))
    paths.setdefault("target", paths.get("draft"))
    if paths["draft"] is None:
        paths["draft"] = paths["target"] = _tiny_model(tmp / "generator", scorer=False)
    if "router" not in paths or "prm" not in paths:
        fake = _tiny_model(tmp / "scorer", scorer=True)
        paths.setdefault("router", fake)
        paths.setdefault("prm", fake)
    return paths


def _pool(path: str, **kw) -> PoolSpec:
    return PoolSpec(model=ModelSpec(path=path), ray_actor_options=ActorOptionsSpec(num_cpus=0), **kw)


@pytest.fixture(scope="session")
def serve_cluster(tmp_path_factory):
    """Starts Ray + Serve once; yields the two AppConfigs (main, slow)."""
    import ray
    from ray import serve

    from services.app import build_app

    paths = _model_paths(tmp_path_factory.mktemp("models"))
    http, grpc_port = HTTPSpec(port=_free_port()), GRPCSpec(port=_free_port())
    # Shared call slots as the embedded default has them (default_config), so the served tests
    # run merged calls that wait for a slot.
    coordinator = CoordinatorSpec(ray_actor_options=ActorOptionsSpec(num_cpus=0), pool_calls_in_flight=2)
    main = AppConfig(
        pools=PoolsSpec(**{role: _pool(paths[role]) for role in ("draft", "target", "router", "prm")}),
        coordinator=coordinator, http=http, grpc=grpc_port,
        # Step pipelining as the embedded default runs it: early drafts while the coordinator is
        # not busy, so served answers are also checked against the plain in-process loop with it.
        limits=LimitsSpec(max_prompt_chars=200, max_steps=32, default_max_steps=12, request_timeout_s=120,
                          step_pipelining=True, step_pipelining_max_inflight=2),
    )
    slow_pool = {"max_ongoing_requests": 8, "max_batch_size": 8, "batch_wait_timeout_s": 2.0}
    slow = AppConfig(
        name=SLOW_APP,
        pools=PoolsSpec(draft=_pool(paths["draft"], **slow_pool), target=_pool(paths["target"], **slow_pool)),
        coordinator=CoordinatorSpec(ray_actor_options=ActorOptionsSpec(num_cpus=0), max_ongoing_requests=1,
                                    max_queued_requests=1),
        policy=PolicySpec(default="draft"), http=http, grpc=grpc_port,
        limits=LimitsSpec(request_timeout_s=300),
    )
    rendered = render_serve_config(main)
    use_cluster_env()  # as `arbitrage serve` runs it: the proxies reach the coordinator over gRPC
    ray.init(address="local", num_cpus=8, object_store_memory=200 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options=rendered["http_options"], grpc_options=rendered["grpc_options"])
        serve.run(build_app(main), name=main.name, route_prefix="/")
        serve.run(build_app(slow), name=slow.name, route_prefix="/slow")
        yield main, slow
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def app_config(serve_cluster) -> AppConfig:
    return serve_cluster[0]


@pytest.fixture(scope="session")
def http_url(app_config) -> str:
    return f"http://127.0.0.1:{app_config.http.port}"


@pytest.fixture(scope="session")
def grpc_channel(app_config):
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{app_config.grpc.port}")
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def stub(grpc_channel):
    from protos.arbitrage.v1 import arbitrage_pb2_grpc

    return arbitrage_pb2_grpc.ArbitrageServiceStub(grpc_channel)


@pytest.fixture(scope="session")
def main_metadata(app_config):
    return (("application", app_config.name),)


@pytest.fixture(scope="session")
def slow_metadata(serve_cluster):
    return (("application", SLOW_APP),)


@pytest.fixture(scope="session")
def engine(app_config) -> InProcessEngine:
    return InProcessEngine(app_config)
