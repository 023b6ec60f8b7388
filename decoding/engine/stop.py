"""Stop strings over streamed text.

The engine detokenizes one generated token at a time and feeds each token's text delta to a
`StopStringMatcher`. The matcher holds back any tail that could still grow into a stop string,
so a stop string spread over several tokens is caught and none of it reaches the client. When
`feed` reports `stopped`, the token just fed is the last one the request counts: its text
completed the stop string, and every later token is discarded (usage included).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Truncates a text stream at the first stop string.

    "First" is the occurrence that completes earliest in the stream (ties: the one starting
    earliest), so the result does not depend on how the text was split into deltas. The stop
    string itself is never emitted.
    """

    __slots__ = ("_stops", "_held", "_stopped", "_matched", "_max_hold")

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):  # a bare string would otherwise become one stop per character
            stops = [stops]
        stops = list(dict.fromkeys(stops))
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._stops: tuple[str, ...] = tuple(stops)
        self._max_hold = max((len(s) for s in stops), default=1) - 1
        self._held = ""  # text not yet emitted: a suffix that may be the start of a stop string
        self._stopped = False
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def matched(self) -> str | None:
        return self._matched

    @property
    def held_text(self) -> str:
        """Text received but not yet emitted (for debugging; `flush` releases it)."""
        return self._held

    def feed(self, text: str) -> tuple[str, bool, str | None]:
        """Add one delta; return (text safe to emit now, stopped, the stop string that matched).

        After a stop every further call returns ("", True, matched).
        """
        if self._stopped:
            return "", True, self._matched
        if not self._stops:
            return text, False, None
        buf = self._held + text
        # Earliest-completing occurrence. The held part contains no whole stop string, and (being the
        # longest suffix that prefixes a stop) any match starts inside it or later, never in emitted text.
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0:
                key = (start + len(stop), start, stop)
                if best is None or key[:2] < best[:2]:
                    best = key
        if best is not None:
            _, start, stop = best
            self._stopped, self._matched, self._held = True, stop, ""
            return buf[:start], True, stop
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False, None

    def flush(self) -> str:
        """End of generation without a stop: release the held-back text."""
        if self._stopped:
            return ""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        for k in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
