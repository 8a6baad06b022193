"""The frames and ops of edit, hide and clear (issue 11): what is accepted, what is refused."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from imserver.config import LimitsConfig
from imserver.errors import ErrorCode, ImError
from imserver.gateway.ops import business_ops
from imserver.wire import frames
from tests.test_gateway import GatewayTestsMixin


def parse(**fields: Any) -> frames.Request:
    return frames.parse_request({"id": 1, **fields})


class EditFrameTests(SynchronousTestCase):
    def refused(self, code: ErrorCode, **fields: Any) -> None:
        e = self.assertRaises(ImError, parse, **fields)
        self.assertEqual(e.code, code, fields)

    def test_edit(self) -> None:
        r = parse(t="edit", msg_id=5, body={"text": "x", "n": [1, 2]})
        self.assertEqual(r, frames.Edit(id=1, msg_id=5, body={"text": "x", "n": [1, 2]}))
        self.assertEqual(parse(t="edit", msg_id=5, body="x"), frames.Edit(1, 5, "x"))
        self.refused(ErrorCode.INVALID, t="edit", msg_id=5)
        self.refused(ErrorCode.INVALID, t="edit", body="x")
        self.refused(ErrorCode.INVALID, t="edit", msg_id=0, body="x")
        self.refused(ErrorCode.INVALID, t="edit", msg_id="5", body="x")
        self.refused(ErrorCode.INVALID, t="edit", msg_id=5, body=7)
        self.refused(ErrorCode.INVALID, t="edit", msg_id=5, body=["x"])
        self.refused(ErrorCode.INVALID, t="edit", msg_id=5, body={"k": b"binary"})

    def test_hide(self) -> None:
        self.assertEqual(parse(t="hide", msg_ids=[3, 1]), frames.Hide(1, (3, 1)))
        self.assertEqual(len(parse(t="hide", msg_ids=list(range(1, 101))).msg_ids), 100)  # type: ignore[attr-defined]
        self.refused(ErrorCode.TOO_LARGE, t="hide", msg_ids=list(range(1, 102)))
        self.refused(ErrorCode.INVALID, t="hide", msg_ids=[])
        self.refused(ErrorCode.INVALID, t="hide")
        self.refused(ErrorCode.INVALID, t="hide", msg_ids=[1, 0])
        self.refused(ErrorCode.INVALID, t="hide", msg_ids=5)

    def test_clear(self) -> None:
        self.assertEqual(parse(t="clear", session_id=9), frames.Clear(1, 9))
        self.refused(ErrorCode.INVALID, t="clear")
        self.refused(ErrorCode.INVALID, t="clear", session_id=-1)
        self.refused(ErrorCode.INVALID, t="clear", session_id=True)


@attrs.define
class FakeEdits:
    calls: list[tuple[Any, ...]] = attrs.Factory(list)

    async def edit(self, uid: int, msg_id: int, body: Any, origin: Any) -> dict[str, Any]:
        self.calls.append(("edit", uid, msg_id, body))
        return {"edited": 7}

    async def hide(self, uid: int, msg_ids: Any, origin: Any) -> dict[str, Any]:
        self.calls.append(("hide", uid, tuple(msg_ids)))
        return {}

    async def clear(self, uid: int, session_id: int, origin: Any) -> dict[str, Any]:
        self.calls.append(("clear", uid, session_id))
        return {"up_to": 0}


@attrs.define
class FakeChat:
    edits: FakeEdits = attrs.Factory(FakeEdits)


class EditOpsTests(GatewayTestsMixin, SynchronousTestCase):
    def test_ops_reach_the_service_and_share_the_social_bucket(self) -> None:
        chat = FakeChat()
        limits = LimitsConfig(social_per_second=1, social_burst=3)
        ops = business_ops(chat, limits)  # type: ignore[arg-type]
        self.gateway = self.make_gateway(**{k: ops[k] for k in ("edit", "hide", "clear")})
        client = self.authed(42)
        client.send({"t": "edit", "id": 2, "msg_id": 5, "body": "x"})
        client.send({"t": "hide", "id": 3, "msg_ids": [5]})
        client.send({"t": "clear", "id": 4, "session_id": 9})
        client.send({"t": "hide", "id": 5, "msg_ids": [6]})
        replies = client.received()
        self.assertEqual([r["t"] for r in replies], ["ok", "ok", "ok", "error"])
        self.assertEqual(replies[0]["edited"], 7)
        self.assertEqual(replies[3]["code"], "rate_limited")
        self.assertEqual(
            chat.edits.calls, [("edit", 42, 5, "x"), ("hide", 42, (5,)), ("clear", 42, 9)]
        )
        self.clock.advance(1)
        client.send({"t": "hide", "id": 6, "msg_ids": [6]})
        self.assertEqual([r["t"] for r in client.received()], ["ok"])
