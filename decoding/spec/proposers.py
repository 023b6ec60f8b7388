"""Head-free drafting: prompt lookup (n-gram match over prompt + output so far)."""

from __future__ import annotations


def ngram_propose(token_ids: list[int], n_max: int, n_min: int, draft_len: int,
                  window: int = 4096) -> list[int]:
    """Find the latest earlier occurrence of the last n tokens (longest n first) and
    propose the tokens that followed it. Empty when nothing matches."""
    ids = token_ids[-window:]
    L = len(ids)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        tail = ids[L - n:]
        # Scan backwards so the most recent match wins (recent context repeats most).
        for start in range(L - n - 1, -1, -1):
            if ids[start:start + n] == tail:
                follow = ids[start + n:start + n + draft_len]
                if follow:
                    return follow
    return []
