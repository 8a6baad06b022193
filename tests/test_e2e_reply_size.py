"""
End-to-end (defect 7c): C{twistd -n imserver} with a small C{max_frame_bytes}
never sends a larger frame, pages sync and history by size, and refuses a
body that could not be delivered. The client's decoder uses the same limit,
so one oversized frame would break the connection and fail the test.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.trial.unittest import TestCase

from imserver.chat.service import ITEM_RESERVE, REPLY_RESERVE
from imserver.client import IMClientProtocol, RequestFailed
from imserver.wire.framing import FrameDecoder
from tests.harness import ServerProcess
from tests.support import ClientsMixin, within

FRAME = 16384
_uids = itertools.count(70_000)


class ReplySizeEndToEndTests(ClientsMixin, TestCase):
    async def login(self, server: ServerProcess, uid: int) -> IMClientProtocol:
        proto = await self.client(server.endpoint)
        proto._decoder = FrameDecoder(FRAME)  # as strict as the server
        await within(proto.auth(server.token(uid)))
        return proto

    async def test_small_frames(self) -> None:
        server = ServerProcess({"server": {"max_frame_bytes": FRAME}})
        self.addCleanup(server.cleanup)
        server.start()
        a_uid, b_uid = next(_uids), next(_uids)
        a = await self.login(server, a_uid)
        b = await self.login(server, b_uid)
        limit = FRAME - REPLY_RESERVE - ITEM_RESERVE
        # The send limit is lowered to what a reply can carry.
        with self.assertRaises(RequestFailed) as e:
            await within(a.request("send", to=b_uid, cid="big", body="q" * limit))
        self.assertEqual(e.exception.code, "too_large")
        sent = []
        for i in range(6):
            body = f"{i}".ljust(limit - 8 if i % 2 else 100, "w")
            reply: Any = await within(a.request("send", to=b_uid, cid=f"c{i}", body=body))
            sent.append(reply["msg_id"])
        synced: list[int] = []
        after = 0
        while True:
            page: Any = await within(b.request("sync", limit=100, after=after))
            synced += [m["msg_id"] for m in page["msgs"]]
            after = synced[-1]
            if not page["more"]:
                break
        self.assertEqual(synced, sent)
        history: list[int] = []
        before = None
        while True:
            fields = {"peer": a_uid, "limit": 100}
            if before is not None:
                fields["before"] = before
            page = await within(b.request("history", **fields))
            history += [m["msg_id"] for m in page["msgs"]]
            before = history[-1]
            if not page["more"]:
                break
        self.assertEqual(history, sent[::-1])
        self.assertTrue(b.is_open)
