"""The Eq. 6 overlap filter against a brute-force definition."""

import random
from functools import lru_cache

from m3cli.overlap import keep, lcs_length, overlap, words


def lcs_dp(a, b):
    @lru_cache(maxsize=None)
    def f(i, j):
        if i == len(a) or j == len(b):
            return 0
        if a[i] == b[j]:
            return 1 + f(i + 1, j + 1)
        return max(f(i + 1, j), f(i, j + 1))

    return f(0, 0)


def overlap_brute(r, t):
    """Straight from the definition: every span of t of length <= 2|r|."""
    if not r or not t:
        return 0.0
    best = 0
    for s in range(len(t)):
        for e in range(s + 1, min(len(t), s + 2 * len(r)) + 1):
            best = max(best, lcs_dp(tuple(r), tuple(t[s:e])))
    return best / len(r)


def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(5) for _ in range(rng.randrange(0, 12))]
        b = [rng.randrange(5) for _ in range(rng.randrange(0, 12))]
        assert lcs_length(a, b) == lcs_dp(tuple(a), tuple(b))


def test_overlap_matches_the_definition():
    rng = random.Random(1)
    for _ in range(200):
        r = [rng.randrange(4) for _ in range(rng.randrange(1, 6))]
        t = [rng.randrange(4) for _ in range(rng.randrange(0, 20))]
        assert abs(overlap(r, t) - overlap_brute(r, t)) < 1e-12, (r, t)


def test_span_limit_and_filter():
    r = words("paris is the capital of france")
    assert overlap(r, words("Paris is the capital of France.")) == 1.0
    # the same words spread over a span longer than 2|r| do not count as a full match
    spread = " ".join(w + " x x" for w in r)
    assert overlap(r, words(spread)) < 1.0
    assert overlap(r, words("berlin hosts the parliament of germany")) == 2 / 6
    assert keep(r, words("where is berlin"), 0.67) and not keep(r, words("paris is the capital of france"), 0.9)
    assert overlap([], [1, 2]) == 0.0 and overlap([1], []) == 0.0
