"""The vLLM backend's seed mapping and its start-failure message, without vllm: the seed a
sampled row gives the engine fits vLLM's int64 seed array (Model Runner V2), and an engine that
fails to start says where its cause is logged and what it usually is."""
from __future__ import annotations

import sys
import types

import pytest

from arbitrage_common.backends import vllm_generator as V
from arbitrage_common.interfaces import GenerationOptions

INT64 = (-2**63, 2**63 - 1)  # the API's seed range (services.validation.SEED_RANGE)


@pytest.mark.parametrize("seed,want", [(None, 0), (0, 0), (7, 7), (2**63 - 1, 2**63 - 1), (-1, 2**63 - 1),
                                       (-2**63, 0), (-2, 2**63 - 2), (2**63, 0), (2**64 - 1, 2**63 - 1),
                                       (2**63 + 5, 5)])
def test_engine_seed_is_the_low_63_bits(seed, want):
    assert V.engine_seed(seed) == want


@pytest.mark.parametrize("seed", [INT64[0], -12345, -1, 0, 1, 2**62, INT64[1], INT64[1] + 1, INT64[1] + 63])
def test_every_seed_a_row_can_carry_fits_an_int64_and_is_not_vllms_unseeded(seed):
    # seed + i (row_options) may pass 2**63 - 1; what the engine gets never does
    s = V.engine_seed(seed)
    assert 0 <= s <= INT64[1]
    import torch

    seeds = torch.zeros(1, dtype=torch.int64).numpy()  # vLLM 0.32 MRV2's SamplingStates.seeds
    seeds[0] = s  # the old (seed % 2**64) raised OverflowError here for -1 and killed the engine core
    assert int(seeds[0]) == s


def _generator_without_engine():
    g = V.VLLMStepGenerator.__new__(V.VLLMStepGenerator)
    g._SamplingParams, g._final_only, g.delimiter = dict, "FINAL_ONLY", "\n\n"
    return g


def test_sampling_params_send_the_mapped_seed():
    g = _generator_without_engine()
    assert g._sampling_params(GenerationOptions(temperature=0.7, seed=-1), 8)["seed"] == 2**63 - 1
    assert g._sampling_params(GenerationOptions(temperature=0.7, seed=None), 8)["seed"] == 0
    assert g._sampling_params(GenerationOptions(temperature=0.7, seed=42), 8)["seed"] == 42
    assert "seed" not in g._sampling_params(GenerationOptions(temperature=0.0, seed=-1), 8)  # greedy: no seed
    # seeds equal in their low 63 bits sample alike (docs/VLLM.md)
    assert g._sampling_params(GenerationOptions(temperature=0.7, seed=-1), 8)["seed"] == \
        g._sampling_params(GenerationOptions(temperature=0.7, seed=2**63 - 1), 8)["seed"]


VLLM_ROOT_CAUSE = "Engine core initialization failed. See root cause above. Failed core proc(s): {}"


def test_the_start_error_says_where_the_cause_is_and_what_it_usually_is():
    msg = V.engine_start_message("/models/target", RuntimeError(VLLM_ROOT_CAUSE))
    assert msg.startswith(f"/models/target: vLLM engine failed to start (RuntimeError: {VLLM_ROOT_CAUSE})")
    for text in ("Ray worker log", "engine-core process", "gpu_memory_utilization", "max_model_len",
                 "shared GPU", "free"):
        assert text in msg, text
    assert "/tmp" not in msg and "session_" not in msg  # no paths beyond the model's


def _fake_vllm(monkeypatch, from_engine_args):
    """Just enough of vllm's modules for VLLMStepGenerator.__init__ on a 'GPU' platform."""
    mods = {name: types.ModuleType(name) for name in (
        "vllm", "vllm.engine", "vllm.engine.arg_utils", "vllm.platforms", "vllm.sampling_params", "vllm.v1",
        "vllm.v1.engine", "vllm.v1.engine.async_llm", "vllm.v1.metrics", "vllm.v1.metrics.loggers")}
    mods["vllm"].SamplingParams = dict
    mods["vllm.engine.arg_utils"].AsyncEngineArgs = lambda **kw: kw
    mods["vllm.platforms"].current_platform = types.SimpleNamespace(is_cpu=lambda: False, device_type="cuda")
    mods["vllm.sampling_params"].RequestOutputKind = types.SimpleNamespace(FINAL_ONLY="FINAL_ONLY")
    mods["vllm.v1.engine.async_llm"].AsyncLLM = types.SimpleNamespace(from_engine_args=from_engine_args)
    mods["vllm.v1.metrics.loggers"].StatLoggerBase = object
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)


def test_a_failed_engine_start_raises_the_hint(monkeypatch):
    def fail(args, stat_loggers=None):
        raise RuntimeError(VLLM_ROOT_CAUSE)

    _fake_vllm(monkeypatch, fail)
    with pytest.raises(V.EngineStartError) as exc:
        V.VLLMStepGenerator("org/some-model", local=False, gpu_memory_utilization=0.9, max_model_len=4096)
    assert str(exc.value) == V.engine_start_message("org/some-model", exc.value.__cause__)
    assert "See root cause above" in str(exc.value) and "Ray worker log" in str(exc.value)
