"""The frames of edit, hide and clear (issue 11): what is accepted and what is refused."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from imserver.errors import ErrorCode, ImError
from imserver.wire import frames


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
