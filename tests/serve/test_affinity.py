"""Session affinity on the real local cluster: one more app with two replicas of each
generator pool, the target with ``session_affinity`` on, the draft with it off (the control).

Where each call ran is read from Ray Serve's own access logs: every replica writes
``CALL generate OK`` lines tagged with its replica id and the Serve request id, which the
gRPC metadata ``request_id`` sets per client request (the pool calls inherit it). The app
routes each request's calls itself (``coordinator.merge_calls`` off): merged calls are routed
by their lane's key through the same router, and a request keeps its lane
(``tests/unit/test_coalesce.py``).
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serve_helpers import MODELS, REAL, problems

from arbitrage_common.config import (
    ActorOptionsSpec,
    AppConfig,
    CoordinatorSpec,
    LimitsSpec,
    ModelSpec,
    PolicySpec,
    PoolSpec,
    PoolsSpec,
)
from protos.arbitrage.v1 import arbitrage_pb2 as pb

APP = "affinity"
# "INFO <date> <time> <app>_<deployment> <replica id> <request id> -- CALL generate OK 1.2ms"
ACCESS = re.compile(r" (?P<deployment>\S+) (?P<replica>\S+) (?P<request>\S+) -- CALL generate OK ")


def _pool(path: str, affinity: bool) -> PoolSpec:
    return PoolSpec(model=ModelSpec(path=path), num_replicas=2, session_affinity=affinity, access_log=True,
                    ray_actor_options=ActorOptionsSpec(num_cpus=0))


@pytest.fixture(scope="module")
def affinity_app(serve_cluster):
    """Deploys the app; yields the Serve log directory; deletes the app after the module."""
    import ray
    from ray import serve

    from services.app import build_app

    main = serve_cluster[0]
    cfg = AppConfig(name=APP, pools=PoolsSpec(draft=_pool(main.pools.draft.model.path, affinity=False),
                                              target=_pool(main.pools.target.model.path, affinity=True)),
                    coordinator=CoordinatorSpec(ray_actor_options=ActorOptionsSpec(num_cpus=0),
                                                merge_calls=False),
                    policy=PolicySpec(default="target"), http=main.http, grpc=main.grpc, limits=LimitsSpec(request_timeout_s=120))
    serve.run(build_app(cfg), name=APP, route_prefix=f"/{APP}")
    ctx = ray.get_runtime_context()
    try:
        yield Path(ctx.get_temp_dir()) / ctx.get_session_name() / "logs" / "serve"
    finally:
        serve.delete(APP)


def _replica_ids(log_dir: Path, role: str) -> list[str]:
    """Replica ids from the per-replica log file names (replica_<app>_<role>_<id>.log)."""
    prefix = f"replica_{APP}_{role}_"
    return sorted(p.name[len(prefix):-len(".log")] for p in log_dir.glob(f"{prefix}*.log"))


def _calls(log_dir: Path, role: str) -> dict[str, dict[str, int]]:
    """request id -> {replica id: generate calls} from the role's access logs."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for path in log_dir.glob(f"replica_{APP}_{role}_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            m = ACCESS.search(line)
            if m and m["deployment"] == f"{APP}_{role}":
                out[m["request"]][m["replica"]] += 1
    return out


def _run(stub, requests: list[tuple[str, str]], policy: str) -> dict[str, int]:
    """Sends the requests concurrently; returns request id -> pool calls it needed (steps)."""
    def one(item: tuple[str, str]) -> tuple[str, int]:
        rid, prompt = item
        reply = stub.Generate(pb.GenerateRequest(prompt=prompt, policy=policy, max_steps=6, request_id=rid),
                              metadata=(("application", APP), ("request_id", rid)))
        assert reply.request_id == rid and len(reply.steps) >= 1
        return rid, len(reply.steps)

    with ThreadPoolExecutor(len(requests)) as pool:
        return dict(pool.map(one, requests))


def _settled_calls(log_dir: Path, role: str, expected: dict[str, int]) -> dict[str, dict[str, int]]:
    """The access log line is written as the call returns; wait until every call shows."""
    deadline = time.monotonic() + 20
    while True:
        calls = _calls(log_dir, role)
        if all(sum(calls[rid].values()) >= n for rid, n in expected.items()) or time.monotonic() > deadline:
            return calls
        time.sleep(0.2)


def test_all_steps_of_a_request_go_to_one_replica(affinity_app, stub):
    replicas = _replica_ids(affinity_app, "target")
    assert len(replicas) == 2
    # The session key is the server's own per request (never the client's request_id), so
    # where a request lands is not known up front: every request's steps must reach one
    # replica, and over 12 requests both replicas serve some (all on one: 2 in 4096). Two
    # rounds of six keep the load of one round as before; the logs say what the router did.
    rids = [f"aff-{i}" for i in range(12)]
    prompts = [p.prompt for p in problems(len(rids), seed=777)]
    steps = {**_run(stub, list(zip(rids[:6], prompts[:6])), policy="target"),
             **_run(stub, list(zip(rids[6:], prompts[6:])), policy="target")}
    calls = _settled_calls(affinity_app, "target", steps)
    for rid in rids:
        assert len(calls[rid]) == 1 and sum(calls[rid].values()) == steps[rid], (rid, dict(calls[rid]))
    assert {r for rid in rids for r in calls[rid]} == set(replicas)


def test_without_affinity_steps_scatter(affinity_app, stub):
    """The control: the draft pool runs Serve's default router, so the observation above
    would catch scattered steps (each step picks a replica anew)."""
    assert len(_replica_ids(affinity_app, "draft")) == 2
    rids = [f"free-{i}" for i in range(8)]  # steps spread at random: enough requests that some split
    prompts = [p.prompt for p in problems(len(rids), seed=778)]
    steps = _run(stub, list(zip(rids, prompts)), policy="draft")
    calls = _settled_calls(affinity_app, "draft", steps)
    assert all(sum(calls[rid].values()) == steps[rid] for rid in rids)
    assert any(len(calls[rid]) == 2 for rid in rids if steps[rid] >= 2), {r: dict(calls[r]) for r in rids}


def test_a_missing_model_path_fails_when_the_app_is_built(tmp_path):
    """The builder (also the Serve YAML's import_path) checks paths before any deployment
    exists; no cluster needed, so it costs nothing here."""
    from arbitrage_common.presets import ModelPathError
    from services.app import build_app

    missing = tmp_path / "no-such-target"
    cfg = AppConfig(pools=PoolsSpec(draft=_pool(str(MODELS / "draft"), affinity=True),
                                    target=_pool(str(missing), affinity=True)),
                    policy=PolicySpec(default="target"))
    with pytest.raises(ModelPathError) as err:
        build_app(cfg.model_dump(mode="json"))
    assert "pools.target.model.path" in str(err.value) and str(missing) in str(err.value)
    assert ("pools.draft" in str(err.value)) == (not REAL["draft"])  # only the bad pools are named
