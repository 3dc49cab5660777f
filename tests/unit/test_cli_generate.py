"""`arbitrage generate` against an in-process gRPC server (no Ray): its deadline, its flags'
ranges, and its JSON."""
from __future__ import annotations

import json
import threading
from concurrent import futures

import grpc
import pytest

from arbitrage_common.cli.main import main
from protos.arbitrage.v1 import arbitrage_pb2 as pb
from protos.arbitrage.v1 import arbitrage_pb2_grpc as pbg


class _Stalled(pbg.ArbitrageServiceServicer):
    """Answers only after ``hold`` is set (or 30 s): a request queued where timeout_s does not run."""

    def __init__(self) -> None:
        self.hold, self.seen = threading.Event(), []

    def Generate(self, request, context):
        self.seen.append((request.timeout_s, context.time_remaining()))
        self.hold.wait(30)
        return pb.GenerateResponse(text="late", answer=7)


@pytest.fixture
def stalled():
    servicer = _Stalled()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pbg.add_ArbitrageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    servicer.hold.set()
    server.stop(0)


def test_generate_timeout_is_also_the_clients_own_deadline(stalled, capsys):
    servicer, endpoint = stalled
    assert main(["generate", "Start with 1.", "--endpoint", endpoint, "--timeout", "0.2"]) == 1
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err
    timeout_s, remaining = servicer.seen[0]
    assert timeout_s == pytest.approx(0.2) and remaining is not None and remaining < 60


def test_a_very_long_timeout_reaches_the_server_instead_of_overflowing_grpcs_deadline(stalled, capsys):
    """grpc turned a deadline 1e10 s away into one already passed: the call never left."""
    servicer, endpoint = stalled
    servicer.hold.set()
    assert main(["generate", "Start with 1.", "--endpoint", endpoint, "--timeout", "1e10"]) == 0
    assert servicer.seen[0][0] == 1e10 and "answer: 7" in capsys.readouterr().out


def test_generate_json_has_the_http_apis_shapes(stalled, capsys):
    servicer, endpoint = stalled
    servicer.hold.set()
    assert main(["generate", "Start with 1.", "--endpoint", endpoint, "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["answer"] == 7 and reply["threshold"] is None and reply["text"] == "late"


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-steps", "9999999999", "argument --max-steps: must be <= 2147483647"),
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be >= 1"),
    ("--seed", str(2**64), "argument --seed: must be <= 9223372036854775807"),
    ("--timeout", "inf", "argument --timeout: must be a finite number > 0, got inf"),
])
def test_generate_flags_out_of_the_apis_range_name_the_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "Start with 1.", flag, value])
    assert info.value.code == 2 and message in capsys.readouterr().err
