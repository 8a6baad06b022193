"""
What a L{imserver.client.Client} knows of the user's stream
(docs/protocol.md, "The stream: seq"): the highest contiguous seq, the seqs
had beyond a gap, and the ids seen lately, to drop what comes twice.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

DEDUPE_SIZE = 10_000


class LRU:
    """The last C{size} keys seen, with a value each (for edits: the version)."""

    def __init__(self, size: int = DEDUPE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, default: Any = None) -> Any:
        return self._items.get(key, default)

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def put(self, key: Any, value: Any = True) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


class Position:
    """
    The highest contiguous seq (C{seq}) and the seqs had beyond it
    (C{ahead}: a gap is open while it is not empty). Live pushes come out of
    order, so only the contiguous seq may be acked or stored.
    """

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq
        self.ahead: set[int] = set()

    @property
    def gap(self) -> bool:
        return bool(self.ahead)

    def note(self, seq: int) -> bool:
        """Record one seq; False if it was had already."""
        if seq <= self.seq or seq in self.ahead:
            return False
        self.ahead.add(seq)
        self.advance_to(self.seq)
        return True

    def advance_to(self, seq: int) -> None:
        """Everything up to C{seq} is had (a catch-up page's seq steps over own sends)."""
        if seq > self.seq:
            self.seq = seq
            self.ahead = {s for s in self.ahead if s > seq}
        while self.seq + 1 in self.ahead:
            self.seq += 1
            self.ahead.discard(self.seq)

    def reset(self, seq: int) -> None:
        """Start again at C{seq} (the server forgot this device)."""
        self.seq = seq
        self.ahead = set()
