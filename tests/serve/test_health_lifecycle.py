"""Health that tells the truth, and a lifecycle that loses nothing, on an app of its own:

- gRPC Watch stays open and sends each change; Check and /healthz follow the pools (a
  killed draft replica reads NOT_SERVING / 503 until Serve replaced it); /livez stays 200;
- an upgrade (new coordinator config) lets a request in flight finish;
- stopping with an address (``local.stop(app_name=...)``) deletes only this app;
- Watch of an unknown service name streams SERVICE_UNKNOWN (grpc.health.v1).
"""
from __future__ import annotations

import queue
import threading

import grpc
import pytest
import ray
import requests
from conftest import _pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serve_helpers import SLOW_APP, problems

from arbitrage_common.config import (
    ActorOptionsSpec,
    AppConfig,
    AuthSpec,
    CoordinatorSpec,
    LimitsSpec,
    PolicySpec,
    PoolsSpec,
)
from protos.arbitrage.v1 import arbitrage_pb2 as pb

APP = "lifecycle"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


KEY = "test-key-0123456789"


def _config(main: AppConfig, max_steps: int = 12, auth: bool = False) -> AppConfig:
    slow = {"batch_wait_timeout_s": 0.4}  # a few seconds per request: time to act while it runs
    env = {"runtime_env": {"env_vars": {"LIFECYCLE_API_KEYS": f"other-key,{KEY}"}}} if auth else {}
    return AppConfig(
        # Serve runs it as APP, not under the config's name: health must follow Serve's
        # name (a Serve YAML or `serve.run(name=...)` may rename an app).
        name=f"{APP}-config",
        pools=PoolsSpec(draft=_pool(main.pools.draft.model.path, **slow),
                        target=_pool(main.pools.target.model.path, **slow)),
        coordinator=CoordinatorSpec(ray_actor_options=ActorOptionsSpec(num_cpus=0, **env), health_probe_s=0.5,
                                    graceful_shutdown_timeout_s=60),
        policy=PolicySpec(default="draft"), http=main.http, grpc=main.grpc,
        limits=LimitsSpec(request_timeout_s=60, default_max_steps=max_steps),
        auth=AuthSpec(api_key_env="LIFECYCLE_API_KEYS" if auth else None),
    )


@pytest.fixture(scope="module")
def lifecycle_app(serve_cluster):
    from ray import serve

    from services.app import build_app

    cfg = _config(serve_cluster[0])
    serve.run(build_app(cfg), name=APP, route_prefix=f"/{APP}")
    yield cfg
    if APP in serve.status().applications:
        serve.delete(APP)


def _check(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), metadata=(("application", APP),), timeout=10).status


def _next_change(seen: queue.Queue, current: int, budget_s: float) -> int:
    """The next status Watch sends that differs from ``current`` (re-sends are skipped)."""
    import time

    deadline = time.monotonic() + budget_s
    while (status := seen.get(timeout=max(0.1, deadline - time.monotonic()))) == current:
        pass
    return status


def test_watch_follows_a_pool_that_loses_its_replica(lifecycle_app, grpc_channel, http_url):
    stub = health_pb2_grpc.HealthStub(grpc_channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(), metadata=(("application", APP),))
    seen: queue.Queue = queue.Queue()
    def read() -> None:
        try:
            for message in watch:
                seen.put(message.status)
        except grpc.RpcError as exc:  # our own cancel at the end
            seen.put(exc.code())

    threading.Thread(target=read, daemon=True).start()
    assert seen.get(timeout=20) == SERVING
    assert seen.get(timeout=20) == SERVING  # re-sent unchanged (so the proxy notices a client that left)
    assert _check(grpc_channel) == SERVING
    assert requests.get(f"{http_url}/{APP}/healthz", timeout=10).status_code == 200

    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{APP}#draft#"))
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    assert _next_change(seen, SERVING, 60) == NOT_SERVING  # the controller saw the replica go
    during = (_check(grpc_channel), requests.get(f"{http_url}/{APP}/healthz", timeout=10))
    livez = requests.get(f"{http_url}/{APP}/livez", timeout=10)
    assert _next_change(seen, NOT_SERVING, 90) == SERVING  # Serve started a new draft replica
    assert watch.is_active()  # the stream stays open after each change
    watch.cancel()
    # Check and /healthz said NOT_SERVING / 503 while the pool had no replica, unless the
    # new replica was already up when they were asked (then Watch has said so first).
    if during[0] == NOT_SERVING:
        assert during[1].status_code == 503 and during[1].headers.get("retry-after")
    assert livez.status_code == 200


def test_upgrade_lets_a_request_in_flight_finish(lifecycle_app, serve_cluster, stub):
    from ray import serve

    from services.app import build_app

    metadata = (("application", APP),)
    stream = stub.GenerateStream(pb.GenerateRequest(prompt=problems(1)[0].prompt, max_steps=8), metadata=metadata,
                                 timeout=120)
    first = next(stream)
    assert first.WhichOneof("event") == "step"
    # A new config for the coordinator: Serve starts a new replica and drains the old one.
    upgrade = threading.Thread(target=serve.run, args=(build_app(_config(serve_cluster[0], max_steps=10)),),
                               kwargs={"name": APP, "route_prefix": f"/{APP}"})
    upgrade.start()
    rest = list(stream)
    upgrade.join(180)
    assert rest[-1].WhichOneof("event") == "summary", "the request in flight did not finish"
    summary = rest[-1].summary
    assert len(summary.steps) == 1 + len(rest) - 1 and summary.finish_reason in ("eos", "max_steps", "length")


def _prompt_of_tokens(cfg: AppConfig, tokens: int) -> str:
    """A problem padded so that its rendered prefix is ``tokens`` long in the draft's tokenizer."""
    from transformers import AutoTokenizer

    from arbitrage_common.steps import build_prefix

    tok = AutoTokenizer.from_pretrained(cfg.resolve_path(cfg.pools.draft.model.path))
    base = problems(1, seed=5)[0].prompt
    count = len(tok(build_prefix(base, [], cfg.prompt.template)).input_ids)
    assert count < tokens
    while count < tokens:
        base += " Then keep going." if tokens - count > 20 else "."
        count = len(tok(build_prefix(base, [], cfg.prompt.template)).input_ids)
    return base


def test_prompt_beyond_the_context_is_invalid_argument(lifecycle_app, stub, http_url):
    """Realistic limits (4,000 characters, 512 positions): refused at admission, in tokens."""
    prompt = _prompt_of_tokens(lifecycle_app, 700)
    assert len(prompt) <= lifecycle_app.limits.max_prompt_chars
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(prompt=prompt), metadata=(("application", APP),), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("prompt:") and "tokens" in info.value.details()
    reply = requests.post(f"{http_url}/{APP}/v1/generate", json={"prompt": prompt, "stream": True}, timeout=60)
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "prompt"


def test_filling_the_context_mid_request_ends_with_length_and_keeps_steps(lifecycle_app, stub):
    context = 512
    prompt = _prompt_of_tokens(lifecycle_app, context - 40)
    reply = stub.Generate(pb.GenerateRequest(prompt=prompt, max_steps=32, max_new_tokens=400),
                          metadata=(("application", APP),), timeout=60)
    assert reply.finish_reason == "length"
    assert reply.steps and reply.text
    assert sum(s.tokens for s in reply.steps) <= 40


def test_api_key_guards_every_call_but_health(lifecycle_app, serve_cluster, stub, grpc_channel, http_url):
    from ray import serve

    from services.app import build_app

    serve.run(build_app(_config(serve_cluster[0], auth=True)), name=APP, route_prefix=f"/{APP}")
    request = pb.GenerateRequest(prompt=problems(1)[0].prompt, max_steps=1)
    app = ("application", APP)
    for metadata in ((app,), (app, ("authorization", "Bearer wrong")), (app, ("authorization", KEY))):
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request, metadata=metadata, timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = stub.Generate(request, metadata=(app, ("authorization", f"Bearer {KEY}")), timeout=60)
    assert reply.steps
    assert _check(grpc_channel) == SERVING  # health needs no key

    url = f"{http_url}/{APP}"
    refused = requests.post(f"{url}/v1/generate", json={"prompt": request.prompt, "max_steps": 1}, timeout=60)
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    ok = requests.post(f"{url}/v1/generate", json={"prompt": request.prompt, "max_steps": 1},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{url}/livez", timeout=10).status_code == 200


def test_watch_of_an_unknown_service_streams_service_unknown(lifecycle_app, grpc_channel):
    stub = health_pb2_grpc.HealthStub(grpc_channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), metadata=(("application", APP),),
                       timeout=30)
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        assert watch.is_active()  # open, as the spec says: the service may appear later
    finally:
        watch.cancel()


def test_stop_with_an_address_deletes_only_this_app(lifecycle_app, serve_cluster, grpc_channel):
    from ray import serve

    from services import local

    local.stop(shutdown_ray=False, app_name=APP)
    apps = serve.status().applications
    assert APP not in apps
    assert {serve_cluster[0].name, SLOW_APP} <= set(apps)
    assert ray.is_initialized()
    stub = health_pb2_grpc.HealthStub(grpc_channel)  # the other apps still answer
    reply = stub.Check(health_pb2.HealthCheckRequest(), metadata=(("application", SLOW_APP),), timeout=10)
    assert reply.status == SERVING

