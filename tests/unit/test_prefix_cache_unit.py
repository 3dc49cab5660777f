"""Bookkeeping of the scorers' prefix KV cache (no model): the byte-bounded LRU, release
tombstones, the forward-chunking plan, a session's sequence lookup and its byte count."""
import itertools
import random
import threading

import pytest
import torch

from arbitrage_common.backends.prefix_cache import ByteLRU, PrefixState, SessionState
from arbitrage_common.backends.steppers import plan_chunks


def test_lru_evicts_least_recently_used_until_the_bytes_fit():
    lru = ByteLRU(100)
    assert lru.put("a", "A", 40) and lru.put("b", "B", 40)
    assert lru.get("a") == "A"  # a is now the newest
    assert lru.put("c", "C", 40)  # 120 > 100: b (least recently used) goes
    assert lru.keys() == ["a", "c"] and lru.bytes == 80 and lru.evictions == 1
    assert lru.get("b") is None
    assert lru.put("d", "D", 100)  # exactly the bound: everything else goes
    assert lru.keys() == ["d"] and lru.bytes == 100 and lru.evictions == 3


def test_lru_replacing_a_key_recounts_its_bytes():
    lru = ByteLRU(100)
    lru.put("a", 1, 30)
    lru.put("b", 2, 30)
    lru.put("a", 3, 60)  # replaces a's 30 bytes, and a becomes the newest
    assert lru.bytes == 90 and lru.keys() == ["b", "a"] and lru.get("a") == 3 and lru.evictions == 0


def test_lru_does_not_store_a_value_larger_than_the_bound():
    lru = ByteLRU(50)
    lru.put("a", 1, 10)
    lru.put("b", 2, 10)
    assert not lru.put("a", "huge", 51)  # refused, and a's old value is dropped
    assert "a" not in lru and lru.keys() == ["b"] and lru.bytes == 10
    off = ByteLRU(0)
    assert not off.put("x", 1, 1) and len(off) == 0 and off.put("empty", 1, 0)
    with pytest.raises(ValueError):
        ByteLRU(-1)
    with pytest.raises(ValueError):
        lru.put("c", 3, -1)


def test_release_and_discard_free_the_bytes():
    lru = ByteLRU(100)
    lru.put("a", 1, 30)
    lru.put("b", 2, 20)
    assert lru.release("a") and not lru.release("a") and lru.bytes == 20
    assert lru.discard("b") and not lru.discard("b") and lru.bytes == 0 and len(lru) == 0
    lru.put("c", 3, 5)
    lru.clear()
    assert len(lru) == 0 and lru.bytes == 0


def test_a_call_older_than_a_forgotten_tombstone_does_not_put_its_session_back():
    """Past 4096 releases during one call the oldest tombstones go: that call's put is refused
    whatever key it is for (a miss later, never a released session back)."""
    lru = ByteLRU(100)
    before = lru.epoch()
    lru.release("s")
    for i in range(5000):
        lru.release(f"other-{i}")
    assert not lru.put("s", 1, 10, before)
    assert "s" not in lru
    assert lru.put("s", 2, 10, lru.epoch())  # a call that began after every release may


def test_a_call_that_began_before_a_release_does_not_put_the_session_back():
    lru = ByteLRU(100)
    before = lru.epoch()
    lru.put("s", 1, 10, before)
    assert lru.release("s")
    assert not lru.put("s", 2, 10, before)  # in flight when the request ended
    assert "s" not in lru and lru.bytes == 0
    after = lru.epoch()
    assert lru.put("s", 3, 10, after) and lru.get("s") == 3  # a new call (a reused key) may
    assert lru.put("t", 4, 10, before)  # other keys are not affected
    assert lru.put("s", 5, 10)  # no epoch: always


def test_lru_bytes_stay_consistent_under_concurrent_use():
    lru = ByteLRU(1000)

    def work(seed: int):
        rng = random.Random(seed)
        for _ in range(2000):
            key = rng.randrange(40)
            op = rng.random()
            if op < 0.6:
                lru.put(key, key, rng.randrange(1, 120), lru.epoch())
            elif op < 0.8:
                lru.get(key)
            else:
                lru.release(key)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 <= lru.bytes <= 1000
    assert lru.bytes == sum(size for _, size in lru._entries.values())


def _brute_force(widths, max_batch, overhead):
    n, best = len(widths), float("inf")
    for mask in range(2 ** max(n - 1, 0)):
        ends = [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        begins = [0] + ends[:-1]
        if any(e - b > max_batch for b, e in zip(begins, ends)):
            continue
        best = min(best, sum(overhead + (e - b) * widths[e - 1] for b, e in zip(begins, ends)))
    return best


def _cost(widths, ends, overhead):
    return sum(overhead + (e - b) * widths[e - 1] for b, e in zip([0] + ends[:-1], ends))


def test_plan_chunks_is_optimal_and_respects_the_batch_size():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(1, 9)
        widths = sorted(rng.randrange(1, 100) for _ in range(n))
        max_batch, overhead = rng.randrange(1, 6), rng.choice([0, 10, 48, 500])
        ends = plan_chunks(widths, max_batch, overhead)
        assert ends[-1] == n and ends == sorted(set(ends))
        sizes = [e - b for b, e in zip([0] + ends[:-1], ends)]
        assert all(1 <= s <= max_batch for s in sizes)
        assert _cost(widths, ends, overhead) == _brute_force(widths, max_batch, overhead)


def test_plan_chunks_cases():
    assert plan_chunks([], 4) == []
    assert plan_chunks([24] * 13 + [44] * 3, 32, 48) == [13, 16]  # padding 13 rows to 44 costs more than a forward
    assert plan_chunks([24] * 13 + [25] * 3, 32, 48) == [16]
    ends = plan_chunks([5] * 10, 4, 1)  # equal widths: the fewest forwards that hold 4 rows each
    assert len(ends) == 3 and ends[-1] == 10 and all(e - b <= 4 for b, e in zip([0] + ends[:-1], ends))
    with pytest.raises(ValueError):
        plan_chunks([3, 2], 4)


def _state(ids, tokens=None, extra_logits=0):
    t = len(ids) if tokens is None else tokens
    return PrefixState(tuple(ids), (torch.zeros(2, 2, 1, t, 4),), torch.zeros(10 + extra_logits))


def test_session_lookup_takes_the_longest_cached_prefix_that_ends_before_the_candidate():
    prefix, branch, other = _state([1, 5, 6]), _state([1, 5, 6, 7, 8]), _state([1, 9])
    session = SessionState((prefix, branch, other))
    ids = [1, 5, 6, 7, 8, 3, 3, 4]
    assert session.lookup(ids, limit=7) is branch
    assert session.lookup(ids, limit=4) is prefix  # the branch would reach into the candidate
    assert session.lookup([1, 5, 6, 7, 2, 3], limit=6) is prefix  # the branch diverges at its 5th token
    assert session.lookup([1, 5, 6], limit=3) is None  # nothing left to run
    assert session.lookup([2, 5, 6, 7], limit=4) is None  # another text
    assert session.lookup([1, 9, 9], limit=3) is other


def test_session_bytes_count_shared_storage_once():
    seg = torch.zeros(2, 2, 1, 6, 4)  # 96 floats
    whole = PrefixState((1,) * 6, (seg,), torch.zeros(10))
    prefix = PrefixState((1,) * 4, (seg[:, :, :, :4],), torch.zeros(10))  # a view of the same storage
    session = SessionState((prefix, whole))
    assert session.nbytes == 96 * 4 + 2 * 10 * 4 + 8 * (4 + 6)
    assert SessionState((whole,)).nbytes == 96 * 4 + 10 * 4 + 8 * 6


def test_brute_force_helper_agrees_with_itself():  # the oracle above enumerates every cut
    widths = [1, 2, 3]
    costs = [_cost(widths, list(ends) + [3], 1) for r in range(3) for ends in itertools.combinations([1, 2], r)]
    assert _brute_force(widths, 3, 1) == min(costs)
