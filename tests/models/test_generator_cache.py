"""The transformers generators' per-session prefix cache on the bundled draft and target: every
cached generation is compared with an uncached generator's (``prefix_cache_bytes=0``), never
with something the cache computed itself; the cache's counters show that it was used."""
import random
import sys
import threading
import time
from pathlib import Path

import pytest

from arbitrage_common.backends.generator_cache import common_prefix
from arbitrage_common.backends.hf_generator import HFStepGenerator
from arbitrage_common.interfaces import GenerationOptions
from arbitrage_common.steps import STEP_DELIMITER, build_prefix
from arbitrage_common.synthetic import generate_problems

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module", params=["draft", "target"])
def pair(request):
    """(cached, uncached) generators over the same checkpoint."""
    cached = HFStepGenerator(MODELS / request.param, threads=1)
    plain = HFStepGenerator(MODELS / request.param, threads=1, prefix_cache_bytes=0)
    assert cached.prefix_cache is not None and plain.prefix_cache is None
    return cached, plain


def triples(gens):
    return [(g.text, g.tokens, g.finish_reason) for g in gens]


def _grow(prefixes, gens):
    return [p + g.text + STEP_DELIMITER if g.finish_reason == "delimiter" else p for p, g in zip(prefixes, gens)]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([7, 8], [7, 8]) == 2 and common_prefix([1], [2]) == 0


def test_trajectories_cached_equal_uncached_step_by_step(pair):
    """Eight sessions in every call, each prefix growing by its own kept step: from the second
    step on, each row runs only its new tokens, and every row equals the uncached one."""
    cached, plain = pair
    prefixes = [build_prefix(p.prompt, []) for p in generate_problems(8, 501)]
    sessions = [f"traj-{i}" for i in range(len(prefixes))]
    before = cached.prefix_cache.info()
    for _ in range(6):
        want = plain.generate_batch(prefixes, GenerationOptions(max_new_tokens=64))
        got = cached.generate_batch(prefixes, GenerationOptions(max_new_tokens=64), sessions)
        assert triples(got) == triples(want)
        prefixes = _grow(prefixes, want)
    after = cached.prefix_cache.info()
    assert after["requests"] - before["requests"] == 6 * 8 and after["misses"] - before["misses"] == 8
    reused, queried = after["hits"] - before["hits"], after["queries"] - before["queries"]
    assert reused > 0.75 * queried  # from the second step on, only the new step's tokens run
    for session in sessions:
        assert cached.release(session)


def test_a_rewritten_step_reuses_only_the_common_part(pair):
    """The target rewrote step 1 (another text than the one the session generated): the next
    call reuses the problem's keys/values only, and still equals the uncached call."""
    cached, plain = pair
    problem = generate_problems(1, 502)[0]
    prefix = build_prefix(problem.prompt, [])
    first = cached.generate_batch([prefix], GenerationOptions(max_new_tokens=64), ["rewrite"])[0]
    rewritten = prefix + "Let me redo that: 1 + 1 = 2." + STEP_DELIMITER
    assert first.text != "Let me redo that: 1 + 1 = 2."
    before = cached.prefix_cache.info()
    got = cached.generate_batch([rewritten], GenerationOptions(max_new_tokens=64), ["rewrite"])
    assert triples(got) == triples(plain.generate_batch([rewritten], GenerationOptions(max_new_tokens=64)))
    after = cached.prefix_cache.info()
    reused = after["hits"] - before["hits"]
    assert cached.count_tokens(prefix) - 1 <= reused < cached.count_tokens(rewritten) - 1
    cached.release("rewrite")


def test_a_mixed_batch_of_hits_misses_and_no_session_equals_each_row_alone(pair):
    """Rows with different past lengths (hit, miss, none), budgets, and sampling share one
    forward pass; each equals the same row generated alone without a cache."""
    cached, plain = pair
    problems = generate_problems(4, 503)
    warm = [build_prefix(p.prompt, []) for p in problems[:2]]
    steps = cached.generate_batch(warm, GenerationOptions(max_new_tokens=64), ["mix-0", "mix-1"])
    rows = [
        (_grow(warm[:1], steps[:1])[0], GenerationOptions(max_new_tokens=64), "mix-0"),  # a long hit
        (warm[1], GenerationOptions(max_new_tokens=5), "mix-1"),  # a hit on its own prefix, small budget
        (build_prefix(problems[2].prompt, []), GenerationOptions(40, temperature=1.3, seed=9), "mix-2"),  # a miss
        (build_prefix(problems[3].prompt, []), GenerationOptions(max_new_tokens=64), None),  # no session
    ]
    got = cached.generate_batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    alone = [plain.generate_batch([p], o)[0] for p, o, _ in rows]
    assert triples(got) == triples(alone)
    assert got[1].tokens <= 5
    for session in ("mix-0", "mix-1", "mix-2"):
        assert cached.release(session)
    assert not cached.release("mix-3")


def test_sampled_steps_are_the_same_cached_or_not(pair):
    cached, plain = pair
    prefixes = [build_prefix(p.prompt, []) for p in generate_problems(3, 504)]
    options = [GenerationOptions(48, temperature=1.1, seed=s) for s in (1, 2, 3)]
    for _ in range(3):
        want = plain.generate_batch(prefixes, options)
        assert triples(cached.generate_batch(prefixes, options, ["s-0", "s-1", "s-2"])) == triples(want)
        prefixes = _grow(prefixes, want)
    for session in ("s-0", "s-1", "s-2"):
        cached.release(session)


def test_a_tiny_bound_evicts_and_changes_nothing():
    """A bound of about one session: sessions evict each other, every output is unchanged."""
    plain = HFStepGenerator(MODELS / "draft", threads=1, prefix_cache_bytes=0)
    tiny = HFStepGenerator(MODELS / "draft", threads=1, prefix_cache_bytes=300_000)
    rng = random.Random(5)
    prefixes = [build_prefix(p.prompt, []) for p in generate_problems(5, 505)]
    for _ in range(4):
        order = rng.sample(range(5), 5)
        want = plain.generate_batch([prefixes[i] for i in order], GenerationOptions(max_new_tokens=64))
        got = [tiny.generate_batch([prefixes[i]], GenerationOptions(max_new_tokens=64), [f"t-{i}"])[0]
               for i in order]
        assert triples(got) == triples(want)
        for i, g in zip(order, want):
            prefixes[i] = _grow([prefixes[i]], [g])[0]
    info = tiny.prefix_cache.info()
    assert info["evictions"] > 0 and info["bytes"] <= 300_000


def test_a_call_waiting_for_the_lock_does_not_bring_a_released_session_back():
    """A call that entered generate_batch while another batch held the lock, whose request
    ended (released) before it got the lock, must not store the session again."""
    gen = HFStepGenerator(MODELS / "draft", threads=1)
    prefix = build_prefix(generate_problems(1, 507)[0].prompt, [])
    done = threading.Event()
    with gen._lock:  # another batch runs
        waiting = threading.Thread(target=lambda: (gen.generate_batch([prefix], GenerationOptions(max_new_tokens=8),
                                                                       ["x"]), done.set()))
        waiting.start()
        deadline = time.monotonic() + 5  # until it waits at the lock (its epoch read), or 5 s
        while time.monotonic() < deadline and not any(
                f.f_code.co_name == "generate_batch" and "epoch" in f.f_locals for f in _frames(waiting)):
            time.sleep(0.01)
        gen.release("x")  # its request ended while it waited
    waiting.join(60)
    assert done.is_set() and "x" not in gen.prefix_cache.store


def _frames(thread: threading.Thread):
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        yield frame
        frame = frame.f_back


def test_a_released_session_misses_and_the_fallback_stepper_has_no_cache():
    gen = HFStepGenerator(MODELS / "draft", threads=1)
    prefix = build_prefix(generate_problems(1, 506)[0].prompt, [])
    gen.generate_batch([prefix], GenerationOptions(max_new_tokens=16), ["r"])
    assert gen.release("r") and not gen.release("r")
    before = gen.prefix_cache.info()
    gen.generate_batch([prefix], GenerationOptions(max_new_tokens=16), ["r"])
    assert gen.prefix_cache.info()["misses"] == before["misses"] + 1
    with pytest.raises(ValueError, match="sessions"):
        gen.generate_batch([prefix, prefix], GenerationOptions(), ["only-one"])
    fallback = HFStepGenerator(MODELS / "draft", threads=1, fast_path=False)
    assert fallback.prefix_cache is None and not fallback.release("r")
    assert triples(fallback.generate_batch([prefix], GenerationOptions(max_new_tokens=16), ["r"])) == \
        triples(gen.generate_batch([prefix], GenerationOptions(max_new_tokens=16)))
