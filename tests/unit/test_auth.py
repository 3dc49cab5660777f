"""arbitrage_common.auth: key loading, the bearer check, and the config that names the variable."""
from __future__ import annotations

import hmac
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from arbitrage_common import auth
from arbitrage_common.auth import AuthConfigError, check_bearer, load_keys, parse_keys
from arbitrage_common.config import AuthSpec

ROOT = Path(__file__).resolve().parents[2]
KEYS = (b"key-one", b"key-two")


def test_auth_module_imports_no_ray():
    code = ("import sys, arbitrage_common.auth; bad = [m for m in ('ray', 'torch', 'grpc', 'fastapi') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- check_bearer -------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["Bearer key-one", "Bearer key-two", "bearer key-two", "BEARER  key-one ",
                                    b"Bearer key-one"])
def test_a_configured_key_passes(header):
    assert check_bearer(header, KEYS)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "key-one", "Basic key-one", "Bearer key-on",
                                    "Bearer key-one2", "Bearer KEY-ONE", "Bearer key-one key-two", "Token key-one",
                                    "Bearer key-on\u20ac", "Bearer k\u00e9y-one"])
def test_anything_else_fails(header):
    assert not check_bearer(header, KEYS)


def test_no_keys_never_passes():
    assert not check_bearer("Bearer anything", ())
    assert not check_bearer(None, ())


def test_a_missing_header_does_not_match_an_empty_key():
    assert not check_bearer(None, (b"",)) and not check_bearer("Bearer", (b"",))


def test_every_key_is_compared_with_no_early_exit(monkeypatch):
    """Constant time: compare_digest over equal-length digests, once per key, whether the
    first key matched, the last did, or none did."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = (b"first", b"a-much-longer-second-key", b"3")
    for header in ("Bearer first", "Bearer 3", "Bearer nope", None, "garbage"):
        calls.clear()
        check_bearer(header, keys)
        assert len(calls) == len(keys), header
        assert {lengths for lengths in calls} == {(32, 32)}, "lengths must not depend on the key or the token"


# -- parse_keys / load_keys ---------------------------------------------------------------
def test_keys_are_split_on_commas_stripped_and_deduplicated():
    assert parse_keys(" a1 , b2,,a1, c3 ") == (b"a1", b"b2", b"c3")


def test_off_without_a_variable():
    assert load_keys(AuthSpec()) == () and load_keys(None) == ()


def test_keys_come_from_the_named_variable():
    spec = AuthSpec(api_key_env="ARB_KEYS")
    assert load_keys(spec, {"ARB_KEYS": "k1,k2"}) == (b"k1", b"k2")


def test_keys_from_os_environ(monkeypatch):
    monkeypatch.setenv("ARB_TEST_KEYS", "sekrit")
    assert load_keys(AuthSpec(api_key_env="ARB_TEST_KEYS")) == (b"sekrit",)


def test_a_missing_variable_fails_naming_it():
    with pytest.raises(AuthConfigError, match=r"ARB_KEYS is not set on this replica's node"):
        load_keys(AuthSpec(api_key_env="ARB_KEYS"), {})


@pytest.mark.parametrize("value", ["", "   ", ",", " , ,"])
def test_an_empty_variable_fails_naming_it(value):
    with pytest.raises(AuthConfigError, match="ARB_KEYS"):
        load_keys(AuthSpec(api_key_env="ARB_KEYS"), {"ARB_KEYS": value})


def test_a_key_with_spaces_or_non_ascii_fails_without_echoing_it():
    with pytest.raises(AuthConfigError, match=r"key #2") as info:
        load_keys(AuthSpec(api_key_env="ARB_KEYS"), {"ARB_KEYS": "good,bad key"})
    assert "bad key" not in str(info.value)
    with pytest.raises(AuthConfigError, match=r"key #1"):
        parse_keys("s\u00e9cret")


def test_the_config_takes_a_variable_name_never_a_key():
    assert AuthSpec(api_key_env="ARBITRAGE_API_KEYS").api_key_env == "ARBITRAGE_API_KEYS"
    for bad in ("sk-live-123", "has space", "1ABC", ""):
        with pytest.raises(ValidationError, match="api_key_env"):
            AuthSpec(api_key_env=bad)
    with pytest.raises(ValidationError, match="k8s_secret"):
        AuthSpec(api_key_env="K", k8s_secret="Not_A_Secret")
