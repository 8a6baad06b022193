"""Reconnect and retry delays: exponential backoff with full jitter."""

from __future__ import annotations

from typing import Protocol


class RandomSource(Protocol):
    """What the client draws jitter and ids from (C{random.Random} fits)."""

    def random(self) -> float: ...


class Backoff:
    """
    Full jitter (a delay uniform in C{[0, min(maximum, base * 2**attempt)]}):
    many clients dropped at once by a restart spread their reconnects
    instead of arriving together.
    """

    def __init__(self, base: float, maximum: float, rng: RandomSource) -> None:
        self.base = base
        self.maximum = maximum
        self._rng = rng

    def ceiling(self, attempt: int) -> float:
        # 2**attempt overflows floats around 1024; the cap is reached long before.
        return min(self.maximum, self.base * 2 ** min(attempt, 64))

    def delay(self, attempt: int) -> float:
        return self._rng.random() * self.ceiling(attempt)

    def half_jitter(self, attempt: int) -> float:
        """A delay uniform in C{[ceiling / 2, ceiling]}: spread, yet never (almost) at once."""
        ceiling = self.ceiling(attempt)
        return ceiling / 2 + self._rng.random() * ceiling / 2
