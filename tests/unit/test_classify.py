"""services.convert.classify: every failure -> one meaningful status, no internal text out.

Real exception instances throughout (Ray's, Serve's, the vLLM backend's, ours), built the
way Ray builds them; no Ray cluster is started.
"""
from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from ray.core.generated.common_pb2 import ActorDiedErrorContext
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    NodeDiedError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from arbitrage_common.accounting import LoopResult, StepRecord, Usage
from arbitrage_common.backends.checkpoints import CheckpointError
from arbitrage_common.backends.vllm_generator import EngineDeadError, EngineRequestError
from arbitrage_common.errors import DeadlineExceeded, InvalidArgument, ScorerError
from services import convert

SECRET_PATH = "/srv/secret/models/prm/config.json"
TRACEBACK = (f'Traceback (most recent call last):\n  File "{SECRET_PATH}", line 3, in score\n'
             f"    raise KeyError('{SECRET_PATH}')\nKeyError: '{SECRET_PATH}'")


def _partial(steps: int = 2) -> LoopResult:
    records = [StepRecord(i, f"step {i}", "draft", None, False, None, 3, "delimiter", {}) for i in range(steps)]
    return LoopResult("p", records, "deadline", Usage(steps_by_source={"draft": steps, "target": 0}), 1.0)


def _task_error(cause: BaseException, replica: str = "prm", dual: bool = False) -> RayTaskError:
    """What a failed pool call raises in the coordinator: a RayTaskError carrying the pool's
    exception as ``cause`` (``dual``: Ray's class that is also an instance of the cause's)."""
    err = RayTaskError(f"ServeReplica:arbitrage:{replica}.handle_request", TRACEBACK, cause,
                       proctitle=f"ray::ServeReplica:arbitrage:{replica}.handle_request", pid=4242, ip="10.1.2.3")
    return err.as_instanceof_cause() if dual else err


def _died(pool: str = "target") -> ActorDiedError:
    return ActorDiedError(ActorDiedErrorContext(
        class_name=f"ServeReplica:arbitrage:{pool}", actor_id=b"\x01" * 16, pid=42, node_ip_address="10.0.0.7",
        name=f"SERVE_REPLICA::arbitrage#{pool}#x1y2z3", error_message="The actor is dead because its worker "
                                                                     "process has died."))


def _assert_clean(err: convert.ApiError) -> None:
    """Nothing internal reaches the client: no path, no traceback, no exception text or type."""
    for needle in ("/", "Traceback", "File ", "KeyError", "RayTaskError", "pid", "10.", "secret", "0101"):
        assert needle not in err.message, (needle, err.message)


# -- client errors ------------------------------------------------------------------------
def test_invalid_argument_names_the_field():
    err = convert.classify(InvalidArgument("max_steps", "must be >= 1"))
    assert (err.code, err.grpc_code, err.http_status, err.field) == \
        ("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT, 422, "max_steps")
    assert err.message == "max_steps: must be >= 1" and not err.retriable and err.reference is None
    assert err.json() == {"error": {"message": "max_steps: must be >= 1", "type": "invalid_request_error",
                                    "param": "max_steps", "code": "invalid_argument"}}


def test_bad_input_echoed_back_stays_small_however_large_the_request():
    """A 900 KB policy name, or an unknown field named with 900 KB, must not come back whole:
    gRPC refuses status details over 16 KB (the client would read RESOURCE_EXHAUSTED)."""
    from arbitrage_common.policies import make_policy

    with pytest.raises(InvalidArgument) as info:
        make_policy("A" * 900_000)
    err = convert.classify(info.value)
    assert err.field == "policy" and err.message.startswith("policy: unknown policy 'AAA")
    assert len(err.message) < 500 and "900" in err.message  # cut, saying how long it was
    wide = convert.invalid("x" * 900_000, "extra inputs are not permitted")
    assert len(wide.field) < 100 and len(wide.message) < 500 and len(str(wide.json())) < 1000


def test_invalid_argument_wrapped_by_ray_still_names_the_field():
    err = convert.classify(_task_error(InvalidArgument("options.temperature", "must be >= 0"), dual=True))
    assert (err.code, err.field, err.http_status) == ("invalid_argument", "options.temperature", 422)


def test_our_deadline_is_deadline_exceeded():
    err = convert.classify(DeadlineExceeded(_partial(3)))
    assert (err.code, err.grpc_code, err.http_status) == ("deadline_exceeded", grpc.StatusCode.DEADLINE_EXCEEDED, 504)
    assert "after 3 steps" in err.message and not err.retriable


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), RequestCancelledError("req-1")],
                         ids=["asyncio", "serve-request-cancelled"])
def test_cancellation_is_cancelled_499(exc):
    err = convert.classify(exc)
    assert (err.code, err.grpc_code, err.http_status) == ("cancelled", grpc.StatusCode.CANCELLED, 499)
    assert not err.retriable


# -- overload -----------------------------------------------------------------------------
def test_backpressure_is_resource_exhausted_and_retriable():
    err = convert.classify(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    assert (err.code, err.grpc_code, err.http_status) == \
        ("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, 503)
    assert err.retriable and "queue is full" in err.message
    assert "num_queued_requests" not in err.message  # Serve's own text stays inside


def test_backpressure_names_the_pool_from_a_pool_attribute():
    exc = BackPressureError(num_queued_requests=3, max_queued_requests=2)
    exc.pool = "router"
    assert convert.classify(exc).message.startswith("overloaded: the router pool's queue is full")


def test_backpressure_as_a_cause_names_the_replica_it_came_through():
    err = convert.classify(_task_error(BackPressureError(4, 4), replica="target"))
    assert err.code == "resource_exhausted" and "the target pool" in err.message
    _assert_clean(err)


def test_a_pool_attribute_that_is_not_a_plain_name_is_ignored():
    exc = BackPressureError(3, 2)
    exc.pool = "/etc/passwd"
    err = convert.classify(exc)
    assert "a model pool" in err.message and "passwd" not in err.message


# -- a dead replica or engine: UNAVAILABLE, retriable --------------------------------------
@pytest.mark.parametrize("exc,pool", [
    (_died("target"), "target"),
    (RayActorError(actor_id="ab" * 16, error_msg="The actor experienced an error before finishing this task."), None),
    (ActorUnavailableError("connection to the actor was lost", b"\x02" * 16), None),
    (DeploymentUnavailableError(DeploymentID(name="draft", app_name="arbitrage")), "draft"),
    (ReplicaUnavailableError("Replica(id='q9', deployment='router', app='arbitrage')"), "router"),
    (WorkerCrashedError(), None),
    (NodeDiedError("node 10.0.0.9 died"), None),
    (EngineDeadError("target pool: /models/target: vLLM engine is dead (EngineDeadError: its process exited)"),
     "target"),
    (_task_error(EngineDeadError("draft pool: generator is shut down"), replica="draft"), "draft"),
    (_task_error(EngineDeadError("generator is shut down"), replica="draft", dual=True), "draft"),
    (TimeoutError(f"read from {SECRET_PATH} timed out"), None),
    (GetTimeoutError("Get timed out: some object(s) not ready."), None),
    (_task_error(TimeoutError("backend timed out"), replica="prm", dual=True), "prm"),
    (_task_error(DeadlineExceeded(_partial()), replica="prm"), "prm"),  # a pool's own, not the client's
    (grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata()), None),
], ids=["actor-died", "ray-actor-error", "actor-unavailable", "deployment-unavailable", "replica-unavailable",
        "worker-crashed", "node-died", "engine-dead", "engine-dead-as-cause", "engine-dead-dual",
        "backend-timeout", "ray-get-timeout", "timeout-as-cause", "deadline-raised-in-a-pool",
        "replica-grpc-server-cancelled"])
def test_dead_replicas_engines_and_backend_timeouts_are_unavailable(exc, pool):
    err = convert.classify(exc)
    assert (err.code, err.grpc_code, err.http_status) == ("unavailable", grpc.StatusCode.UNAVAILABLE, 503), \
        err.message
    assert err.retriable and err.reference is None
    assert err.grpc_code != grpc.StatusCode.DEADLINE_EXCEEDED
    assert (f"the {pool} pool" in err.message) if pool else ("a model pool" in err.message), err.message
    _assert_clean(err)


def test_engine_dead_says_so():
    err = convert.classify(EngineDeadError("target pool: m: vLLM engine is dead"))
    assert err.message == "the target pool's vLLM engine is dead; retry (Serve replaces its replica)"


# -- everything else: INTERNAL with a reference, nothing internal in the message -----------
@pytest.mark.parametrize("exc,expected", [
    (KeyError(SECRET_PATH), r"internal error; reference [0-9a-f]{12}"),
    (_task_error(KeyError(SECRET_PATH), replica="prm"), r"internal error \(prm pool\); reference [0-9a-f]{12}"),
    (_task_error(KeyError(SECRET_PATH), replica="prm", dual=True),
     r"internal error \(prm pool\); reference [0-9a-f]{12}"),
    (CheckpointError(f"{SECRET_PATH}: missing (not a Hugging Face checkpoint)"),
     r"internal error \(unusable checkpoint\); reference [0-9a-f]{12}"),
    (_task_error(CheckpointError(f"{SECRET_PATH}: corrupt JSON"), replica="draft"),
     r"internal error \(draft pool, unusable checkpoint\); reference [0-9a-f]{12}"),
    (EngineRequestError(f"draft pool: {SECRET_PATH}: request r1 finished with 'abort'"),
     r"internal error \(draft pool, engine request failed\); reference [0-9a-f]{12}"),
    (ScorerError("prm", f"returned a non-finite score nan from {SECRET_PATH}"),
     r"internal error: the prm returned an unusable result; reference [0-9a-f]{12}"),
    (ScorerError("draft generator", "unknown finish_reason 'x'"),
     r"internal error: the draft generator returned an unusable result; reference [0-9a-f]{12}"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), r"internal error; reference [0-9a-f]{12}"),
], ids=["bug", "bug-in-a-pool", "bug-in-a-pool-dual", "checkpoint", "checkpoint-in-a-pool", "engine-request",
        "scorer", "generator", "runtime"])
def test_everything_else_is_internal_with_a_reference(exc, expected):
    err = convert.classify(exc)
    assert (err.code, err.grpc_code, err.http_status) == ("internal", grpc.StatusCode.INTERNAL, 500)
    assert re.fullmatch(expected, err.message), err.message
    assert err.reference and err.message.endswith(f"reference {err.reference}") and not err.retriable
    assert err.json()["error"]["code"] == "internal" and err.json()["error"]["message"] == err.message
    _assert_clean(err)
    assert "nan" not in err.message and "abort" not in err.message and "CUDA" not in err.message


def test_each_internal_error_gets_its_own_reference():
    refs = {convert.classify(KeyError("x")).reference for _ in range(50)}
    assert len(refs) == 50


def test_retriable_follows_the_code():
    assert convert.ApiError("unavailable", grpc.StatusCode.UNAVAILABLE, 503, "m").retriable
    assert convert.ApiError("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, 503, "m").retriable
    assert not convert.ApiError("not_found", grpc.StatusCode.NOT_FOUND, 404, "m").retriable


def test_auth_and_size_errors_keep_the_openai_shape():
    auth = convert.unauthenticated()
    assert (auth.code, auth.grpc_code, auth.http_status) == ("unauthenticated", grpc.StatusCode.UNAUTHENTICATED, 401)
    assert set(auth.json()["error"]) == {"message", "type", "param", "code"}
    big = convert.payload_too_large(1024, 4096)
    assert (big.code, big.http_status, big.field, big.retriable) == ("payload_too_large", 413, "body", False)
    assert big.grpc_code == grpc.StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED: clients retry that
    assert big.json()["error"] == {"message": "body: is 4096 bytes; the limit is 1024 bytes",
                                   "type": "invalid_request_error", "param": "body", "code": "payload_too_large"}
