"""Token-level speculation in the transformers generator: a row's ``proposal`` (the draft's
step, when the target rewrites it) runs in the prefill, and the row keeps the run of it that
it would generate itself. Every output is compared with the same checkpoint's output without
a proposal, never with something the speculation computed; the counters show it was used."""
from pathlib import Path

import pytest

from arbitrage_common.backends.hf_generator import HFStepGenerator
from arbitrage_common.interfaces import GenerationOptions
from arbitrage_common.steps import as_written, build_prefix
from arbitrage_common.synthetic import generate_problems

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def models():
    """(target that verifies proposals, target that ignores them, draft)."""
    return (HFStepGenerator(MODELS / "target", threads=1), HFStepGenerator(MODELS / "target", threads=1,
                                                                          verify_proposals=False),
            HFStepGenerator(MODELS / "draft", threads=1))


def triples(gens):
    return [(g.text, g.tokens, g.finish_reason) for g in gens]


def proposing(options, gens):
    """Per-row options: ``options`` (one, or one per row) with each generation as the proposal."""
    rows = options if isinstance(options, list) else [options] * len(gens)
    return [GenerationOptions(o.max_new_tokens, o.temperature, o.seed, as_written(g.text, g.finish_reason))
            for o, g in zip(rows, gens)]


def test_as_written():
    assert as_written("x = 3", "delimiter") == "x = 3\n\n"
    assert as_written("x = 3", "length") == as_written("x = 3", "eos") == "x = 3"


def test_draft_proposals_give_the_plain_output_in_trajectories(models):
    """Eight requests, six steps each, with per-session prefix caches: each target step, given
    the draft's step for the same prefix, equals the plain target's step; the cache keeps the
    accepted guesses' keys/values, so the next step's reuse is checked too."""
    target, plain, draft = models
    prefixes = [build_prefix(p.prompt, []) for p in generate_problems(8, 611)]
    sessions = [f"spec-{i}" for i in range(len(prefixes))]
    options = GenerationOptions(max_new_tokens=64)
    before, cache_before = dict(target.speculation), target.prefix_cache.info()
    for _ in range(6):
        want = plain.generate_batch(prefixes, options)
        guesses = draft.generate_batch(prefixes, options)
        got = target.generate_batch(prefixes, proposing(options, guesses), sessions)
        assert triples(got) == triples(want)
        prefixes = [p + as_written(g.text, g.finish_reason) for p, g in zip(prefixes, want)]
    proposed = target.speculation["proposed"] - before["proposed"]
    accepted = target.speculation["accepted"] - before["accepted"]
    assert 0 < accepted < proposed  # some guesses kept, some rejected: both paths ran
    cache = target.prefix_cache.info()
    reused, queried = cache["hits"] - cache_before["hits"], cache["queries"] - cache_before["queries"]
    assert reused > 0.85 * queried  # each step reuses the last one's whole context, accepted guesses too
    for session in sessions:
        assert target.release(session)


def test_sampled_rows_keep_their_own_draws(models):
    """A sampled row with a proposal draws the same tokens as without one, for the draft's
    guess and for a guess that is exactly its own output."""
    target, plain, draft = models
    prefixes = [build_prefix(p.prompt, []) for p in generate_problems(8, 612)]
    options = [GenerationOptions(max_new_tokens=48, temperature=0.9, seed=100 + i) for i in range(8)]
    want = plain.generate_batch(prefixes, options)
    assert len({g.text for g in want}) > 1
    for guesses in (draft.generate_batch(prefixes, GenerationOptions(max_new_tokens=48)), want):
        assert triples(target.generate_batch(prefixes, proposing(options, guesses))) == triples(want)


def test_a_mixed_batch_equals_each_row_alone(models):
    """Rows with and without proposals, right, wrong and partly right ones, and budgets from 1
    token up, in one batch: each row equals the plain target on that row alone."""
    target, plain, _ = models
    prefixes = [build_prefix(p.prompt, []) for p in generate_problems(6, 613)]
    budgets = [1, 2, 5, 64, 64, 64]
    rows = [GenerationOptions(max_new_tokens=b) for b in budgets]
    alone = [plain.generate_batch([p], o)[0] for p, o in zip(prefixes, rows)]
    own = plain.generate_batch(prefixes, GenerationOptions(max_new_tokens=64))
    guesses = [own[0].text + "\n\n", own[1].text + "\n\n", "%%%% wrong", own[3].text + "\n\n",
               own[4].text[:5] + "#" + own[4].text[6:], ""]
    options = [GenerationOptions(o.max_new_tokens, proposal=g) for o, g in zip(rows, guesses)]
    assert triples(target.generate_batch(prefixes, options)) == triples(alone)


def test_a_right_guess_saves_decode_steps_and_a_wrong_one_costs_none(models):
    """The counters: a guess equal to the output is accepted whole (up to the budget); a guess
    that is wrong from its first token is accepted nowhere, and the output is still the plain one."""
    target, plain, _ = models
    prefix = build_prefix(generate_problems(1, 614)[0].prompt, [])
    options = GenerationOptions(max_new_tokens=64)
    (want,) = plain.generate_batch([prefix], options)
    assert want.finish_reason == "delimiter" and want.tokens > 3
    wrong = "~" if want.text[0] != "~" else "!"
    for guess, kept in ((want.text + "\n\n", want.tokens), (wrong * 10, 0)):
        before = dict(target.speculation)
        (got,) = target.generate_batch([prefix], GenerationOptions(64, proposal=guess))
        assert triples([got]) == triples([want])
        assert target.speculation["accepted"] - before["accepted"] == kept
        assert target.speculation["proposed"] - before["proposed"] == len(guess)


def test_the_general_stepper_verifies_too():
    """The transformers fallback (no fast Llama path) keeps the same outputs with proposals."""
    slow = HFStepGenerator(MODELS / "target", threads=1, fast_path=False)
    plain = HFStepGenerator(MODELS / "target", threads=1, verify_proposals=False)
    prefixes = [build_prefix(p.prompt, []) for p in generate_problems(4, 615)]
    options = GenerationOptions(max_new_tokens=40)
    want = plain.generate_batch(prefixes, options)
    guesses = [GenerationOptions(40, proposal=g.text[: len(g.text) // 2] + "?") for g in want]
    assert triples(slow.generate_batch(prefixes, guesses)) == triples(want)
    assert slow.speculation["accepted"] > 0


def test_the_planner_profiles_the_target_on_rewrites(models):
    """``plan profile`` times the target on steps the draft writes differently, each with the
    draft's step as its proposal, as arbitrage and RSD call it."""
    from arbitrage_common.config import default_config
    from arbitrage_common.planning.profile import rewrites

    _, plain, draft = models
    options = GenerationOptions(max_new_tokens=64)
    prefixes, rows = rewrites(default_config(), plain, options, 6, seed=3)
    assert len(prefixes) == len(rows) == 6 and len(set(prefixes)) == 6
    mine, theirs = draft.generate_batch(prefixes, options), plain.generate_batch(prefixes, options)
    assert [r.proposal for r in rows] == [as_written(g.text, g.finish_reason) for g in mine]
    assert all(a.text != b.text for a, b in zip(mine, theirs))
    assert {r.max_new_tokens for r in rows} == {64}
