"""
Blocking (docs/protocol.md, "Blocking"): who refuses whom.

A stub until issue 11's blocks land: nobody blocks anybody. The interface
is what the other features (send, presence, typing) rely on.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from imserver.services.presence import IPresence
from imserver.storage.store import Store

#: Told (blocker, blocked, now_blocked) of every change, on this node or another.
BlockListener = Callable[[int, int, bool], None]


class BlockService:
    def __init__(
        self, *, store: Store, presence: IPresence, clock: IReactorTime, max_blocks: int
    ) -> None:
        self.store = store
        self.presence = presence
        self.clock = clock
        self.max_blocks = max_blocks
        self._listeners: list[BlockListener] = []

    async def either(self, a: int, b: int) -> bool:
        """Whether C{a} blocks C{b} or C{b} blocks C{a} (loads what it needs)."""
        return False

    def either_now(self, a: int, b: int) -> bool | None:
        """As L{either}, from this node's cache only; None when not known here."""
        return False

    def on_change(self, listener: BlockListener) -> None:
        """Call C{listener} on every block or unblock, here or on another node."""
        self._listeners.append(listener)
