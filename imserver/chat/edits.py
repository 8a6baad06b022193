"""
Editing and hiding messages (docs/protocol.md, "Editing and hiding").

C{edit} replaces the body of one's own message for both users; C{hide} and
C{clear} remove messages from one's own view only (the peer keeps them).
Each is an event of the streams it changes, so devices that were offline
get it by catch-up; connected devices get it pushed, with its seq. Storage
is L{imserver.storage.edits}.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.logger import Logger

from imserver.chat.blocks import BlockService
from imserver.chat.profiles import ProfileCache
from imserver.config import LimitsConfig
from imserver.errors import ErrorCode, ImError
from imserver.services.filter import ContentFilter
from imserver.services.presence import IClientLink, IPresence
from imserver.storage.edits import ClearResult, EditResult, HideResult
from imserver.storage.model import Message, Profile, pack_body
from imserver.storage.store import Store

Result = dict[str, Any]
MessageObject = Callable[[Message, Profile | None], Result]

#: The broadcast telling the other nodes that a user now hides messages.
HIDDEN = "hidden"


class EditService:
    log = Logger()

    def __init__(
        self,
        *,
        store: Store,
        presence: IPresence,
        profiles: ProfileCache,
        blocks: BlockService,
        content: ContentFilter,
        limits: LimitsConfig,
        settled: Callable[[int], Awaitable[None]],
        message_object: MessageObject,
    ) -> None:
        self.store = store
        self.presence = presence
        self.profiles = profiles
        self.blocks = blocks
        self.content = content
        self.limits = limits
        self._settled = settled
        self._message_object = message_object
        presence.on_broadcast(HIDDEN, self._hidden_elsewhere)
        # Read by metrics and tests.
        self.edited = 0
        self.hidden = 0

    def _hidden_elsewhere(self, data: Any) -> None:
        uid = data.get("uid") if isinstance(data, dict) else None
        if isinstance(uid, int):
            self.store.edits.forget(uid)

    async def edit(
        self, uid: int, msg_id: int, body: Any, origin: IClientLink | None = None
    ) -> Result:
        """
        Replace the body of one's own message (within C{edit_seconds}; the
        content filter and body limit as for a send). Pushed to the
        recipient's devices and the editor's other devices once the cached
        copies are forgotten.
        """
        body = self.content.apply(body)
        blob = pack_body(body)
        if len(blob) > self.limits.max_body_bytes:
            raise ImError(
                ErrorCode.TOO_LARGE, f"the body is larger than {self.limits.max_body_bytes} bytes"
            )
        # Its own send's fan-out first (a cached copy of the old body).
        await self._settled(uid)
        found = (await self.store.messages([msg_id])).get(msg_id)
        # An edit is new content: refused between a blocked pair, as a send is.
        if (
            found is not None
            and found.sender == uid
            and await self.blocks.either(uid, found.recipient)
        ):
            raise ImError(ErrorCode.FORBIDDEN, "you cannot message this user")
        sender = (await self.profiles.get([uid])).get(uid)

        def tell(result: EditResult) -> None:
            m = result.message
            frame = self._message_object(m, sender)
            frame["t"] = "edit"
            theirs, mine = dict(frame), frame
            if result.recipient_seq:
                theirs["seq"] = result.recipient_seq
            if result.sender_seq:
                mine["seq"] = result.sender_seq
            self.presence.push(m.recipient, theirs)
            self.presence.push(m.sender, mine, origin)

        result = await self.store.edits.edit(
            uid, msg_id, blob, self.limits.edit_seconds * 1000, tell
        )
        if result.changed:
            self.edited += 1
        reply: Result = {"edited": result.message.edited}
        if result.sender_seq:
            reply["seq"] = result.sender_seq
        return reply

    async def hide(
        self, uid: int, msg_ids: Sequence[int], origin: IClientLink | None = None
    ) -> Result:
        """
        Hide messages of one's conversations from oneself; one's other devices
        are told. A repeat (all hidden already: a retry whose reply was lost)
        answers and tells as the first try did, with the latest hide's seq.
        """
        await self._settled(uid)

        def tell(result: HideResult) -> None:
            push = {"t": "hide", "msg_ids": list(result.msg_ids), "seq": result.seq}
            self.presence.push(uid, push, origin)

        result = await self.store.edits.hide(uid, msg_ids, tell)
        if result.seq is None:
            return {}
        if not result.repeat:
            self.hidden += 1
        # Before the reply (a retry too: the first try's may not have been sent):
        # the user's next read on another node filters.
        self.presence.broadcast(HIDDEN, {"uid": uid})
        return {"seq": result.seq}

    async def clear(self, uid: int, session_id: int, origin: IClientLink | None = None) -> Result:
        """
        Hide a conversation up to its last message from oneself; other devices
        are told. A repeat (nothing committed since the last clear) answers and
        tells as that clear did.
        """
        await self._settled(uid)

        def tell(result: ClearResult) -> None:
            push = {"t": "clear", "session_id": session_id, "up_to": result.up_to}
            push["seq"] = result.seq
            self.presence.push(uid, push, origin)

        result = await self.store.edits.clear(uid, session_id, tell)
        reply: Result = {"up_to": result.up_to}
        if result.seq is None:
            return reply
        if not result.repeat:
            self.hidden += 1
        self.presence.broadcast(HIDDEN, {"uid": uid})
        reply["seq"] = result.seq
        return reply
