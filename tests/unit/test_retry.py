import random

from arbitrage_common.retry import MIN_ATTEMPT_S, RetryPolicy


def test_backoff_is_full_jitter_below_the_doubling_cap():
    policy = RetryPolicy(retries=10, base_s=0.1, cap_s=0.5)
    rng = random.Random(0)
    for attempt, bound in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.5), (8, 0.5)]:
        delays = [policy.backoff_s(attempt, rng) for _ in range(200)]
        assert 0.0 <= min(delays) and max(delays) <= bound
        assert max(delays) > 0.8 * bound  # jitter spans the interval, not a fixed value


def test_no_retry_after_the_last_attempt():
    policy = RetryPolicy(retries=2)
    rng = random.Random(1)
    assert policy.next_delay(0, None, rng) is not None
    assert policy.next_delay(1, None, rng) is not None
    assert policy.next_delay(2, None, rng) is None


def test_no_retry_that_cannot_finish_before_the_deadline():
    policy = RetryPolicy(retries=5, base_s=0.01)
    rng = random.Random(2)
    assert policy.next_delay(0, MIN_ATTEMPT_S / 2, rng) is None
    assert policy.next_delay(0, 10.0, rng) is not None
