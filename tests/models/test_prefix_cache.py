"""The scorers' per-session prefix KV cache on the bundled PRM and router: every cached score is
compared with the uncached path (``score_batch(items)``, no sessions), never with a value the
cache computed itself; the cache's counters show which path each item took."""
import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from arbitrage_common.backends.lm_verifier import LMVerifierScorer, split_candidate
from arbitrage_common.backends.prefix_cache import SessionState
from arbitrage_common.backends.scorers import load_step_scorer
from arbitrage_common.backends.verifier_router import VerifierRouterScorer
from arbitrage_common.interfaces import ScoreItem
from arbitrage_common.synthetic import generate_problems

MODELS = Path(__file__).resolve().parents[2] / "models"
TOL = 1e-5


def _wrong(step: str, rng: random.Random) -> str:
    i = max(i for i, c in enumerate(step) if c.isdigit())
    return step[:i] + str((int(step[i]) + rng.randrange(1, 10)) % 10) + step[i + 1:]


def _history(steps):
    return tuple((s, "draft" if i % 2 else "target") for i, s in enumerate(steps))


@pytest.fixture(scope="module", params=["prm", "router"])
def scorer(request):
    s = load_step_scorer(MODELS / request.param, threads=1)
    assert isinstance(s, LMVerifierScorer if request.param == "prm" else VerifierRouterScorer)
    assert s.prefix_cache.enabled
    return s


@pytest.fixture(scope="module")
def prm():
    return load_step_scorer(MODELS / "prm", threads=1)


def _delta(scorer, before):
    now = scorer.prefix_cache.info()
    return {k: now[k] - before[k] for k in ("hits", "misses", "truncated", "uncached", "new_tokens", "cached_tokens")}


def test_trajectories_cached_equal_uncached_step_by_step(scorer):
    """Six sessions interleaved in every call, history growing by the gold step, two
    candidates per session and step (the gold step, kept next, and a wrong one, never kept)."""
    rng = random.Random(7)
    problems = generate_problems(6, 2024)
    sessions = {i: f"traj-{id(scorer)}-{i}" for i in range(len(problems))}
    for k in range(max(len(p.solution_steps()) for p in problems)):
        items, keys = [], []
        for i, p in enumerate(problems):
            gold = p.solution_steps()
            if k < len(gold):
                pair = [ScoreItem(p.prompt, _history(gold[:k]), gold[k]),
                        ScoreItem(p.prompt, _history(gold[:k]), _wrong(gold[k], rng))]
                items += pair[::-1] if i % 2 else pair
                keys += [sessions[i]] * 2
        order = list(range(len(items)))
        rng.shuffle(order)  # sessions interleaved in the batch
        items, keys = [items[j] for j in order], [keys[j] for j in order]
        before = scorer.prefix_cache.info()
        cached = scorer.score_batch(items, keys)
        uncached = scorer.score_batch(items)
        assert cached == pytest.approx(uncached, abs=TOL), f"step {k}"
        d = _delta(scorer, before)
        n_sessions = len(set(keys))
        if k == 0:  # one miss per fresh session; its second candidate runs over the first's prefix
            assert d["misses"] == n_sessions and d["hits"] == n_sessions
        else:
            assert d["misses"] == 0 and d["hits"] == len(items)
            # Kept step = last step's gold candidate (a branch): only the delimiter and the candidate run.
            assert d["new_tokens"] == sum(2 + len(it.candidate) for it in items)
    for key in sessions.values():
        assert scorer.release(key)
    assert all(key not in scorer.prefix_cache.store for key in sessions.values())


def test_kept_step_that_was_not_scored_reuses_the_prefix(scorer):
    """The router scores the draft step, the request keeps the target's (a different) step."""
    rng = random.Random(3)
    p = generate_problems(1, 555)[0]
    gold = p.solution_steps()
    key = f"unscored-{id(scorer)}"
    for k in range(len(gold)):
        item = ScoreItem(p.prompt, _history(gold[:k]), _wrong(gold[k], rng))
        before = scorer.prefix_cache.info()
        assert scorer.score_batch([item], [key]) == pytest.approx(scorer.score_batch([item]), abs=TOL)
        d = _delta(scorer, before)
        assert (d["hits"], d["misses"]) == ((1, 0) if k else (0, 1))
        if k:  # the newly kept step (its delimiter is cached), the candidate's delimiter and the candidate
            assert d["new_tokens"] == len(gold[k - 1]) + 2 + len(item.candidate)
    scorer.release(key)


def test_prm_features_cached_equal_uncached(prm):
    """The raw min log-probs too (a calibrated score can saturate and hide a difference)."""
    problems = generate_problems(4, 99)
    def key(i):
        return f"feat-{i}"

    def fallback(texts, starts):
        return prm.features(texts, starts), None

    for k in range(min(len(p.solution_steps()) for p in problems)):
        items = [ScoreItem(p.prompt, _history(p.solution_steps()[:k]), p.solution_steps()[k]) for p in problems]
        cached, _ = prm.prefix_cache.features(items, [key(i) for i in range(len(items))], prm.fit, split_candidate,
                                              fallback)
        texts, starts = zip(*(split_candidate(it) for it in items))
        assert cached == pytest.approx(prm.features(texts, starts), abs=1e-4)
    for i in range(len(problems)):
        prm.release(key(i))


def test_diverging_history_is_a_miss_with_the_same_score(scorer):
    rng = random.Random(11)
    p, q = generate_problems(2, 4711)
    gp, gq = p.solution_steps(), q.solution_steps()
    key = f"diverge-{id(scorer)}"
    cases = {
        "an earlier step changed (a failover)": ScoreItem(p.prompt, _history([_wrong(gp[0], rng)]), gp[1]),
        "another request under the same key": ScoreItem(q.prompt, _history(gq[:1]), gq[1]),
        "a shorter history than the cache holds": ScoreItem(p.prompt, (), gp[0]),
    }
    for why, item in cases.items():
        scorer.score_batch([ScoreItem(p.prompt, _history(gp[:1]), gp[1])], [key])  # cache: p after step 1
        before = scorer.prefix_cache.info()
        assert scorer.score_batch([item], [key]) == pytest.approx(scorer.score_batch([item]), abs=TOL), why
        assert _delta(scorer, before)["misses"] == 1, why
    # The miss rebuilt the session's cache (for p's first step): p's next step is a hit.
    nxt = ScoreItem(p.prompt, _history(gp[:1]), gp[1])
    before = scorer.prefix_cache.info()
    assert scorer.score_batch([nxt], [key]) == pytest.approx(scorer.score_batch([nxt]), abs=TOL)
    assert _delta(scorer, before)["hits"] == 1
    scorer.release(key)


def test_cached_ids_that_do_not_match_the_tokenization_are_not_used(scorer):
    """The exactness check is on token ids, not text: a cached sequence whose ids are not a
    prefix of the item's tokenization (as a BPE merge across the boundary would make) is a miss."""
    p = generate_problems(1, 8)[0]
    gold = p.solution_steps()
    key = f"ids-{id(scorer)}"
    scorer.score_batch([ScoreItem(p.prompt, _history(gold[:1]), gold[1])], [key])
    stored = scorer.prefix_cache.store.get(key)
    assert isinstance(stored, SessionState) and stored.states
    bent = SessionState(tuple(dataclasses.replace(s, ids=s.ids[:-1] + (s.ids[-1] + 1,)) for s in stored.states))
    scorer.prefix_cache.store.put(key, bent, bent.nbytes)
    item = ScoreItem(p.prompt, _history(gold[:2]), gold[2])
    before = scorer.prefix_cache.info()
    assert scorer.score_batch([item], [key]) == pytest.approx(scorer.score_batch([item]), abs=TOL)
    assert _delta(scorer, before)["misses"] == 1
    scorer.release(key)


def test_hit_and_miss_give_the_same_score(scorer):
    p = generate_problems(1, 1234)[0]
    gold = p.solution_steps()
    warm = ScoreItem(p.prompt, _history(gold[:1]), gold[1])
    item = ScoreItem(p.prompt, _history(gold[:2]), gold[2])
    scorer.score_batch([warm], ["hit"])
    before = scorer.prefix_cache.info()
    hit = scorer.score_batch([item], ["hit"])
    miss = scorer.score_batch([item], ["fresh"])
    d = _delta(scorer, before)
    assert (d["hits"], d["misses"]) == (1, 1)
    assert hit == pytest.approx(miss, abs=TOL) and hit == pytest.approx(scorer.score_batch([item]), abs=TOL)
    scorer.release("hit")
    scorer.release("fresh")


def test_release_evicts_and_the_next_call_is_a_miss(scorer):
    p = generate_problems(1, 77)[0]
    gold = p.solution_steps()
    key = f"release-{id(scorer)}"
    scorer.score_batch([ScoreItem(p.prompt, (), gold[0])], [key])
    assert key in scorer.prefix_cache.store
    held = scorer.prefix_cache.store.bytes
    assert scorer.release(key) and key not in scorer.prefix_cache.store
    assert scorer.prefix_cache.store.bytes < held
    assert not scorer.release(key)  # nothing left
    item = ScoreItem(p.prompt, _history(gold[:1]), gold[1])
    before = scorer.prefix_cache.info()
    assert scorer.score_batch([item], [key]) == pytest.approx(scorer.score_batch([item]), abs=TOL)
    assert _delta(scorer, before)["misses"] == 1
    scorer.release(key)


def test_sessions_none_and_no_sessions_are_the_uncached_path(scorer):
    p = generate_problems(1, 5)[0]
    gold = p.solution_steps()
    items = [ScoreItem(p.prompt, _history(gold[:k]), gold[k]) for k in range(3)]
    before = scorer.prefix_cache.info()
    assert scorer.score_batch(items, [None] * 3) == scorer.score_batch(items)
    d = _delta(scorer, before)
    assert d["uncached"] == 3 and d["hits"] == d["misses"] == 0
    mixed = scorer.score_batch(items, [None, "mixed", None])
    assert mixed == pytest.approx(scorer.score_batch(items), abs=TOL)
    scorer.release("mixed")
    assert scorer.score_batch([], []) == []
    with pytest.raises(ValueError, match="sessions"):
        scorer.score_batch(items, ["a"])


def test_truncated_long_item_is_scored_uncached_and_not_kept(scorer):
    p = generate_problems(1, 31337)[0]
    gold = p.solution_steps()
    long = ScoreItem(p.prompt, tuple((gold[i % len(gold)], "draft") for i in range(80)), gold[0])
    assert scorer.fit(long) != long  # past the 512 positions: cut
    key = f"long-{id(scorer)}"
    scorer.score_batch([ScoreItem(p.prompt, (), gold[0])], [key])  # the session had a cache
    short = ScoreItem(p.prompt, (), gold[1])
    before = scorer.prefix_cache.info()
    got = scorer.score_batch([long, short], [key, "other-" + key])
    assert got == pytest.approx(scorer.score_batch([long, short]), abs=TOL)
    assert got[0] == pytest.approx(scorer.score_batch([scorer.fit(long)])[0], abs=TOL)
    assert _delta(scorer, before)["truncated"] == 1
    assert key not in scorer.prefix_cache.store  # its prefix changes every step: dropped
    scorer.release("other-" + key)


def test_lru_eviction_under_a_tiny_byte_bound(prm):
    """A bound of 2.5 first-step sessions, four sessions round-robin (one problem, so equal
    sizes): scores stay exact, the bytes stay within the bound, the least recently used
    session goes, so every call is a miss."""
    p = generate_problems(1, 42)[0]
    gold = p.solution_steps()
    prm.score_batch([ScoreItem(p.prompt, (), gold[0])], ["probe"])
    per_session = prm.prefix_cache.store.get("probe").nbytes
    prm.release("probe")
    bound = int(2.5 * per_session)
    small = LMVerifierScorer(MODELS / "prm", threads=1, prefix_cache_bytes=bound)
    for k in range(3):
        for i in range(4):
            item = ScoreItem(p.prompt, _history(gold[:k]), gold[k])
            assert small.score_batch([item], [f"s{i}"]) == pytest.approx(small.score_batch([item]), abs=TOL)
            assert small.prefix_cache.store.bytes <= bound
            assert small.prefix_cache.store.keys()[-1] == f"s{i}"  # the newest is kept
    info = small.prefix_cache.info()
    assert info["evictions"] >= 10 and 1 <= info["sessions"] <= 2
    assert info["hits"] == 0 and info["misses"] == 12
    off = LMVerifierScorer(MODELS / "prm", threads=1, prefix_cache_bytes=0)
    item = ScoreItem(p.prompt, (), gold[0])
    assert off.score_batch([item], ["x"]) == pytest.approx(off.score_batch([item]), abs=TOL)
    assert not off.prefix_cache.enabled and len(off.prefix_cache.store) == 0


@pytest.mark.parametrize("name", ["prm", "router"])
def test_prefix_cache_mb_bounds_the_loaded_scorers_cache(name):
    """The pool's ModelSpec.prefix_cache_mb reaches the backend: MiB to bytes, 0 turns it off."""
    bounded = load_step_scorer(MODELS / name, threads=1, prefix_cache_mb=3)
    assert bounded.prefix_cache.store.max_bytes == 3 * 2**20 and bounded.prefix_cache.enabled
    off = load_step_scorer(MODELS / name, threads=1, prefix_cache_mb=0)
    p = generate_problems(1, 7)[0]
    item = ScoreItem(p.prompt, (), p.solution_steps()[0])
    assert off.score_batch([item], ["s"]) == pytest.approx(bounded.score_batch([item], ["s"]), abs=TOL)
    assert not off.prefix_cache.enabled and off.prefix_cache.info()["sessions"] == 0
    assert bounded.prefix_cache.info()["sessions"] == 1


def test_concurrent_calls_stay_exact(scorer):
    """The pool calls the backend from worker threads: sessions scored at once from two threads."""
    problems = generate_problems(4, 606)
    expected = {i: [scorer.score_batch([ScoreItem(p.prompt, _history(p.solution_steps()[:k]), p.solution_steps()[k])])[0]
                    for k in range(len(p.solution_steps()))] for i, p in enumerate(problems)}

    def run(idx):
        wrong = []
        for i in idx:
            gold = problems[i].solution_steps()
            for k in range(len(gold)):
                got = scorer.score_batch([ScoreItem(problems[i].prompt, _history(gold[:k]), gold[k])],
                                         [f"thread-{i}"])[0]
                if abs(got - expected[i][k]) > TOL:
                    wrong.append((i, k, got, expected[i][k]))
            scorer.release(f"thread-{i}")
        return wrong

    with ThreadPoolExecutor(2) as pool:
        results = [f.result() for f in [pool.submit(run, idx) for idx in ([0, 1], [2, 3])]]
    assert results == [[], []]
