"""The client's API key variable ($ARBITRAGE_API_KEY, not the server's ARBITRAGE_API_KEYS) is
named where a user meets it: the UNAUTHENTICATED error, and the help of every command that
calls a running service."""
from __future__ import annotations

import argparse

import pytest

from arbitrage_common.cli.main import build_parser
from arbitrage_common.client import API_KEY_ENV, ServiceError, auth_metadata, retry_after_of


def test_the_client_reads_its_own_variable(monkeypatch):
    monkeypatch.setenv("ARBITRAGE_API_KEY", "k-1")
    assert API_KEY_ENV == "ARBITRAGE_API_KEY"
    assert auth_metadata() == (("authorization", "Bearer k-1"),)


def test_an_unauthenticated_error_says_which_variable_to_set():
    err = ServiceError("127.0.0.1:9000", "UNAUTHENTICATED", "missing or invalid API key")
    assert "$ARBITRAGE_API_KEY" in str(err) and not err.retriable
    assert "ARBITRAGE_API_KEY" not in str(ServiceError("h:1", "UNAVAILABLE", "pool down"))


def _subcommand(argv: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in argv:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("argv,flag", [
    (["generate"], "--endpoint"), (["serve", "bench"], "--endpoint"), (["loadtest"], "--grpc"),
    (["loadtest"], "--http"), (["plan", "profile"], "--grpc"), (["router", "data"], "--endpoint"),
    (["bench"], "--endpoint"),
])
def test_commands_that_call_a_service_name_the_key_variable(argv, flag):
    action = next(a for a in _subcommand(argv)._actions if flag in a.option_strings)
    assert "$ARBITRAGE_API_KEY" in action.help, action.help


def test_arbitrage_generate_prints_the_variable_on_unauthenticated(monkeypatch, capsys):
    import arbitrage_common.client as client_module
    from arbitrage_common.cli.main import main

    class RefusingClient:
        def __init__(self, endpoint, app=None):
            self.endpoint = endpoint

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def generate(self, request, timeout=None):
            raise ServiceError(self.endpoint, "UNAUTHENTICATED", "missing or invalid API key")

    monkeypatch.setattr(client_module, "Client", RefusingClient)
    assert main(["generate", "1+1"]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED: missing or invalid API key" in err and "$ARBITRAGE_API_KEY" in err, err


class _FailedCall:
    def __init__(self, trailers) -> None:
        self.trailers = trailers

    def trailing_metadata(self):
        if isinstance(self.trailers, Exception):
            raise self.trailers
        return self.trailers


def test_the_client_reads_the_servers_retry_after_trailer():
    """The service sends ``retry-after`` trailing metadata with UNAVAILABLE / RESOURCE_EXHAUSTED;
    anything else, or none, is no hint."""
    assert retry_after_of(_FailedCall((("request_id", "x"), ("retry-after", "3")))) == 3.0
    for trailers in [(), None, (("retry-after", "soon"),), (("retry-after", "0"),), RuntimeError("no call")]:
        assert retry_after_of(_FailedCall(trailers)) is None, trailers
