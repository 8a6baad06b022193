"""
Time-ordered message and session ids.

Layout (53 bits, so every id is exact as a double: a Redis sorted-set score,
a Redis Lua number, a JSON number in JavaScript):

    | 40 bits: ms since 2025-01-01 UTC | 10 bits: node_id | 3 bits: sequence |

* Unique across nodes as long as node ids are (see docs/scaling.md).
* Strictly increasing per node, even if the wall clock steps back: the
  generator keeps a logical clock that never goes below the last id's time.
* 8 ids per millisecond per node. A burst beyond that borrows from the next
  millisecond (the logical clock runs ahead of the wall clock and falls back
  in step once the burst is over), so ids stay unique and increasing at any
  rate; they are then a few ms "in the future".
* 40 bits of milliseconds last until 2059.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
NODE_BITS = 10
SEQ_BITS = 3
TIME_BITS = 40
MAX_NODE = (1 << NODE_BITS) - 1
MAX_SEQ = (1 << SEQ_BITS) - 1
TIME_SHIFT = NODE_BITS + SEQ_BITS
MAX_ID = (1 << (TIME_BITS + TIME_SHIFT)) - 1


class IdGenerator:
    """
    @param clock: the injected clock; C{clock.seconds()} is wall time.
    """

    __slots__ = ("_clock", "_last_ms", "_node", "_seq")

    def __init__(self, node_id: int, clock: IReactorTime) -> None:
        if not 0 <= node_id <= MAX_NODE:
            raise ValueError(f"node_id must be in 0..{MAX_NODE}")
        self._node = node_id << SEQ_BITS
        self._clock = clock
        self._last_ms = -1
        self._seq = 0

    def next_id(self) -> int:
        now = int(self._clock.seconds() * 1000) - EPOCH_MS
        if now > self._last_ms:
            self._last_ms = now
            self._seq = 0
        elif self._seq < MAX_SEQ:
            self._seq += 1
        else:
            # This millisecond is used up (or the clock stepped back):
            # continue on the logical clock.
            self._last_ms += 1
            self._seq = 0
        if self._last_ms < 0 or self._last_ms >> TIME_BITS:
            raise OverflowError("the clock is outside the id epoch (2025..2059)")
        return (self._last_ms << TIME_SHIFT) | self._node | self._seq


def id_time_ms(any_id: int) -> int:
    """The time (ms since the Unix epoch) an id was made at."""
    return (any_id >> TIME_SHIFT) + EPOCH_MS


def id_node(any_id: int) -> int:
    return (any_id >> SEQ_BITS) & MAX_NODE
