"""
Mute (issue 11), on both backends: stored on the caller's t_conv row, shown
in convs (C{muted_until}), unmuted by 0 or a past time, refused for
non-members and unknown sessions; the caller's other devices get a C{mute}
push with its seq, and catch-up renders the same event; the webhook skips a
muted conversation's messages.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from zope.interface import implementer

from imserver.config import LimitsConfig, NotifyConfig
from imserver.errors import ErrorCode, ImError
from imserver.gateway.ops import business_ops
from imserver.services.notifier import Notifier
from imserver.services.presence import IClientLink
from imserver.storage.sql.database import Txn
from imserver.wire import frames
from tests.stack import Stack, make_stack
from tests.support import reactor, sleep
from tests.test_queues import SECRET, Sink

BIG = LimitsConfig(send_per_second=1e6, send_burst=10**6, recall_seconds=3600)
_uids = itertools.count(83_000)
HOUR_MS = 3_600_000


@implementer(IClientLink)
class Link:
    """An acting connection: what the caller's own device is (pushes exclude it)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.device_id = 0
        self.connected_at = 0

    def push(self, frame: Any) -> None:
        pass

    def kick(self, reason: str) -> None:
        pass


def _mute_txn(txn: Txn, uid: int, session_id: int) -> int:
    row = txn.query_one(
        "SELECT muteUntil FROM t_conv WHERE uid = ? AND sessionId = ?", (uid, session_id)
    )
    assert row is not None
    return int(row[0])


class MuteContract:
    backend = ""

    async def stack(self, **kw: Any) -> Stack:
        assert isinstance(self, TestCase)
        return await make_stack(self, self.backend, limits=BIG, **kw)

    async def users(self, stack: Stack, n: int) -> list[int]:
        uids = [next(_uids) for _ in range(n)]
        for uid in uids:
            await stack.chat.login(uid)
            stack.presence.online_users.add(uid)
        return uids

    def now_ms(self) -> int:
        return int(reactor.seconds() * 1000)

    async def conv(self, stack: Stack, uid: int) -> dict[str, Any]:
        [conv] = (await stack.chat.convs(uid, 20, None))["convs"]
        return conv

    async def test_mute_is_stored_shown_and_told(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        sid = (await stack.chat.send(a, b, "1", "text", "x"))["session_id"]
        await stack.settle()
        stack.presence.take(a)
        stack.presence.take(b)
        until = self.now_ms() + HOUR_MS
        reply = await stack.chat.mute(b, sid, until, Link("phone"))
        self.assertEqual(reply["muted_until"], until)
        seq = reply["seq"]
        self.assertEqual(
            stack.presence.take(b, "mute"),
            [{"t": "mute", "session_id": sid, "until": until, "seq": seq}],
        )
        [(uid, _, link)] = [e for e in stack.presence.excluded if e[1]["t"] == "mute"]
        self.assertEqual((uid, link.device), (b, "phone"))
        self.assertEqual(stack.presence.take(a), [])  # the peer is not told
        self.assertEqual((await self.conv(stack, b))["muted_until"], until)
        self.assertEqual((await self.conv(stack, a))["muted_until"], 0)
        self.assertEqual(await stack.store.db.run("m", _mute_txn, b, sid), until)
        # The same again: nothing changes, nothing is told.
        self.assertEqual(await stack.chat.mute(b, sid, until), {"muted_until": until})
        self.assertEqual(stack.presence.take(b, "mute"), [])
        # Unmute.
        reply = await stack.chat.mute(b, sid, 0)
        self.assertEqual(reply, {"muted_until": 0, "seq": seq + 1})
        self.assertEqual((await self.conv(stack, b))["muted_until"], 0)
        [push] = stack.presence.take(b, "mute")
        self.assertEqual((push["until"], push["seq"]), (0, seq + 1))
        # Catch-up renders both events, in the stream's order.
        page = await stack.chat.catchup(b, 0, seq - 1, 100)
        mutes = [e for e in page["events"] if e["t"] == "mute"]
        self.assertEqual(
            mutes,
            [
                {"t": "mute", "session_id": sid, "until": until, "seq": seq},
                {"t": "mute", "session_id": sid, "until": 0, "seq": seq + 1},
            ],
        )

    async def test_a_past_time_is_not_muted(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        sid = (await stack.chat.send(a, b, "1", "text", "x"))["session_id"]
        await stack.chat.mute(b, sid, self.now_ms() + HOUR_MS)
        reply = await stack.chat.mute(b, sid, self.now_ms() - 1000)
        self.assertEqual(reply["muted_until"], 0)
        self.assertEqual(await stack.store.db.run("m", _mute_txn, b, sid), 0)
        self.assertEqual((await self.conv(stack, b))["muted_until"], 0)
        # Muted until 1 (1970): the same as not muted, nothing stored.
        self.assertEqual(await stack.chat.mute(b, sid, 1), {"muted_until": 0})

    async def test_an_expired_mute_shows_as_zero(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        sid = (await stack.chat.send(a, b, "1", "text", "x"))["session_id"]
        await stack.chat.mute(b, sid, self.now_ms() + 300)
        self.assertGreater((await self.conv(stack, b))["muted_until"], 0)
        await sleep(0.4)
        self.assertEqual((await self.conv(stack, b))["muted_until"], 0)

    async def test_forbidden_and_not_found(self) -> None:
        stack = await self.stack()
        a, b, c = await self.users(stack, 3)
        sid = (await stack.chat.send(a, b, "1", "text", "x"))["session_id"]
        with self.assertRaises(ImError) as e:
            await stack.chat.mute(c, sid, self.now_ms() + HOUR_MS)
        self.assertEqual(e.exception.code, ErrorCode.FORBIDDEN)
        with self.assertRaises(ImError) as e:
            await stack.chat.mute(a, sid + 987654321, self.now_ms() + HOUR_MS)
        self.assertEqual(e.exception.code, ErrorCode.NOT_FOUND)
        self.assertEqual(stack.presence.take(c, "mute"), [])
        self.assertEqual(await stack.store.db.run("m", _mute_txn, a, sid), 0)

    async def test_blocks_do_not_matter(self) -> None:
        """Muting is one's own setting: allowed with a user one blocks or who blocks one."""
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        sid = (await stack.chat.send(a, b, "1", "text", "x"))["session_id"]
        await stack.chat.blocks.block(a, b)
        until = self.now_ms() + HOUR_MS
        self.assertEqual((await stack.chat.mute(a, sid, until))["muted_until"], until)
        self.assertEqual((await stack.chat.mute(b, sid, until))["muted_until"], until)

    async def test_each_member_mutes_for_itself(self) -> None:
        stack = await self.stack()
        a, b = await self.users(stack, 2)
        sid = (await stack.chat.send(a, b, "1", "text", "x"))["session_id"]
        until = self.now_ms() + HOUR_MS
        await stack.chat.mute(a, sid, until)
        self.assertEqual((await self.conv(stack, a))["muted_until"], until)
        self.assertEqual((await self.conv(stack, b))["muted_until"], 0)


class EmbeddedMuteTests(MuteContract, TestCase):
    backend = "embedded"


class MariaDBMuteTests(MuteContract, TestCase):
    backend = "redis"


class MuteFrameTests(SynchronousTestCase):
    def parse(self, **fields: Any) -> Any:
        return frames.parse_request({"t": "mute", "id": 1, **fields})

    def test_fields(self) -> None:
        r = self.parse(session_id=5, until=0)
        self.assertEqual((r.session_id, r.until), (5, 0))
        for bad in (
            {"until": 1},
            {"session_id": 5},
            {"session_id": 5, "until": -1},
            {"session_id": 5, "until": "soon"},
            {"session_id": 5, "until": True},
            {"session_id": 0, "until": 1},
        ):
            with self.assertRaises(ImError) as e:
                self.parse(**bad)
            self.assertEqual(e.exception.code, ErrorCode.INVALID, bad)

    def test_rate_limited_by_the_social_bucket(self) -> None:
        limits = LimitsConfig(social_per_second=1, social_burst=2)
        calls = []

        class Chat:
            async def mute(self, *args: Any) -> dict[str, Any]:
                calls.append(args)
                return {"muted_until": 0}

        op = business_ops(Chat(), limits)["mute"]  # type: ignore[arg-type]

        class Conn:
            uid = 7
            buckets: dict[str, Any] = {}
            gateway = type("G", (), {"clock": Clock()})()

        conn = Conn()
        request = self.parse(session_id=5, until=0)
        for _ in range(2):
            op.handle(conn, request)  # type: ignore[arg-type]
        with self.assertRaises(ImError) as e:
            op.handle(conn, request)  # type: ignore[arg-type]
        self.assertEqual(e.exception.code, ErrorCode.RATE_LIMITED)
        self.assertEqual(len(calls), 2)


class MutedWebhookContract:
    """The webhook skips a muted conversation (see test_queues.NotifierTests)."""

    backend = ""
    timeout = 60

    async def setUp(self) -> None:
        assert isinstance(self, TestCase)
        self.sink = Sink()
        port = reactor.listenTCP(0, Site(self.sink), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        config = NotifyConfig(
            webhook=f"http://127.0.0.1:{port.getHost().port}/push",
            delay_seconds=0.2,
            max_attempts=3,
            secret=SECRET,
            timeout_seconds=1.0,
        )
        self.stack = await make_stack(self, self.backend, limits=BIG, notify_delay_ms=200)
        self.notifier = Notifier(reactor, self.stack.store, config, self.stack.store.total_unread)
        self.a, self.b, self.c = next(_uids), next(_uids), next(_uids)
        for uid in (self.a, self.b, self.c):
            await self.stack.chat.login(uid)

    async def due(self) -> None:
        await sleep(0.25)
        await self.notifier.poll()

    async def test_muted_conversation_is_not_notified(self) -> None:
        assert isinstance(self, TestCase)
        now = int(reactor.seconds() * 1000)
        first = await self.stack.chat.send(self.a, self.b, "1", "text", "muted")
        other = await self.stack.chat.send(self.c, self.b, "2", "text", "not muted")
        # b muted a's conversation; a muting it on its side changes nothing for b.
        await self.stack.chat.mute(self.b, first["session_id"], now + HOUR_MS)
        await self.stack.chat.mute(self.c, other["session_id"], now + HOUR_MS)
        await self.due()
        self.assertEqual([p["msg_id"] for p, _, _ in self.sink.received], [other["msg_id"]])
        self.assertEqual(self.notifier.skipped, 1)
        self.assertEqual(await self.stack.store.notify_backlog(), 0)
        # Unmuted: the next message is notified again.
        await self.stack.chat.mute(self.b, first["session_id"], 0)
        later = await self.stack.chat.send(self.a, self.b, "3", "text", "after")
        await self.due()
        self.assertEqual(self.sink.received[-1][0]["msg_id"], later["msg_id"])

    async def test_a_mute_that_ended_is_notified(self) -> None:
        assert isinstance(self, TestCase)
        now = int(reactor.seconds() * 1000)
        sent = await self.stack.chat.send(self.a, self.b, "1", "text", "x")
        await self.stack.chat.mute(self.b, sent["session_id"], now + 100)
        await self.due()
        self.assertEqual([p["msg_id"] for p, _, _ in self.sink.received], [sent["msg_id"]])


class EmbeddedMutedWebhookTests(MutedWebhookContract, TestCase):
    backend = "embedded"


class MariaDBMutedWebhookTests(MutedWebhookContract, TestCase):
    backend = "redis"
