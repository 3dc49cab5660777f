"""Chaos under load: while a bounded client keeps requests in flight, one replica each of
the draft, target, router and coordinator is killed by its Ray actor name, then the Serve
controller. Every request is counted: it succeeds with the text of the same request on the
healthy service, or ends with a retriable UNAVAILABLE (then the client sends it again) before
its deadline. No INTERNAL, no hang, no changed text. The table goes to runs/chaos.json (the closing note quotes it).
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import grpc
import pytest
import ray
from conftest import _pool
from serve_helpers import ROOT, problems

from arbitrage_common.config import ActorOptionsSpec, AppConfig, CoordinatorSpec, LimitsSpec, PolicySpec, PoolsSpec
from protos.arbitrage.v1 import arbitrage_pb2 as pb

APP = "chaos"
IN_FLIGHT = 4
TIMEOUT_S = 60.0
KILLS = ("draft", "target", "router", "coordinator", "controller")
KILL_EVERY_S = 6.0
CLIENT_ATTEMPTS = 3


def _chaos_config(main: AppConfig) -> AppConfig:
    two = {"num_replicas": 2}
    paths = {role: getattr(main.pools, role).model.path for role in ("draft", "target", "router")}
    return AppConfig(
        name=APP,
        pools=PoolsSpec(**{role: _pool(path, **two) for role, path in paths.items()}),
        # Call slots too: a call that dies with its replica must give its slot back.
        coordinator=CoordinatorSpec(ray_actor_options=ActorOptionsSpec(num_cpus=0), num_replicas=2,
                                    pool_calls_in_flight=2),
        policy=PolicySpec(default="arbitrage"), http=main.http, grpc=main.grpc,
        limits=LimitsSpec(max_prompt_chars=200, request_timeout_s=TIMEOUT_S),
    )


def _replica_actor(deployment: str) -> str:
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#"))
    assert names, f"no running replica of {deployment}"
    return names[0]


def _kill(what: str) -> str:
    if what == "controller":
        ray.kill(ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve"), no_restart=False)
        return "SERVE_CONTROLLER_ACTOR"
    name = _replica_actor(what)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


@pytest.fixture(scope="module")
def chaos_app(serve_cluster):
    from ray import serve

    from services.app import build_app

    cfg = _chaos_config(serve_cluster[0])
    serve.run(build_app(cfg), name=APP, route_prefix=f"/{APP}")
    yield cfg
    serve.delete(APP)


def test_kills_under_load_lose_nothing(chaos_app, stub):
    metadata = (("application", APP),)
    prompts = [p.prompt for p in problems(6, seed=777)]
    healthy = {p: stub.Generate(pb.GenerateRequest(prompt=p), metadata=metadata).text for p in prompts}

    outcomes: list[dict] = []
    lock, stop = threading.Lock(), threading.Event()
    phase = {"kill": "none"}

    def client(worker: int) -> None:
        """Sends, and resends after a retriable answer (as a client honouring Retry-After does)."""
        i = worker
        while not stop.is_set():
            prompt = prompts[i % len(prompts)]
            i += IN_FLIGHT
            started, kill, codes, details = time.monotonic(), phase["kill"], [], ""
            for _ in range(CLIENT_ATTEMPTS):
                try:
                    reply = stub.Generate(pb.GenerateRequest(prompt=prompt, timeout_s=TIMEOUT_S),
                                          metadata=metadata, timeout=TIMEOUT_S + 15)
                    codes.append("OK")
                    same = reply.text == healthy[prompt]
                    break
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
                    same, details = None, exc.details()  # kept: why the attempt before the last failed
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                        break
                    time.sleep(1.0)
            with lock:
                outcomes.append({"kill": kill, "code": codes[-1], "codes": codes, "same_text": same,
                                 "details": details, "seconds": round(time.monotonic() - started, 3)})

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(IN_FLIGHT)]
    for t in threads:
        t.start()
    killed = []
    try:
        time.sleep(KILL_EVERY_S)
        for what in KILLS:
            phase["kill"] = what
            killed.append(_kill(what))
            time.sleep(KILL_EVERY_S)
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT_S + 20)
    assert not any(t.is_alive() for t in threads), "a client request hung"

    table = _table(outcomes)
    runs = ROOT / "runs"
    runs.mkdir(exist_ok=True)
    (runs / "chaos.json").write_text(json.dumps({"killed": killed, "table": table, "requests": outcomes}, indent=1))
    print(json.dumps(table, indent=1))

    first = Counter(c for o in outcomes for c in o["codes"])
    assert set(first) <= {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}, first  # never INTERNAL, never a hang
    assert all(o["code"] == "OK" for o in outcomes), [o for o in outcomes if o["code"] != "OK"]
    assert all(o["same_text"] for o in outcomes), "a response differs from the healthy one"
    assert any(o["kill"] == "controller" for o in outcomes), "no request was sent after the controller was killed"


def _table(outcomes: list[dict]) -> dict:
    """Per window (the last kill before a request was sent): requests sent, succeeded at the
    first try, retried by the client after UNAVAILABLE / RESOURCE_EXHAUSTED, failed in the end."""
    out = {}
    for kill in ("none", *KILLS):
        rows = [o for o in outcomes if o["kill"] == kill]
        out[kill] = {"sent": len(rows), "ok_first_try": sum(o["codes"] == ["OK"] for o in rows),
                     "retried": sum(len(o["codes"]) > 1 for o in rows),
                     "failed": sum(o["code"] != "OK" for o in rows),
                     "text_differs": sum(o["same_text"] is False for o in rows)}
    return out


def _wait_until_served(app: str, stub, budget_s: float = 90.0) -> None:
    """Until the app's (new) coordinator answers a request: a replica that merely exists may
    still be starting, and the name of a killed one may linger for a moment."""
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        try:
            stub.Generate(pb.GenerateRequest(prompt="Start with 1.", max_steps=1), metadata=(("application", app),),
                          timeout=30)
            return
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise
            time.sleep(0.5)
    raise AssertionError(f"{app} did not serve again within {budget_s} s")


def _kill_coordinator_of(app: str) -> None:
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{app}#coordinator#"))
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def _wait_running(app: str, before: int, budget_s: float = 30.0) -> None:
    """Until the request just sent has made a pool call (so it runs on the coordinator)."""
    from serve_helpers import pool_items

    deadline = time.monotonic() + budget_s
    while pool_items(app) <= before:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.2)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_request_on_a_killed_coordinator_is_unavailable_not_internal(serve_cluster, stub, http_url, transport):
    """The slow app's only coordinator replica dies while it runs a request: the proxy's
    answer is retriable (UNAVAILABLE / 503 + Retry-After), never INTERNAL / 500."""
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from serve_helpers import SLOW_APP, pool_items

    _wait_until_served(SLOW_APP, stub)
    prompt, before = problems(1)[0].prompt, pool_items(SLOW_APP)
    with ThreadPoolExecutor(1) as pool:
        if transport == "grpc":
            call = pool.submit(stub.Generate, pb.GenerateRequest(prompt=prompt, max_steps=8),
                               metadata=(("application", SLOW_APP),), timeout=120)
        else:
            call = pool.submit(requests.post, f"{http_url}/{SLOW_APP}/v1/generate",
                               json={"prompt": prompt, "max_steps": 8}, timeout=120)
        _wait_running(SLOW_APP, before)
        _kill_coordinator_of(SLOW_APP)
        if transport == "grpc":
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (info.value.code(), info.value.details())
        else:
            answer = call.result()
            assert answer.status_code == 503 and answer.headers.get("retry-after"), (answer.status_code,
                                                                                     answer.text[:300])
    _wait_until_served(SLOW_APP, stub)


@pytest.mark.parametrize("transport", ["grpc", "sse", "openai"])
def test_a_stream_whose_coordinator_dies_ends_with_a_retriable_error_not_a_cut(serve_cluster, stub, http_url,
                                                                                transport):
    """The coordinator dies after a stream sent its first step: a gRPC stream ends UNAVAILABLE,
    and an SSE stream (started, so its 200 stands) ends with an ``error`` event carrying
    ``unavailable`` rather than being cut mid-body, with no summary and no ``[DONE]``."""
    import requests
    from serve_helpers import SLOW_APP

    _wait_until_served(SLOW_APP, stub)
    prompt = problems(1)[0].prompt
    if transport == "grpc":
        events = stub.GenerateStream(pb.GenerateRequest(prompt=prompt, max_steps=8),
                                     metadata=(("application", SLOW_APP),), timeout=120)
        assert next(events).HasField("step")
        _kill_coordinator_of(SLOW_APP)
        with pytest.raises(grpc.RpcError) as info:
            list(events)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (info.value.code(), info.value.details())
    else:
        route, body = (("/v1/generate", {"prompt": prompt, "max_steps": 8, "stream": True}) if transport == "sse"
                       else ("/v1/completions", {"model": "draft", "prompt": prompt, "max_tokens": 400,
                                                 "stream": True}))
        with requests.post(f"{http_url}/{SLOW_APP}{route}", json=body, stream=True, timeout=120) as answer:
            assert answer.status_code == 200, answer.text[:300]
            lines = answer.iter_lines(decode_unicode=True)
            first = next(line for line in lines if line.startswith("data:"))
            _kill_coordinator_of(SLOW_APP)
            rest = list(lines)  # raises (ChunkedEncodingError) if the proxy cut the body instead
        events = [line for line in rest if line.startswith(("event:", "data:"))]
        assert "[DONE]" not in first and events[-2:] == ["event: error", events[-1]], events[-4:]
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["code"] == "unavailable", error
        assert not any("summary" in line or "[DONE]" in line for line in events), events
    _wait_until_served(SLOW_APP, stub)
