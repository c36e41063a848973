"""Session caps of fastknockd: at most ``max_sessions`` in all, ``max_per_source`` per source.

A source is ``peer.source_of(key)``: an IPv4 address or an IPv6 /56. Past a cap the *newest*
would-be session is refused, never an established one. The counts are plain dicts of
bytes -> int, so their size is bounded by the number of live sessions.
"""

from __future__ import annotations


class Limits:
    """Counts live sessions in all and per source; refuses past either cap."""

    def __init__(self, max_sessions: int, max_per_source: int) -> None:
        self.max_sessions = max_sessions
        self.max_per_source = max_per_source
        self.total = 0
        self._per_source: dict[bytes, int] = {}

    def acquire(self, source: bytes) -> bool:
        n = self._per_source.get(source, 0)
        if self.total >= self.max_sessions or n >= self.max_per_source:
            return False
        self._per_source[source] = n + 1
        self.total += 1
        return True

    def release(self, source: bytes) -> None:
        n = self._per_source.get(source, 0) - 1
        if n > 0:
            self._per_source[source] = n
        else:
            self._per_source.pop(source, None)
        self.total -= 1

    @property
    def sources(self) -> int:
        return len(self._per_source)


__all__ = ["Limits"]
