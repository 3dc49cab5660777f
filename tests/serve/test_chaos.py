"""Chaos under load: while a bounded client keeps requests in flight, one replica each of
the draft, target, router and coordinator is killed by its Ray actor name, then the Serve
controller. Every request is counted: it succeeds with the text of the same request on the
healthy service, or ends with a retriable UNAVAILABLE before its deadline. No INTERNAL, no
hang, no changed text. The table goes to runs/chaos.json (the closing note quotes it).
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


def _chaos_config(main: AppConfig) -> AppConfig:
    two = {"num_replicas": 2}
    paths = {role: getattr(main.pools, role).model.path for role in ("draft", "target", "router")}
    return AppConfig(
        name=APP,
        pools=PoolsSpec(**{role: _pool(path, **two) for role, path in paths.items()}),
        coordinator=CoordinatorSpec(ray_actor_options=ActorOptionsSpec(num_cpus=0), num_replicas=2),
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
        i = worker
        while not stop.is_set():
            prompt = prompts[i % len(prompts)]
            i += IN_FLIGHT
            started, kill = time.monotonic(), phase["kill"]
            try:
                reply = stub.Generate(pb.GenerateRequest(prompt=prompt, timeout_s=TIMEOUT_S), metadata=metadata,
                                      timeout=TIMEOUT_S + 15)
                code, same, details = "OK", reply.text == healthy[prompt], ""
            except grpc.RpcError as exc:
                code, same, details = exc.code().name, None, exc.details()
            with lock:
                outcomes.append({"kill": kill, "code": code, "same_text": same, "details": details,
                                 "seconds": round(time.monotonic() - started, 3)})

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

    codes = Counter(o["code"] for o in outcomes)
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["OK"] >= len(outcomes) // 2, codes  # the service kept serving through the faults
    assert all(o["same_text"] for o in outcomes if o["code"] == "OK"), "a response differs from the healthy one"
    assert all(o["seconds"] < TIMEOUT_S for o in outcomes if o["code"] != "OK"), "a failure came after its deadline"
    served_after = [o for o in outcomes if o["kill"] == "controller" and o["code"] == "OK"]
    assert served_after, "no request succeeded after the controller was killed"


def _table(outcomes: list[dict]) -> dict:
    """Per kill window: requests sent, succeeded, failed UNAVAILABLE, any other outcome."""
    out = {}
    for kill in ("none", *KILLS):
        rows = [o for o in outcomes if o["kill"] == kill]
        out[kill] = {"sent": len(rows), "ok": sum(o["code"] == "OK" for o in rows),
                     "unavailable": sum(o["code"] == "UNAVAILABLE" for o in rows),
                     "other": sum(o["code"] not in ("OK", "UNAVAILABLE") for o in rows),
                     "text_differs": sum(o["same_text"] is False for o in rows)}
    return out


def _wait_for_replica(app: str, deployment: str, budget_s: float = 60.0) -> None:
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        if any(a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")
               for a in ray.util.list_named_actors(all_namespaces=True)):
            return
        time.sleep(0.5)
    raise AssertionError(f"no {deployment} replica of {app} came back")


def _kill_coordinator_of(app: str) -> None:
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{app}#coordinator#"))
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_request_on_a_killed_coordinator_is_unavailable_not_internal(serve_cluster, stub, http_url, transport):
    """The slow app's only coordinator replica dies while it runs a request: the proxy's
    answer is retriable (UNAVAILABLE / 503 + Retry-After), never INTERNAL / 500."""
    import requests
    from serve_helpers import SLOW_APP

    _wait_for_replica(SLOW_APP, "coordinator")
    prompt = problems(1)[0].prompt
    if transport == "grpc":
        call = stub.Generate.future(pb.GenerateRequest(prompt=prompt, max_steps=6),
                                    metadata=(("application", SLOW_APP),), timeout=120)
        time.sleep(3.0)
        _kill_coordinator_of(SLOW_APP)
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (info.value.code(), info.value.details())
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(requests.post, f"{http_url}/{SLOW_APP}/v1/generate",
                                json={"prompt": prompt, "max_steps": 6}, timeout=120)
            time.sleep(3.0)
            _kill_coordinator_of(SLOW_APP)
            answer = reply.result()
        assert answer.status_code == 503 and answer.headers.get("retry-after"), (answer.status_code, answer.text)
    _wait_for_replica(SLOW_APP, "coordinator")
