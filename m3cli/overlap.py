"""The paper's reference-overlap measure (Memory3, Eq. 6), shared by search, generation and
training so that all three filter references the same way.

overlap(r, t) = max over spans s of t with |s| <= 2|r| of LCS(r, s) / |r|

where LCS is the longest common subsequence. A reference that overlaps a query or training
text by more than a threshold (2/3 at evaluation, 0.9 in training) is dropped: it would leak
the answer rather than supply knowledge. Works on any sequences of hashable items (token
ids, or words via `words()`). Knows nothing about models or banks.
"""

from __future__ import annotations

import re
from typing import Hashable, Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens: the unit of overlap when no tokenizer is at hand."""
    return _WORD.findall(text.lower())


def _masks(a: Sequence[Hashable]) -> dict:
    masks: dict = {}
    for i, item in enumerate(a):
        masks[item] = masks.get(item, 0) | (1 << i)
    return masks


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, bit-parallel over `a` (Allison–Dix):
    O(len(b)) big-integer operations on len(a)-bit integers."""
    if not a or not b:
        return 0
    return _lcs(_masks(a), len(a), b)


def _lcs(masks: dict, m: int, b: Sequence[Hashable]) -> int:
    full = (1 << m) - 1
    v = full
    for item in b:
        u = v & masks.get(item, 0)
        v = ((v + u) | (v - u)) & full
    return m - bin(v).count("1")


def overlap(reference: Sequence[Hashable], text: Sequence[Hashable]) -> float:
    """Eq. 6: the share of the reference found, in order, inside a span of the text no longer
    than twice the reference. 0.0 for an empty reference or text."""
    m = len(reference)
    if m == 0 or not text:
        return 0.0
    masks = _masks(reference)
    span = 2 * m
    if len(text) <= span:
        return _lcs(masks, m, text) / m
    present = set(masks)
    best = 0
    # an optimal span can be shrunk to start on a matched item and then extended to 2|r|
    # (or to the end of the text) without losing any match: only those spans are tried
    for start in range(len(text)):
        if text[start] not in present:
            continue
        best = max(best, _lcs(masks, m, text[start : start + span]))
        if best == m:
            break
    return best / m


def keep(reference: Sequence[Hashable], text: Sequence[Hashable], max_overlap: float) -> bool:
    """True when the reference may be used with this text (overlap <= max_overlap)."""
    return overlap(reference, text) <= max_overlap
