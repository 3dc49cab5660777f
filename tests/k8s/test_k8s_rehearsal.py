"""The rendered cpu-demo RayService, run: a real local multi-node Ray cluster shaped like its
worker groups, its own serveConfigV2 deployed through the dashboard's Serve REST API (as KubeRay
does), then placement, gRPC, HTTP, metrics and a pool scaled up into its own group only."""
from __future__ import annotations

import copy
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from rehearsal import LocalRayCluster, start_cluster, worker_groups

from arbitrage_common.config import AppConfig, application_config, render_serve_config
from arbitrage_common.kuberay.spec import GROUP_LABEL, GROUP_OF

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "k8s" / "base" / "cpu-demo" / "rayservice.yaml"
PROMPT = "Start with 42. Add 17. Subtract 25. Multiply by 2."
CLIENT_ATTEMPTS = 3


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def serve_config(rayservice) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def cluster(rayservice, serve_config, tmp_path_factory):
    # What the image sets (k8s/Dockerfile): the bundled models under $ARBITRAGE_HOME. Ray's
    # processes run outside the checkout, so the app imports the installed package.
    env = {"ARBITRAGE_HOME": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    c = start_cluster(rayservice, env, tmp_path_factory.mktemp("ray-cwd"))
    try:
        c.deploy(rayservice["spec"]["serveConfigV2"])
        c.wait_running(serve_config["applications"][0]["name"])
        yield c
    finally:
        c.stop()


def _app(serve_config) -> str:
    return serve_config["applications"][0]["name"]


def _group_of(replica: dict) -> str | None:
    return replica["labels"].get(GROUP_LABEL)


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_manifest_has_a_worker_group_per_pool_and_a_cpu_free_head(rayservice):
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert (head["num-cpus"], head["num-gpus"]) == ("0", "0")
    assert [g.name for g in worker_groups(rayservice)] == ["draft", "target", "scorers", "coordinator"]


def test_every_replica_runs_in_its_own_group_only(cluster, serve_config):
    replicas = cluster.replicas(_app(serve_config))
    running = [r for r in replicas if r["state"] == "ALIVE"]
    assert {r["deployment"] for r in running} == {"draft", "target", "router", "prm", "coordinator"}
    misplaced = [(r["deployment"], _group_of(r)) for r in running if _group_of(r) != GROUP_OF[r["deployment"]]]
    assert not misplaced, misplaced
    assert not [r for r in running if r["head"]], "a replica landed on the head (num-cpus 0)"


def test_grpc_and_http_answer_through_the_cluster(cluster, serve_config):
    import grpc

    from protos.arbitrage.v1 import arbitrage_pb2 as pb
    from protos.arbitrage.v1 import arbitrage_pb2_grpc as pbg

    grpc_port, http_port = serve_config["grpc_options"]["port"], serve_config["http_options"]["port"]
    app = _app(serve_config)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        reply = pbg.ArbitrageServiceStub(channel).Generate(
            pb.GenerateRequest(prompt=PROMPT, policy="arbitrage", max_steps=6), metadata=(("application", app),),
            timeout=120)
    assert reply.steps and reply.finish_reason
    body = json.dumps({"prompt": PROMPT, "policy": "arbitrage", "max_steps": 6}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/generate", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        http_reply = json.loads(resp.read())
    # Greedy and per-request: both transports give the same steps.
    assert [s["text"] for s in http_reply["steps"]] == [s.text for s in reply.steps]


def test_a_batching_knob_changes_in_place_and_restarts_no_replica(cluster: LocalRayCluster, serve_config):
    """A new max_batch_size for the draft pool, applied as KubeRay applies a serveConfigV2 change:
    every replica keeps running (same actors), the draft pool's deployment takes the new value,
    and requests still succeed. Were the knob in the app's args, its code version would change
    and every replica of every deployment would restart."""
    app = _app(serve_config)
    before = {r["actor_id"] for r in cluster.replicas(app) if r["state"] == "ALIVE"}
    changed = copy.deepcopy(serve_config)
    draft = next(d for d in changed["applications"][0]["deployments"] if d["name"] == "draft")
    new_size = draft["user_config"]["max_batch_size"] - 3
    draft["user_config"]["max_batch_size"] = new_size
    assert changed["applications"][0]["args"] == serve_config["applications"][0]["args"]
    cluster.deploy(yaml.safe_dump(changed, sort_keys=False))

    def applied():
        deployments = cluster.serve_status()["applications"][app]["deployments"]
        config = deployments["draft"]["deployment_config"]
        return config.get("user_config", {}).get("max_batch_size") == new_size and \
            all(d["status"] == "HEALTHY" for d in deployments.values())
    _wait_for(applied, 120, f"the draft pool's max_batch_size {new_size}")
    after = {r["actor_id"] for r in cluster.replicas(app) if r["state"] == "ALIVE"}
    assert after == before, f"replicas restarted: gone {before - after}, new {after - before}"
    from arbitrage_common.client import Client, build_request

    with Client(f"127.0.0.1:{serve_config['grpc_options']['port']}", app) as client:
        assert client.generate(build_request(PROMPT, policy="arbitrage"), timeout=120).text
    cluster.deploy(yaml.safe_dump(serve_config, sort_keys=False))  # as rendered, for the tests below
    _wait_for(lambda: cluster.serve_status()["applications"][app]["deployments"]["draft"]["deployment_config"]
              .get("user_config", {}).get("max_batch_size") == new_size + 3, 120, "the rendered max_batch_size")


def test_scaling_a_pool_lands_only_in_its_group(cluster: LocalRayCluster, rayservice, serve_config):
    """Raise the target pool's min_replicas in the AppConfig and render again, as an operator
    does: the args do not change, so no replica restarts and the coordinator learns the new
    bounds in place (its user_config). The new replica waits for a target-group Pod even though
    another group's Pod has a free CPU; once the autoscaler's Pod (started here) joins, it runs
    there."""
    app = _app(serve_config)
    target_group = next(g for g in worker_groups(rayservice) if g.name == "target")
    assert target_group.max_pods >= 2, "cpu-demo's target group must be able to grow for this test"
    before = {r["actor_id"] for r in cluster.replicas(app) if r["state"] == "ALIVE"}
    data = application_config(serve_config["applications"][0]).model_dump(mode="json")
    data["pools"]["target"]["autoscaling_config"]["min_replicas"] = 2
    scaled = render_serve_config(AppConfig.model_validate(data))
    assert scaled["applications"][0]["args"] == serve_config["applications"][0]["args"]
    cluster.deploy(yaml.safe_dump(scaled, sort_keys=False))

    def pending_target():
        reps = [r for r in cluster.replicas(app) if r["deployment"] == "target"]
        return len(reps) >= 2 and reps
    reps = _wait_for(pending_target, 120, "a second target replica")
    time.sleep(10)  # give the scheduler time to misplace it, if it could
    reps = [r for r in cluster.replicas(app) if r["deployment"] == "target"]
    placed = [r for r in reps if r["node_id"] and r["state"] == "ALIVE"]
    assert all(_group_of(r) == "target" for r in placed), placed
    assert len(placed) == 1, f"the second target replica must wait for a target Pod: {reps}"

    cluster.add_pods([(target_group, 1)])  # what the Ray autoscaler asks KubeRay for
    cluster.wait_running(app)
    reps = _wait_for(lambda: [r for r in cluster.replicas(app) if r["deployment"] == "target"
                              and r["state"] == "ALIVE"] if sum(r["deployment"] == "target" and r["state"] == "ALIVE"
                                                                for r in cluster.replicas(app)) == 2 else None,
                     180, "two running target replicas")
    assert {_group_of(r) for r in reps} == {"target"}
    assert len({r["node_id"] for r in reps}) == 2  # one replica per one-CPU Pod
    others = [r for r in cluster.replicas(app) if r["state"] == "ALIVE" and r["deployment"] != "target"]
    assert all(_group_of(r) == GROUP_OF[r["deployment"]] for r in others), others
    after = {r["actor_id"] for r in cluster.replicas(app) if r["state"] == "ALIVE"}
    assert before < after, f"replicas restarted: gone {before - after}"
    coordinator = cluster.serve_status()["applications"][app]["deployments"]["coordinator"]
    assert coordinator["status"] == "HEALTHY"  # its reconfigure took the new bounds
    assert coordinator["deployment_config"]["user_config"]["scaling"]["target"]["autoscaling_config"][
        "min_replicas"] == 2


def test_dashboard_metrics_are_exported(cluster, serve_config):
    """Every metric the Grafana dashboard queries is on the nodes' metrics ports (after the
    requests above), except those that need an event these requests may not cause: the
    prefix-cache token counters (a vLLM engine, or a transformers pool's session cache, that
    looked up or reused a prefix) and the proposal counter (a step routed to the target; the
    load tests check it is exported), which the pools' source must declare; and the proxies'
    error counters (an error response), which tests/unit/test_dashboard_metrics.py checks
    against Ray's source; the load controller's gauges, exported only with
    policy.load_control on (tests/unit/test_coordinator_load_control.py checks them); and a vLLM
    pool's engine metrics, exported by vLLM pools only, which the rehearsal's cpu-demo config has
    none of (tests/unit/test_engine_metrics.py and tests/vllm check them)."""
    from test_k8s_manifests import dashboard_metrics  # one parser of the dashboard's queries

    from services.engine_metrics import ENGINE_GAUGES, PREEMPTIONS
    from services.load_metrics import LOAD_GAUGES

    wanted = dashboard_metrics()
    on_event = {"ray_arbitrage_pool_prefix_cache_hit_tokens_total", "ray_arbitrage_pool_prefix_cache_query_tokens_total",
                "ray_arbitrage_pool_proposal_tokens_total"}
    on_error = {"ray_serve_num_http_error_requests_total", "ray_serve_num_grpc_error_requests_total"}
    load_control_on = serve_config["applications"][0]["args"]["policy"].get("load_control", {}).get("enabled")
    switched_off = set() if load_control_on else {f"ray_{name}" for name, _ in LOAD_GAUGES.values()}
    vllm_pools = {p for p, spec in serve_config["applications"][0]["args"]["pools"].items()
                  if spec and spec.get("model", {}).get("backend") == "vllm"}
    if not vllm_pools:
        switched_off |= {f"ray_{name}" for name, _ in ENGINE_GAUGES.values()} | {f"ray_{PREEMPTIONS[0]}"}

    def exported():
        text = cluster.metrics_text()
        names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
        missing = {m for m in wanted - on_event - on_error - switched_off if m not in names}
        return None if missing else names
    try:
        _wait_for(exported, 90, "the dashboard's metrics on the nodes' metrics ports")
    except AssertionError:
        text = cluster.metrics_text()
        names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
        raise AssertionError(f"not exported: {sorted(m for m in wanted - on_event - on_error - switched_off if m not in names)}; "
                             f"exported arbitrage/serve metrics: "
                             f"{sorted(n for n in names if 'arbitrage' in n or 'serve' in n)}") from None
    pools_source = (ROOT / "services" / "pools.py").read_text()
    for name in on_event & wanted:
        assert f'"{name.removeprefix("ray_")}"' in pools_source, name



def _target_failing(cluster: LocalRayCluster, app: str) -> bool:
    target = cluster.serve_status()["applications"][app]["deployments"]["target"]
    return target["status"] in ("UNHEALTHY", "DEPLOY_FAILED") and \
        not any(r["state"] == "RUNNING" for r in target.get("replicas", []))


def _running_targets(cluster: LocalRayCluster, app: str) -> list[dict]:
    return [r for r in cluster.replicas(app) if r["deployment"] == "target" and r["state"] == "ALIVE"]


def _two_target_replicas(cluster: LocalRayCluster, rayservice: dict, serve_config: dict) -> None:
    """Two target replicas on two target-group Pods (left so by the scaling test above when it ran)."""
    app = _app(serve_config)
    if len(_running_targets(cluster, app)) < 2:
        data = application_config(serve_config["applications"][0]).model_dump(mode="json")
        data["pools"]["target"]["autoscaling_config"]["min_replicas"] = 2
        cluster.deploy(yaml.safe_dump(render_serve_config(AppConfig.model_validate(data)), sort_keys=False))
        target_group = next(g for g in worker_groups(rayservice) if g.name == "target")
        cluster.add_pods([(target_group, 2 - sum(group == "target" for group, _ in cluster.pods))])
        _wait_for(lambda: len(_running_targets(cluster, app)) == 2, 240, "two running target replicas")


def test_lost_pods_lose_no_request_then_fail_their_pool_fast(cluster: LocalRayCluster, rayservice, serve_config):
    """Target-group Pods are lost (all processes of a node killed at once, as when its machine
    dies), under load. One of two: the calls its replica held are retried on the other, and
    every request succeeds, some after the client resent it on UNAVAILABLE. Then the other:
    once Serve reports the target pool failing, readiness is NOT_SERVING, and a request that
    needs the pool is UNAVAILABLE (gRPC) and 503 with Retry-After (HTTP) within the client's
    30 s, naming the pool, once the pool has been failing for coordinator.fail_fast_after_s
    (before, it waited for a replica until the server's 60 s deadline, and the client saw its
    own DEADLINE_EXCEEDED). The Pod KubeRay starts in its place brings the pool back, in its
    own group, and the same request succeeds.
    Runs last: it takes Pods away."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos.arbitrage.v1 import arbitrage_pb2 as pb
    from protos.arbitrage.v1 import arbitrage_pb2_grpc as pbg

    app = _app(serve_config)
    metadata = (("application", app),)
    target_group = next(g for g in worker_groups(rayservice) if g.name == "target")
    _two_target_replicas(cluster, rayservice, serve_config)
    request = pb.GenerateRequest(prompt=PROMPT, policy="target", max_steps=2)
    with grpc.insecure_channel(f"127.0.0.1:{serve_config['grpc_options']['port']}") as channel:
        stub = pbg.ArbitrageServiceStub(channel)
        outcomes: list[list[str]] = []  # per request, each attempt's code
        stop = threading.Event()

        def client() -> None:
            """Resends after UNAVAILABLE, as a gRPC client should: a request that came in
            through the lost Pod's own proxy (Serve runs one on every node with a replica, and
            KubeRay's serve Service routes to each) ends so."""
            while not stop.is_set():
                codes = []
                for _ in range(CLIENT_ATTEMPTS):
                    try:
                        stub.Generate(request, metadata=metadata, timeout=120)
                        codes.append("OK")
                        break
                    except grpc.RpcError as exc:
                        codes.append(f"{exc.code().name}: {exc.details()}")
                        if exc.code() != grpc.StatusCode.UNAVAILABLE:
                            break
                        time.sleep(1.0)
                outcomes.append(codes)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        _wait_for(lambda: len(outcomes) >= 3, 60, "requests under way")
        assert cluster.lose_pods("target", count=1) == 1
        _wait_for(lambda: len(_running_targets(cluster, app)) == 1, 120, "the lost Pod's replica gone")
        sent_after = len(outcomes)
        _wait_for(lambda: len(outcomes) >= sent_after + 6, 120, "requests served by the replica left")
        stop.set()
        for t in threads:
            t.join(150)
        assert not any(t.is_alive() for t in threads), "a client request hung"
        (ROOT / "runs").mkdir(exist_ok=True)
        (ROOT / "runs" / "pod-loss.json").write_text(json.dumps({"requests": outcomes}, indent=1))
        assert all(codes[-1] == "OK" for codes in outcomes), [codes for codes in outcomes if codes[-1] != "OK"]
        retried = [code for codes in outcomes for code in codes[:-1]]
        assert all(code.startswith("UNAVAILABLE") for code in retried), retried

        assert cluster.lose_pods("target") == 1
        _wait_for(lambda: _target_failing(cluster, app), 180, "Serve to report the target pool failing")
        health = health_pb2_grpc.HealthStub(channel)

        def readiness() -> int | None:
            try:
                return health.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=30).status
            except grpc.RpcError:  # e.g. through a lost Pod's proxy: ask again
                return None
        _wait_for(lambda: readiness() == health_pb2.HealthCheckResponse.NOT_SERVING, 60, "readiness NOT_SERVING")
        with pytest.raises(grpc.RpcError) as info:  # only the client's deadline: held, it would pass
            stub.Generate(request, metadata=metadata, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert "the target pool has no running replica (its replicas died" in info.value.details()
        body = json.dumps({"prompt": PROMPT, "policy": "target", "max_steps": 2}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{serve_config['http_options']['port']}/v1/generate",
                                     data=body, headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as http_info:
            urllib.request.urlopen(req, timeout=30)
        assert http_info.value.code == 503 and int(http_info.value.headers["Retry-After"]) > 0
        assert "the target pool has no running replica (its replicas died" in \
            json.loads(http_info.value.read())["error"]["message"]

        cluster.add_pods([(target_group, 1)])  # the Pod KubeRay starts in a lost one's place
        _wait_for(lambda: not _target_failing(cluster, app), 240, "a running target replica")
        _wait_for(lambda: readiness() == health_pb2.HealthCheckResponse.SERVING, 60, "readiness SERVING")
        assert stub.Generate(request, metadata=metadata, timeout=120).steps
    assert {_group_of(r) for r in _running_targets(cluster, app)} == {"target"}
