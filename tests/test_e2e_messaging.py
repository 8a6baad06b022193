"""
End-to-end: every messaging op, push and error code of wire protocol v1
(docs/protocol.md, "Messaging"), spoken over real TCP to C{twistd -n imserver}
subprocesses, on both backends: the embedded default (SQLite + in-process hot
store) and MariaDB + Redis (throwaway instances from L{tests.harness}).

L{MessagingTestsMixin} holds the tests (L{MessagingHelpers} their tools);
each backend class starts one shared server lazily and reuses it (every test
uses fresh uids, so tests never see each other's data). Tests that need a
special configuration (content filter, rate limit, recall window, a broken or
stopped database) start their own server.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import msgpack
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from imserver.client import IMClientProtocol, RequestFailed
from tests.harness import (
    MariaDBServer,
    ServerProcess,
    fresh_prefix,
    shared_mariadb,
    shared_redis,
)
from tests.support import ClientsMixin, sleep, within

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

Frame = dict[str, Any]
Sections = dict[str, dict[str, Any]]

# Fresh uids and cids for every test: tests on a shared server never meet.
_uids = itertools.count(10_000)
_cids = itertools.count(1)

MAX_BODY_BYTES = 32768
JS_SAFE = 2**53
# No message or session has this id: ids are time-ordered from 2025 on.
UNKNOWN_ID = 1


#: Additive fields of convs entries (all three) and history replies (the first two).
RECEIPT_FIELDS = ("peer_read", "peer_delivered", "muted_until")


def new_cid() -> str:
    return f"cid-{next(_cids)}"


@attrs.frozen
class Sent:
    """A message sent and acknowledged by the server, with what was sent."""

    reply: Frame
    sender: int
    to: int
    cid: str
    body: Any
    type: str = "text"
    #: The sender's stream seq of the message (devices).
    seq: int = 0

    @property
    def msg_id(self) -> int:
        return int(self.reply["msg_id"])

    @property
    def session_id(self) -> int:
        return int(self.reply["session_id"])

    @property
    def ts(self) -> int:
        return int(self.reply["ts"])

    def obj(self, nickname: str = "", avatar: str = "", body: Any = None) -> Frame:
        """The msg object the protocol defines for this message."""
        return {
            "msg_id": self.msg_id,
            "session_id": self.session_id,
            "from": self.sender,
            "to": self.to,
            "cid": self.cid,
            "type": self.type,
            "body": self.body if body is None else body,
            "ts": self.ts,
            "sender": {"nickname": nickname, "avatar": avatar},
        }

    def push(self, unread: int, total_unread: int, **profile: Any) -> Frame:
        """The C{msg} push the recipient gets for it."""
        return {"t": "msg", **self.obj(**profile), "unread": unread, "total_unread": total_unread}


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


class MessagingHelpers(ClientsMixin, _Base):
    """Log in, send, and check replies and pushes (for these tests and the cluster's)."""

    # One server per concrete class, started on first use (trial has no
    # setUpClass); the harness kills it at exit.
    _server: ServerProcess | None = None

    def backend(self) -> Sections:
        """Config sections selecting this class's backend, fresh for a new server."""
        raise NotImplementedError

    def break_sql(self, server: ServerProcess) -> None:
        """Make the server's SQL fail in a way that is not "unavailable"."""
        raise NotImplementedError

    @property
    def server(self) -> ServerProcess:
        cls = type(self)
        if cls._server is None or not cls._server.running:
            cls._server = ServerProcess(self.backend()).start()
        return cls._server

    def start_server(self, **sections: Mapping[str, Any]) -> ServerProcess:
        """A private server on this class's backend, with extra config."""
        config = self.backend()
        for name, table in sections.items():
            config.setdefault(name, {}).update(table)
        server = ServerProcess(config)
        self.addCleanup(server.cleanup)
        return server.start()

    # -- helpers -------------------------------------------------------------

    async def login(
        self, uid: int | None = None, server: ServerProcess | None = None
    ) -> IMClientProtocol:
        """Connect and authenticate (a fresh uid unless one is given)."""
        server = server or self.server
        uid = next(_uids) if uid is None else uid
        client = await self.client(server.endpoint, server.token(uid))
        self.assertEqual(client.uid, uid)
        return client

    async def offline_user(self, server: ServerProcess | None = None) -> int:
        """A user that has authenticated once and is now disconnected."""
        client = await self.login(server=server)
        await within(client.close())
        assert client.uid is not None
        return client.uid

    async def ok(self, client: IMClientProtocol, op: str, **fields: Any) -> Frame:
        reply = dict(await within(client.request(op, **fields)))
        self.assertEqual(reply["t"], "ok")
        return reply

    async def result(self, client: IMClientProtocol, op: str, **fields: Any) -> Frame:
        """The ok reply without its envelope (C{t}, C{id})."""
        reply = await self.ok(client, op, **fields)
        del reply["t"], reply["id"]
        if op in ("read", "recall") and "seq" in reply:
            # The caller's stream seq of the event (devices: their own tests check it).
            self.assertIsInstance(reply.pop("seq"), int)
        # Receipts and mute (issue 11, additive): tests/test_e2e_receipts.py checks them.
        if op == "history":
            for key in RECEIPT_FIELDS[:2]:
                self.assertIsInstance(reply.pop(key), int)
        if op == "convs":
            for conv in reply["convs"]:
                for key in RECEIPT_FIELDS:
                    self.assertIsInstance(conv.pop(key), int)
        return reply

    async def fails(
        self, client: IMClientProtocol, code: str, op: str, timeout: float = 10, **fields: Any
    ) -> RequestFailed:
        """Expect an error reply with C{code}; the connection must stay open."""
        try:
            reply = await within(client.request(op, **fields), timeout)
        except RequestFailed as e:
            self.assertEqual(e.code, code, f"{op} {short(fields)}: {e}")
            self.assertEqual(e.frame["t"], "error")
            self.assertIsInstance(e.frame.get("message"), str)
            await within(client.request("ping"))
            return e
        self.fail(f"{op} {short(fields)}: expected {code}, got {short(reply)}")

    async def send(
        self,
        client: IMClientProtocol,
        to: IMClientProtocol | int,
        body: Any = "hello",
        cid: str | None = None,
        type: str | None = None,
    ) -> Sent:
        assert client.uid is not None
        recipient = to if isinstance(to, int) else to.uid
        assert recipient is not None
        cid = new_cid() if cid is None else cid
        fields: Frame = {"to": recipient, "cid": cid, "body": body}
        if type is not None:
            fields["type"] = type
        reply = await self.ok(client, "send", **fields)
        # seq: the sender's stream position of the message (devices, additive).
        self.assertEqual(set(reply), {"t", "id", "msg_id", "session_id", "ts", "dup", "seq"})
        seq = reply.pop("seq")
        self.assertIsInstance(seq, int)
        self.assertIs(reply["dup"], False)
        return Sent(reply, client.uid, recipient, cid, body, type or "text", seq)

    async def push(self, client: IMClientProtocol) -> Frame:
        """The next push, without its stream seq (devices: checked by their own tests),
        past delivery receipts (issue 11: tests/test_e2e_receipts.py checks them)."""
        push = dict(await within(client.next_push()))
        while push.get("t") == "delivered":
            push = dict(await within(client.next_push()))
        if push.get("t") in ("msg", "read", "recall") and "seq" in push:
            self.assertIsInstance(push.pop("seq"), int)
        return push

    async def sync(self, client: IMClientProtocol, **fields: Any) -> Frame:
        return await self.result(client, "sync", **fields)

    async def history(self, client: IMClientProtocol, **fields: Any) -> Frame:
        return await self.result(client, "history", **fields)


class MessagingTestsMixin(MessagingHelpers):
    """The messaging contract; subclasses say which backend to run it on."""

    # -- send, the msg object and the msg push ---------------------------------

    async def test_send_reply_push_and_msg_object(self) -> None:
        alice = await self.login()
        await self.ok(alice, "set_profile", nickname="alice", avatar="https://img/a.png")
        bob = await self.login()
        carol = await self.login()
        profile = {"nickname": "alice", "avatar": "https://img/a.png"}

        first = await self.send(alice, bob, "hello")
        self.assertLess(first.msg_id, JS_SAFE)
        self.assertLess(first.session_id, JS_SAFE)
        self.assertLess(abs(first.ts / 1000 - time.time()), 10)
        self.assertEqual(await self.push(bob), first.push(1, 1, **profile))

        body = {"text": "hi", "list": [1, 2.5, True, None, "x"], "map": {"k": "v"}}
        second = await self.send(alice, bob, body, type="image")
        self.assertGreater(second.msg_id, first.msg_id)
        self.assertEqual(second.session_id, first.session_id)
        self.assertEqual(await self.push(bob), second.push(2, 2, **profile))

        third = await self.send(carol, bob, "from carol")
        self.assertNotEqual(third.session_id, first.session_id)
        self.assertEqual(await self.push(bob), third.push(1, 3))

        # Pushed messages stay pending until acked.
        self.assertEqual(
            await self.sync(bob),
            {"msgs": [first.obj(**profile), second.obj(**profile), third.obj()], "more": False},
        )
        self.assertEqual(await self.result(bob, "ack", msg_ids=[first.msg_id, third.msg_id]), {})
        self.assertEqual(await self.sync(bob), {"msgs": [second.obj(**profile)], "more": False})
        # The sender has nothing pending and nothing unread.
        self.assertEqual(await self.sync(alice), {"msgs": [], "more": False})
        self.assertEqual(await self.result(alice, "unread"), {"total": 0, "sessions": []})
        # It was told of the delivery of its message bob acked (issue 11, "Receipts"), only.
        receipt = dict(await within(alice.next_push()))
        delivered = {"t": "delivered", "session_id": first.session_id, "msg_id": first.msg_id}
        self.assertEqual(receipt, {**delivered, "by": bob.uid})
        self.assertEqual(alice.pending_pushes, 0)

    async def test_session_id_is_the_same_for_both_users(self) -> None:
        alice = await self.login()
        bob = await self.login()
        carol = await self.login()
        a_to_b = await self.send(alice, bob, "one")
        self.assertEqual((await self.push(bob))["session_id"], a_to_b.session_id)
        b_to_a = await self.send(bob, alice, "two")
        self.assertEqual(b_to_a.session_id, a_to_b.session_id)
        self.assertEqual((await self.push(alice))["session_id"], a_to_b.session_id)
        a_to_c = await self.send(alice, carol, "three")
        self.assertNotEqual(a_to_c.session_id, a_to_b.session_id)
        await self.push(carol)

        alice_convs = (await self.result(alice, "convs"))["convs"]
        self.assertEqual(
            [c["session_id"] for c in alice_convs], [a_to_c.session_id, a_to_b.session_id]
        )
        bob_convs = (await self.result(bob, "convs"))["convs"]
        self.assertEqual([c["session_id"] for c in bob_convs], [a_to_b.session_id])
        for client in (alice, bob):
            page = await self.history(client, session_id=a_to_b.session_id)
            self.assertEqual([m["msg_id"] for m in page["msgs"]], [b_to_a.msg_id, a_to_b.msg_id])

    async def test_dedupe_by_cid(self) -> None:
        alice = await self.login()
        bob = await self.login()
        carol = await self.login()
        original = await self.send(alice, bob, "once", cid="same-cid")
        self.assertEqual(await self.push(bob), original.push(1, 1))

        # A repeat, even with another body, returns the original ids.
        again = await self.ok(alice, "send", to=bob.uid, cid="same-cid", body="changed")
        self.assertEqual(
            again,
            {
                "t": "ok",
                "id": again["id"],
                "msg_id": original.msg_id,
                "session_id": original.session_id,
                "ts": original.ts,
                "dup": True,
                "seq": original.seq,
            },
        )
        # Also from a new connection of the same user.
        assert alice.uid is not None
        alice2 = await self.login(alice.uid)
        self.assertEqual(await self.push(alice), {"t": "kick", "reason": "replaced"})
        again2 = await self.ok(alice2, "send", to=bob.uid, cid="same-cid", body="once")
        self.assertEqual(
            (again2["msg_id"], again2["session_id"], again2["ts"], again2["dup"]),
            (original.msg_id, original.session_id, original.ts, True),
        )
        # The cid is unique per sender: another sender may use it.
        other = await self.send(carol, bob, "carol's", cid="same-cid")
        self.assertNotEqual(other.msg_id, original.msg_id)
        # Nothing was pushed for the duplicates: the next push is carol's.
        self.assertEqual(await self.push(bob), other.push(1, 2))
        after = await self.send(alice2, bob, "next")
        self.assertEqual(await self.push(bob), after.push(2, 3))

        self.assertEqual(
            await self.sync(bob),
            {"msgs": [original.obj(), other.obj(), after.obj()], "more": False},
        )
        page = await self.history(bob, peer=alice.uid)
        self.assertEqual(page, {"msgs": [after.obj(), original.obj()], "more": False})
        self.assertEqual(
            await self.result(bob, "unread"),
            {
                "total": 3,
                "sessions": [
                    {"session_id": after.session_id, "count": 2},
                    {"session_id": other.session_id, "count": 1},
                ],
            },
        )

    # -- order -------------------------------------------------------------------

    async def test_pipelined_sends_keep_their_order(self) -> None:
        alice = await self.login()
        bob = await self.login()
        assert alice.uid is not None and bob.uid is not None
        count = 30
        cids = [f"order-{i}-{new_cid()}" for i in range(count)]
        # All in flight at once: no await between the requests.
        pending: list[Deferred[Frame]] = [
            alice.request("send", to=bob.uid, cid=cid, body=f"m{i}") for i, cid in enumerate(cids)
        ]
        sent = []
        for i, d in enumerate(pending):
            reply = dict(await within(d))
            self.assertIs(reply["dup"], False)
            sent.append(Sent(reply, alice.uid, bob.uid, cids[i], f"m{i}"))
        ids = [s.msg_id for s in sent]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), count)
        self.assertEqual(len({s.session_id for s in sent}), 1)

        pushes = [await self.push(bob) for _ in range(count)]
        self.assertEqual(pushes, [s.push(i + 1, i + 1) for i, s in enumerate(sent)])
        self.assertEqual(await self.sync(bob), {"msgs": [s.obj() for s in sent], "more": False})
        newest_first = [s.obj() for s in reversed(sent)]
        for client, peer in ((alice, bob.uid), (bob, alice.uid)):
            page = await self.history(client, peer=peer, limit=count)
            self.assertEqual(page, {"msgs": newest_first, "more": False})

    # -- pending: sync, ack, offline_summary ---------------------------------------

    async def test_pending_until_ack_sync_paging_and_offline_summary(self) -> None:
        alice = await self.login()
        carol = await self.login()
        bob_uid = await self.offline_user()
        assert alice.uid is not None and carol.uid is not None

        a1 = await self.send(alice, bob_uid, "a1")
        a2 = await self.send(alice, bob_uid, "a2")
        c1 = await self.send(carol, bob_uid, "c1")
        a3 = await self.send(alice, bob_uid, "a3")
        c2 = await self.send(carol, bob_uid, {"text": "c2"})
        a4 = await self.send(alice, bob_uid, "a4")
        a5 = await self.send(alice, bob_uid, "a5")
        everything = [a1, a2, c1, a3, c2, a4, a5]
        self.assertEqual([m.msg_id for m in everything], sorted(m.msg_id for m in everything))

        bob = await self.login(bob_uid)
        self.assertEqual(
            await self.result(bob, "offline_summary"),
            {
                "senders": [
                    {"uid": alice.uid, "count": 5, "last_msg_id": a5.msg_id},
                    {"uid": carol.uid, "count": 2, "last_msg_id": c2.msg_id},
                ]
            },
        )
        self.assertEqual(
            await self.sync(bob), {"msgs": [m.obj() for m in everything], "more": False}
        )
        # Paging with `after`, without acking.
        self.assertEqual(
            await self.sync(bob, limit=3), {"msgs": [a1.obj(), a2.obj(), c1.obj()], "more": True}
        )
        self.assertEqual(
            await self.sync(bob, limit=3, after=c1.msg_id),
            {"msgs": [a3.obj(), c2.obj(), a4.obj()], "more": True},
        )
        self.assertEqual(
            await self.sync(bob, limit=3, after=a4.msg_id), {"msgs": [a5.obj()], "more": False}
        )
        self.assertEqual(
            await self.sync(bob, limit=7), {"msgs": [m.obj() for m in everything], "more": False}
        )
        # One conversation with `from`.
        self.assertEqual(
            await self.sync(bob, **{"from": carol.uid}),
            {"msgs": [c1.obj(), c2.obj()], "more": False},
        )
        self.assertEqual(
            await self.sync(bob, limit=2, **{"from": alice.uid}),
            {"msgs": [a1.obj(), a2.obj()], "more": True},
        )
        self.assertEqual(
            await self.sync(bob, after=a2.msg_id, **{"from": alice.uid}),
            {"msgs": [a3.obj(), a4.obj(), a5.obj()], "more": False},
        )

        self.assertEqual(
            await self.result(bob, "ack", msg_ids=[a1.msg_id, a2.msg_id, c1.msg_id]), {}
        )
        rest = [a3, c2, a4, a5]
        self.assertEqual(await self.sync(bob), {"msgs": [m.obj() for m in rest], "more": False})
        self.assertEqual(
            await self.result(bob, "offline_summary"),
            {
                "senders": [
                    {"uid": alice.uid, "count": 3, "last_msg_id": a5.msg_id},
                    {"uid": carol.uid, "count": 1, "last_msg_id": c2.msg_id},
                ]
            },
        )
        # Ids that are not pending for the caller are ignored.
        self.assertEqual(await self.result(bob, "ack", msg_ids=[a1.msg_id, UNKNOWN_ID]), {})
        self.assertEqual(await self.result(carol, "ack", msg_ids=[a3.msg_id, c2.msg_id]), {})
        self.assertEqual(await self.result(alice, "ack", msg_ids=[a4.msg_id]), {})
        # Pending survives a reconnect.
        await within(bob.close())
        bob = await self.login(bob_uid)
        self.assertEqual(await self.sync(bob), {"msgs": [m.obj() for m in rest], "more": False})

        self.assertEqual(await self.result(bob, "ack", msg_ids=[m.msg_id for m in rest]), {})
        self.assertEqual(await self.sync(bob), {"msgs": [], "more": False})
        self.assertEqual(await self.result(bob, "offline_summary"), {"senders": []})
        # Acking is not reading: the messages are still unread.
        self.assertEqual((await self.result(bob, "unread"))["total"], 7)

    # -- read and unread -----------------------------------------------------------

    async def test_read_is_monotonic_and_pushed_to_the_peer(self) -> None:
        alice = await self.login()
        bob = await self.login()
        m1 = await self.send(alice, bob, "m1")
        m2 = await self.send(alice, bob, "m2")
        m3 = await self.send(alice, bob, "m3")
        sid = m1.session_id
        for i, m in enumerate((m1, m2, m3)):
            self.assertEqual(await self.push(bob), m.push(i + 1, i + 1))
        self.assertEqual(
            await self.result(bob, "unread"),
            {"total": 3, "sessions": [{"session_id": sid, "count": 3}]},
        )

        self.assertEqual(
            await self.result(bob, "read", session_id=sid, msg_id=m2.msg_id),
            {"unread": 1, "total_unread": 1},
        )
        self.assertEqual(
            await self.push(alice),
            {"t": "read", "session_id": sid, "by": bob.uid, "msg_id": m2.msg_id},
        )
        # An older position neither makes messages unread again nor is pushed.
        self.assertEqual(
            await self.result(bob, "read", session_id=sid, msg_id=m1.msg_id),
            {"unread": 1, "total_unread": 1},
        )
        self.assertEqual(
            await self.result(bob, "read", session_id=sid, msg_id=m2.msg_id),
            {"unread": 1, "total_unread": 1},
        )
        self.assertEqual(
            await self.result(bob, "unread"),
            {"total": 1, "sessions": [{"session_id": sid, "count": 1}]},
        )
        bob_convs = await self.result(bob, "convs")
        self.assertEqual(bob_convs["convs"][0]["unread"], 1)

        self.assertEqual(
            await self.result(bob, "read", session_id=sid, msg_id=m3.msg_id),
            {"unread": 0, "total_unread": 0},
        )
        # The next push alice gets is m3's: nothing for the older positions.
        self.assertEqual(
            await self.push(alice),
            {"t": "read", "session_id": sid, "by": bob.uid, "msg_id": m3.msg_id},
        )
        self.assertEqual(await self.result(bob, "unread"), {"total": 0, "sessions": []})
        self.assertEqual((await self.result(bob, "convs"))["convs"][0]["unread"], 0)

        # New messages count again from the read position.
        m4 = await self.send(alice, bob, "m4")
        self.assertEqual(await self.push(bob), m4.push(1, 1))
        self.assertEqual(
            await self.result(bob, "read", session_id=sid, msg_id=m1.msg_id),
            {"unread": 1, "total_unread": 1},
        )

    async def test_unread_counts_only_received_messages(self) -> None:
        alice = await self.login()
        bob = await self.login()
        carol = await self.login()
        a1 = await self.send(alice, bob, "a1")
        a2 = await self.send(alice, bob, "a2")
        self.assertEqual(await self.push(bob), a1.push(1, 1))
        self.assertEqual(await self.push(bob), a2.push(2, 2))
        b1 = await self.send(bob, alice, "b1")
        # The sender's own messages never count for the sender.
        self.assertEqual(await self.push(alice), b1.push(1, 1))
        c1 = await self.send(carol, bob, "c1")
        self.assertEqual(await self.push(bob), c1.push(1, 3))

        self.assertEqual(
            await self.result(alice, "unread"),
            {"total": 1, "sessions": [{"session_id": a1.session_id, "count": 1}]},
        )
        self.assertEqual(
            await self.result(bob, "unread"),
            {
                "total": 3,
                "sessions": [
                    {"session_id": c1.session_id, "count": 1},
                    {"session_id": a1.session_id, "count": 2},
                ],
            },
        )
        self.assertEqual(await self.result(carol, "unread"), {"total": 0, "sessions": []})
        # Reading up to your own message reads everything before it.
        self.assertEqual(
            await self.result(bob, "read", session_id=a1.session_id, msg_id=b1.msg_id),
            {"unread": 0, "total_unread": 1},
        )
        self.assertEqual(
            await self.result(bob, "unread"),
            {"total": 1, "sessions": [{"session_id": c1.session_id, "count": 1}]},
        )

    async def test_read_forbidden_and_not_found(self) -> None:
        alice = await self.login()
        bob = await self.login()
        eve = await self.login()
        m = await self.send(alice, bob, "private")
        await self.fails(eve, "forbidden", "read", session_id=m.session_id, msg_id=m.msg_id)
        await self.fails(bob, "not_found", "read", session_id=UNKNOWN_ID, msg_id=m.msg_id)
        # A message id is not a session id.
        await self.fails(bob, "not_found", "read", session_id=m.msg_id, msg_id=m.msg_id)
        # Nothing changed for bob.
        self.assertEqual(
            await self.result(bob, "unread"),
            {"total": 1, "sessions": [{"session_id": m.session_id, "count": 1}]},
        )

    # -- recall ------------------------------------------------------------------------

    async def test_recall_removes_everywhere_and_is_pushed(self) -> None:
        alice = await self.login()
        bob = await self.login()
        m1 = await self.send(alice, bob, "keep")
        m2 = await self.send(alice, bob, "oops")
        sid = m1.session_id
        self.assertEqual(await self.push(bob), m1.push(1, 1))
        self.assertEqual(await self.push(bob), m2.push(2, 2))

        self.assertEqual(await self.result(alice, "recall", msg_id=m2.msg_id), {})
        self.assertEqual(
            await self.push(bob),
            {"t": "recall", "msg_id": m2.msg_id, "session_id": sid, "by": alice.uid},
        )
        for client in (alice, bob):
            self.assertEqual(
                await self.history(client, session_id=sid), {"msgs": [m1.obj()], "more": False}
            )
            [conv] = (await self.result(client, "convs"))["convs"]
            self.assertEqual(conv["last"], m1.obj())
            self.assertEqual(conv["session_id"], sid)
        self.assertEqual(await self.sync(bob), {"msgs": [m1.obj()], "more": False})
        self.assertEqual(
            await self.result(bob, "unread"),
            {"total": 1, "sessions": [{"session_id": sid, "count": 1}]},
        )
        self.assertEqual(
            await self.result(bob, "offline_summary"),
            {"senders": [{"uid": alice.uid, "count": 1, "last_msg_id": m1.msg_id}]},
        )
        [bob_conv] = (await self.result(bob, "convs"))["convs"]
        self.assertEqual(bob_conv["unread"], 1)

        # Recalling twice is not an error, and bob is told again (a retry
        # after unavailable may find the first try committed); then m1's.
        self.assertEqual(await self.result(alice, "recall", msg_id=m2.msg_id), {})
        self.assertEqual(
            await self.push(bob),
            {"t": "recall", "msg_id": m2.msg_id, "session_id": sid, "by": alice.uid},
        )
        self.assertEqual(await self.result(alice, "recall", msg_id=m1.msg_id), {})
        self.assertEqual(
            await self.push(bob),
            {"t": "recall", "msg_id": m1.msg_id, "session_id": sid, "by": alice.uid},
        )
        for client in (alice, bob):
            self.assertEqual(
                await self.history(client, session_id=sid), {"msgs": [], "more": False}
            )
            [conv] = (await self.result(client, "convs"))["convs"]
            self.assertIsNone(conv["last"])
            self.assertEqual(conv["unread"], 0)
        self.assertEqual(await self.sync(bob), {"msgs": [], "more": False})
        self.assertEqual(await self.result(bob, "unread"), {"total": 0, "sessions": []})
        self.assertEqual(await self.result(bob, "offline_summary"), {"senders": []})

    async def test_recall_changes_unread_only_for_unread_messages(self) -> None:
        alice = await self.login()
        bob = await self.login()
        carol = await self.login()
        m1, m2, m3, m4 = [await self.send(alice, bob, f"m{i}") for i in range(1, 5)]
        other = await self.send(carol, bob, "carol")
        sid = m1.session_id
        self.assertEqual(
            await self.result(bob, "read", session_id=sid, msg_id=m2.msg_id),
            {"unread": 2, "total_unread": 3},
        )
        # m1 was read already: recalling it changes no count.
        self.assertEqual(await self.result(alice, "recall", msg_id=m1.msg_id), {})
        self.assertEqual(
            await self.result(bob, "unread"),
            {
                "total": 3,
                "sessions": [
                    {"session_id": other.session_id, "count": 1},
                    {"session_id": sid, "count": 2},
                ],
            },
        )
        # m3 was unread: it stops counting.
        self.assertEqual(await self.result(alice, "recall", msg_id=m3.msg_id), {})
        self.assertEqual(
            await self.result(bob, "unread"),
            {
                "total": 2,
                "sessions": [
                    {"session_id": other.session_id, "count": 1},
                    {"session_id": sid, "count": 1},
                ],
            },
        )
        convs = (await self.result(bob, "convs"))["convs"]
        self.assertEqual(
            [(c["session_id"], c["unread"]) for c in convs], [(other.session_id, 1), (sid, 1)]
        )
        self.assertEqual(convs[1]["last"], m4.obj())
        # The next message counts on from there.
        m5 = await self.send(alice, bob, "m5")
        recalls = [
            {"t": "recall", "msg_id": m.msg_id, "session_id": sid, "by": alice.uid}
            for m in (m1, m3)
        ]
        expected = [m.push(i + 1, i + 1) for i, m in enumerate((m1, m2, m3, m4))]
        expected += [other.push(1, 5), *recalls, m5.push(2, 3)]
        self.assertEqual([await self.push(bob) for _ in expected], expected)
        self.assertEqual(
            await self.result(bob, "read", session_id=sid, msg_id=m5.msg_id),
            {"unread": 0, "total_unread": 1},
        )
        self.assertEqual(
            await self.sync(bob),
            {"msgs": [m2.obj(), m4.obj(), other.obj(), m5.obj()], "more": False},
        )

    async def test_only_the_sender_may_recall(self) -> None:
        alice = await self.login()
        bob = await self.login()
        eve = await self.login()
        m = await self.send(alice, bob, "mine")
        self.assertEqual(await self.push(bob), m.push(1, 1))
        await self.fails(bob, "forbidden", "recall", msg_id=m.msg_id)
        await self.fails(eve, "forbidden", "recall", msg_id=m.msg_id)
        await self.fails(alice, "not_found", "recall", msg_id=UNKNOWN_ID)
        await self.fails(alice, "not_found", "recall", msg_id=m.session_id)
        # Still there for both, still unread.
        for client in (alice, bob):
            self.assertEqual(
                await self.history(client, session_id=m.session_id),
                {"msgs": [m.obj()], "more": False},
            )
        self.assertEqual(await self.sync(bob), {"msgs": [m.obj()], "more": False})
        self.assertEqual((await self.result(bob, "unread"))["total"], 1)

    # -- convs -------------------------------------------------------------------------

    async def test_convs_paging_neither_repeats_nor_skips(self) -> None:
        alice = await self.login()
        await self.ok(alice, "set_profile", nickname="alice")
        peers = []
        for i in range(7):
            peer = await self.login()
            await self.ok(peer, "set_profile", nickname=f"peer{i}", avatar=f"https://img/{i}")
            peers.append(peer)
        sent = [await self.send(alice, peer, f"to peer{i}") for i, peer in enumerate(peers)]

        def entry(i: int, unread: int = 0) -> Frame:
            return {
                "session_id": sent[i].session_id,
                "peer": {"uid": peers[i].uid, "nickname": f"peer{i}", "avatar": f"https://img/{i}"},
                "last": sent[i].obj(nickname="alice"),
                "last_msg_id": sent[i].msg_id,
                "unread": unread,
            }

        page1 = await self.result(alice, "convs", limit=3)
        self.assertEqual(page1, {"convs": [entry(6), entry(5), entry(4)], "more": True})
        page2 = await self.result(alice, "convs", limit=3, before=page1["convs"][-1]["last_msg_id"])
        self.assertEqual(page2, {"convs": [entry(3), entry(2), entry(1)], "more": True})
        page3 = await self.result(alice, "convs", limit=3, before=page2["convs"][-1]["last_msg_id"])
        self.assertEqual(page3, {"convs": [entry(0)], "more": False})
        everything = [entry(i) for i in reversed(range(7))]
        self.assertEqual(await self.result(alice, "convs"), {"convs": everything, "more": False})
        self.assertEqual(
            await self.result(alice, "convs", limit=7), {"convs": everything, "more": False}
        )

        # The recipient's side, with its unread count.
        self.assertEqual(
            await self.result(peers[3], "convs"),
            {
                "convs": [
                    {
                        "session_id": sent[3].session_id,
                        "peer": {"uid": alice.uid, "nickname": "alice", "avatar": ""},
                        "last": sent[3].obj(nickname="alice"),
                        "last_msg_id": sent[3].msg_id,
                        "unread": 1,
                    }
                ],
                "more": False,
            },
        )
        # A new message moves its conversation to the front.
        reply = await self.send(peers[3], alice, "back to you")
        # Across nodes, reads are consistent once the push arrived (docs/scaling.md).
        self.assertEqual((await self.push(alice))["msg_id"], reply.msg_id)
        first = await self.result(alice, "convs", limit=2)
        self.assertEqual(
            first,
            {
                "convs": [
                    {
                        "session_id": sent[3].session_id,
                        "peer": {
                            "uid": peers[3].uid,
                            "nickname": "peer3",
                            "avatar": "https://img/3",
                        },
                        "last": reply.obj(nickname="peer3", avatar="https://img/3"),
                        "last_msg_id": reply.msg_id,
                        "unread": 1,
                    },
                    entry(6),
                ],
                "more": True,
            },
        )

    # -- history -----------------------------------------------------------------------

    async def page_history(
        self, client: IMClientProtocol, limit: int, **where: Any
    ) -> tuple[list[Frame], list[bool]]:
        """Every page of a history, following C{before}; the messages and the C{more}s."""
        seen: list[Frame] = []
        mores: list[bool] = []
        fields: Frame = {**where, "limit": limit}
        while True:
            page = await self.history(client, **fields)
            self.assertLessEqual(len(page["msgs"]), limit)
            seen.extend(page["msgs"])
            mores.append(page["more"])
            if not page["more"] or not page["msgs"] or len(mores) > 10:
                return seen, mores
            fields["before"] = page["msgs"][-1]["msg_id"]

    async def test_history_paging_neither_repeats_nor_skips(self) -> None:
        alice = await self.login()
        bob = await self.login()
        assert alice.uid is not None and bob.uid is not None
        sent = [await self.send(alice, bob, f"h{i}") for i in range(25)]
        newest_first = [s.obj() for s in reversed(sent)]
        sid = sent[0].session_id

        for client, where in ((alice, {"peer": bob.uid}), (bob, {"session_id": sid})):
            seen, mores = await self.page_history(client, 10, **where)
            self.assertEqual(mores, [True, True, False])
            self.assertEqual(seen, newest_first)

        self.assertEqual(
            await self.history(alice, peer=bob.uid), {"msgs": newest_first[:20], "more": True}
        )
        self.assertEqual(
            await self.history(bob, peer=alice.uid, limit=25),
            {"msgs": newest_first, "more": False},
        )
        self.assertEqual(
            await self.history(bob, peer=alice.uid, before=sent[5].msg_id, limit=100),
            {"msgs": newest_first[20:], "more": False},
        )

        # Recalled messages are left out, even across a page boundary.
        for i in (15, 14, 3):
            self.assertEqual(await self.result(alice, "recall", msg_id=sent[i].msg_id), {})
        remaining = [
            m for m in newest_first if m["msg_id"] not in {sent[i].msg_id for i in (15, 14, 3)}
        ]
        self.assertEqual(len(remaining), 22)
        for client, where in ((alice, {"peer": bob.uid}), (bob, {"session_id": sid})):
            seen, mores = await self.page_history(client, 10, **where)
            self.assertEqual(mores, [True, True, False])
            self.assertEqual(seen, remaining)
            seen, mores = await self.page_history(client, 11, **where)
            self.assertEqual(mores, [True, False])
            self.assertEqual(seen, remaining)

    async def test_history_access(self) -> None:
        alice = await self.login()
        bob = await self.login()
        eve = await self.login()
        stranger = await self.login()
        m = await self.send(alice, bob, "between us")
        await self.fails(eve, "forbidden", "history", session_id=m.session_id)
        await self.fails(alice, "not_found", "history", session_id=UNKNOWN_ID)
        await self.fails(alice, "not_found", "history", session_id=m.msg_id)
        self.assertEqual(await self.history(alice, peer=stranger.uid), {"msgs": [], "more": False})
        self.assertEqual(await self.history(eve, peer=alice.uid), {"msgs": [], "more": False})
        self.assertEqual(
            await self.history(alice, peer=bob.uid), {"msgs": [m.obj()], "more": False}
        )

    # -- profiles ----------------------------------------------------------------------

    async def test_profile_and_set_profile(self) -> None:
        alice = await self.login()
        bob = await self.login()
        never = next(_uids)
        self.assertEqual(
            await self.result(alice, "profile", uids=[alice.uid]),
            {"users": [{"uid": alice.uid, "nickname": "", "avatar": ""}]},
        )
        self.assertEqual(
            await self.result(alice, "set_profile", nickname="alice"),
            {"user": {"uid": alice.uid, "nickname": "alice", "avatar": ""}, "presence": "contacts"},
        )
        self.assertEqual(
            await self.result(alice, "set_profile", avatar="https://img/alice.png"),
            {
                "user": {"uid": alice.uid, "nickname": "alice", "avatar": "https://img/alice.png"},
                "presence": "contacts",
            },
        )
        # Unknown uids are left out, the order asked is kept.
        self.assertEqual(
            await self.result(bob, "profile", uids=[bob.uid, never, alice.uid]),
            {
                "users": [
                    {"uid": bob.uid, "nickname": "", "avatar": ""},
                    {"uid": alice.uid, "nickname": "alice", "avatar": "https://img/alice.png"},
                ]
            },
        )
        self.assertEqual(
            await self.result(bob, "profile", uids=[alice.uid, bob.uid]),
            {
                "users": [
                    {"uid": alice.uid, "nickname": "alice", "avatar": "https://img/alice.png"},
                    {"uid": bob.uid, "nickname": "", "avatar": ""},
                ]
            },
        )
        self.assertEqual(await self.result(bob, "profile", uids=[never]), {"users": []})

        # Limits: 64 and 512 characters, at least one field. (The reply's presence:
        # the caller's share setting, issue 11.)
        longest = "n" * 64
        self.assertEqual(
            await self.result(bob, "set_profile", nickname=longest, avatar="a" * 512),
            {
                "user": {"uid": bob.uid, "nickname": longest, "avatar": "a" * 512},
                "presence": "contacts",
            },
        )
        await self.fails(bob, "too_large", "set_profile", nickname="n" * 65)
        await self.fails(bob, "too_large", "set_profile", avatar="a" * 513)
        await self.fails(bob, "invalid", "set_profile")
        await self.fails(bob, "invalid", "set_profile", nickname=5)
        await self.fails(bob, "invalid", "profile", uids=[])
        await self.fails(bob, "invalid", "profile", uids=["1"])
        await self.fails(bob, "invalid", "profile", uids=alice.uid)
        await self.fails(bob, "invalid", "profile")
        await self.fails(bob, "too_large", "profile", uids=list(range(1, 102)))
        self.assertEqual(
            await self.result(bob, "profile", uids=[bob.uid]),
            {"users": [{"uid": bob.uid, "nickname": longest, "avatar": "a" * 512}]},
        )

        # Messages carry the sender's current profile.
        m = await self.send(alice, bob, "hi")
        profile = {"nickname": "alice", "avatar": "https://img/alice.png"}
        self.assertEqual(await self.push(bob), m.push(1, 1, **profile))
        await self.ok(alice, "set_profile", nickname="alice2")
        self.assertEqual(
            await self.sync(bob),
            {"msgs": [m.obj(nickname="alice2", avatar="https://img/alice.png")], "more": False},
        )

    async def test_a_user_exists_once_it_has_authenticated(self) -> None:
        alice = await self.login()
        newcomer = next(_uids)
        await self.fails(alice, "no_such_user", "send", to=newcomer, cid=new_cid(), body="hi")
        self.assertEqual(await self.result(alice, "profile", uids=[newcomer]), {"users": []})

        await within((await self.login(newcomer)).close())
        self.assertEqual(
            await self.result(alice, "profile", uids=[newcomer]),
            {"users": [{"uid": newcomer, "nickname": "", "avatar": ""}]},
        )
        m = await self.send(alice, newcomer, "welcome")
        newcomer_client = await self.login(newcomer)
        self.assertEqual(await self.sync(newcomer_client), {"msgs": [m.obj()], "more": False})

    # -- validation of every op ----------------------------------------------------------

    async def test_send_validation(self) -> None:
        alice = await self.login()
        bob = await self.login()
        to = bob.uid
        base: Frame = {"to": to, "cid": "v", "body": "x"}

        def without(key: str) -> Frame:
            return {k: v for k, v in base.items() if k != key}

        invalid: list[Frame] = [
            {**base, "to": str(to)},
            {**base, "to": float(to)},
            {**base, "to": True},
            {**base, "to": 0},
            {**base, "to": -5},
            {**base, "to": None},
            {**base, "to": [to]},
            without("to"),
            without("cid"),
            without("body"),
            {**base, "cid": ""},
            {**base, "cid": 17},
            {**base, "cid": None},
            {**base, "body": ["a", "list"]},
            {**base, "body": 42},
            {**base, "body": 1.5},
            {**base, "body": True},
            {**base, "body": None},
            {**base, "body": b"binary"},
            {**base, "body": {"data": b"binary"}},
            {**base, "type": ""},
            {**base, "type": 3},
            {**base, "to": alice.uid},
        ]
        for fields in invalid:
            await self.fails(alice, "invalid", "send", **fields)

        too_large: list[Frame] = [
            {**base, "cid": "c" * 65},
            {**base, "type": "t" * 33},
            # A str of n >= 256 characters is n + 3 bytes of msgpack.
            {**base, "body": "b" * (MAX_BODY_BYTES - 2)},
            {**base, "body": {"text": "b" * MAX_BODY_BYTES}},
            # Bytes count, not characters: 16383 two-byte characters.
            {**base, "body": "\u00e9" * 16383},
        ]
        for fields in too_large:
            await self.fails(alice, "too_large", "send", **fields)

        # Nothing above was stored; the limits themselves are allowed.
        largest = "b" * (MAX_BODY_BYTES - 3)
        self.assertEqual(len(msgpack.packb(largest)), MAX_BODY_BYTES)
        self.assertEqual(len(msgpack.packb("b" * (MAX_BODY_BYTES - 2))), MAX_BODY_BYTES + 1)
        long_cid = await self.send(alice, bob, "cid of 64", cid="c" * 64, type="t" * 32)
        big = await self.send(alice, bob, largest)
        # The rejected cid "v" was not used up.
        v = await self.send(alice, bob, "x", cid="v")
        # Across nodes, reads are consistent once the pushes arrived (docs/scaling.md).
        for m in (long_cid, big, v):
            self.assertEqual((await self.push(bob))["msg_id"], m.msg_id)
        self.assertEqual(
            await self.sync(bob),
            {"msgs": [long_cid.obj(), big.obj(), v.obj()], "more": False},
        )

    async def test_validation_of_the_other_ops(self) -> None:
        alice = await self.login()
        bob = await self.login()
        m = await self.send(bob, alice, "x")
        sid = m.session_id
        cases: list[tuple[str, str, Frame]] = [
            # ack: 1..500 ids
            ("ack", "invalid", {}),
            ("ack", "invalid", {"msg_ids": []}),
            ("ack", "invalid", {"msg_ids": [str(m.msg_id)]}),
            ("ack", "invalid", {"msg_ids": [1.0]}),
            ("ack", "invalid", {"msg_ids": [0]}),
            ("ack", "invalid", {"msg_ids": m.msg_id}),
            ("ack", "too_large", {"msg_ids": list(range(1, 502))}),
            # sync: limit 1..500
            ("sync", "too_large", {"limit": 501}),
            ("sync", "invalid", {"limit": 0}),
            ("sync", "invalid", {"limit": "10"}),
            ("sync", "invalid", {"limit": 10.0}),
            ("sync", "invalid", {"after": "1"}),
            ("sync", "invalid", {"after": -1}),
            ("sync", "invalid", {"from": True}),
            ("sync", "invalid", {"from": 0}),
            # read
            ("read", "invalid", {"session_id": sid}),
            ("read", "invalid", {"msg_id": m.msg_id}),
            ("read", "invalid", {"session_id": str(sid), "msg_id": m.msg_id}),
            ("read", "invalid", {"session_id": sid, "msg_id": float(m.msg_id)}),
            ("read", "invalid", {"session_id": sid, "msg_id": False}),
            # convs: limit 1..100
            ("convs", "too_large", {"limit": 101}),
            ("convs", "invalid", {"limit": 0}),
            ("convs", "invalid", {"before": 1.5}),
            ("convs", "invalid", {"before": "1"}),
            # history: exactly one of peer / session_id, limit 1..100
            ("history", "too_large", {"peer": bob.uid, "limit": 101}),
            ("history", "invalid", {"peer": bob.uid, "limit": 0}),
            ("history", "invalid", {}),
            ("history", "invalid", {"peer": bob.uid, "session_id": sid}),
            ("history", "invalid", {"peer": str(bob.uid)}),
            ("history", "invalid", {"peer": True}),
            ("history", "invalid", {"session_id": 2.5}),
            ("history", "invalid", {"peer": bob.uid, "before": "1"}),
            # recall
            ("recall", "invalid", {}),
            ("recall", "invalid", {"msg_id": 0}),
            ("recall", "invalid", {"msg_id": str(m.msg_id)}),
            ("recall", "invalid", {"msg_id": True}),
        ]
        for op, code, fields in cases:
            await self.fails(alice, code, op, **fields)

        # The maximum limits are allowed.
        self.assertEqual(await self.sync(alice, limit=500), {"msgs": [m.obj()], "more": False})
        self.assertEqual(len((await self.result(alice, "convs", limit=100))["convs"]), 1)
        self.assertEqual(
            await self.history(alice, peer=bob.uid, limit=100), {"msgs": [m.obj()], "more": False}
        )
        self.assertEqual(await self.result(alice, "ack", msg_ids=list(range(1, 501))), {})
        # None of the failed requests acked, read or recalled anything.
        self.assertEqual(await self.sync(alice), {"msgs": [m.obj()], "more": False})
        self.assertEqual((await self.result(alice, "unread"))["total"], 1)

    # -- special configurations -----------------------------------------------------------

    def words_file(self, *words: str) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "words.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("# blocked words\n" + "\n".join(words) + "\n")
        return path

    async def test_content_filter_reject(self) -> None:
        words = self.words_file("badword", "evil phrase")
        server = self.start_server(filter={"words_file": words, "action": "reject"})
        alice = await self.login(server=server)
        bob = await self.login(server=server)
        for body in (
            "a BadWord here",
            "badword",
            {"text": "an EVIL PHRASE", "n": 1},
            {"nested": {"list": ["fine", "xxbadwordxx"]}},
        ):
            await self.fails(alice, "content_blocked", "send", to=bob.uid, cid="f1", body=body)
        clean = await self.send(alice, bob, "bad word, evil-phrase: all clean")
        self.assertEqual(await self.push(bob), clean.push(1, 1))
        # Nothing of the refused messages was stored or delivered; their cid is free.
        retry = await self.send(alice, bob, "rephrased", cid="f1")
        self.assertEqual(await self.push(bob), retry.push(2, 2))
        self.assertEqual(await self.sync(bob), {"msgs": [clean.obj(), retry.obj()], "more": False})
        self.assertEqual(
            await self.history(alice, peer=bob.uid),
            {"msgs": [retry.obj(), clean.obj()], "more": False},
        )

    async def test_content_filter_mask(self) -> None:
        words = self.words_file("badword", "evil phrase")
        server = self.start_server(filter={"words_file": words, "action": "mask"})
        alice = await self.login(server=server)
        bob = await self.login(server=server)
        text = await self.send(alice, bob, "you are a BADWORD, Badword!")
        masked_text = "you are a *******, *******!"
        rich = await self.send(
            alice,
            bob,
            {"text": "evil phrase inside", "parts": ["ok", "badword"], "deep": {"x": "xbadwordx"}},
        )
        masked_rich = {
            "text": "*********** inside",
            "parts": ["ok", "*******"],
            "deep": {"x": "x*******x"},
        }
        self.assertEqual(await self.push(bob), {**text.push(1, 1), "body": masked_text})
        self.assertEqual(await self.push(bob), {**rich.push(2, 2), "body": masked_rich})
        expected = [text.obj(body=masked_text), rich.obj(body=masked_rich)]
        self.assertEqual(await self.sync(bob), {"msgs": expected, "more": False})
        for client, peer in ((alice, bob.uid), (bob, alice.uid)):
            page = await self.history(client, peer=peer)
            self.assertEqual(page, {"msgs": expected[::-1], "more": False})
        [conv] = (await self.result(alice, "convs"))["convs"]
        self.assertEqual(conv["last"], rich.obj(body=masked_rich))

    async def test_rate_limited(self) -> None:
        server = self.start_server(limits={"send_per_second": 0.5, "send_burst": 3})
        alice = await self.login(server=server)
        bob = await self.login(server=server)
        assert alice.uid is not None and bob.uid is not None
        cids = [new_cid() for _ in range(5)]
        pending = [
            alice.request("send", to=bob.uid, cid=cid, body=f"r{i}") for i, cid in enumerate(cids)
        ]
        sent = []
        for i, d in enumerate(pending):
            if i < 3:
                reply = dict(await within(d))
                self.assertIs(reply["dup"], False)
                sent.append(Sent(reply, alice.uid, bob.uid, cids[i], f"r{i}"))
            else:
                with self.assertRaises(RequestFailed) as e:
                    await within(d)
                self.assertEqual(e.exception.code, "rate_limited")
        await within(alice.request("ping"))
        for i, s in enumerate(sent):
            self.assertEqual(await self.push(bob), s.push(i + 1, i + 1))
        # Refused sends were not stored.
        self.assertEqual(await self.sync(bob), {"msgs": [s.obj() for s in sent], "more": False})

        # One token per two seconds: after a pause, one retry (same cid) goes through.
        await sleep(2.1)
        retry = await self.send(alice, bob, "r3", cid=cids[3])
        self.assertEqual(await self.push(bob), retry.push(4, 4))
        await self.fails(alice, "rate_limited", "send", to=bob.uid, cid=cids[4], body="r4")
        # Other ops are not limited.
        self.assertEqual(len((await self.sync(bob))["msgs"]), 4)
        self.assertEqual(len((await self.history(alice, peer=bob.uid))["msgs"]), 4)

    async def test_recall_too_late(self) -> None:
        server = self.start_server(limits={"recall_seconds": 0})
        alice = await self.login(server=server)
        bob = await self.login(server=server)
        m = await self.send(alice, bob, "no take-backs")
        self.assertEqual(await self.push(bob), m.push(1, 1))
        await sleep(1.1)
        await self.fails(alice, "too_late", "recall", msg_id=m.msg_id)
        # Only the sender gets as far as the window.
        await self.fails(bob, "forbidden", "recall", msg_id=m.msg_id)
        await self.fails(alice, "not_found", "recall", msg_id=UNKNOWN_ID)
        # The message stays.
        self.assertEqual(
            await self.history(bob, peer=alice.uid), {"msgs": [m.obj()], "more": False}
        )
        self.assertEqual(await self.sync(bob), {"msgs": [m.obj()], "more": False})
        self.assertEqual((await self.result(bob, "unread"))["total"], 1)
        # No recall was pushed: the next push bob gets is the next message.
        after = await self.send(alice, bob, "next")
        self.assertEqual(await self.push(bob), after.push(2, 2))

    async def test_internal_error_keeps_the_connection(self) -> None:
        server = self.start_server()
        alice = await self.login(server=server)
        bob = await self.login(server=server)
        m = await self.send(alice, bob, "before")
        self.assertEqual(await self.push(bob), m.push(1, 1))
        # Carol's pending messages were never read, so a sync must ask SQL.
        carol = await self.login(server=server)

        self.break_sql(server)
        await self.fails(alice, "internal", "send", to=bob.uid, cid=new_cid(), body="after")
        await self.fails(carol, "internal", "sync")
        # The connections stay usable.
        for client in (alice, carol):
            pong = await self.ok(client, "ping")
            self.assertEqual(set(pong), {"t", "id", "server_time"})
        self.assertTrue(alice.is_open and carol.is_open)
        await self.fails(alice, "internal", "send", to=carol.uid, cid=new_cid(), body="again")


class EmbeddedMessagingTests(MessagingTestsMixin, TestCase):
    """SQLite + the in-process hot store: the default without configuration."""

    _server = None

    def backend(self) -> Sections:
        # ServerProcess defaults to a SQLite file in its own directory.
        return {}

    def break_sql(self, server: ServerProcess) -> None:
        url = str(server.config["storage"]["sql"])
        self.assertTrue(url.startswith("sqlite:"), url)
        db = sqlite3.connect(url[len("sqlite:") :], timeout=10)
        try:
            db.execute("DROP TABLE t_pending")
            db.commit()
        finally:
            db.close()


class MariaDBRedisMessagingTests(MessagingTestsMixin, TestCase):
    """MariaDB + Redis (throwaway instances; distinct databases and key prefixes)."""

    _server = None

    def backend(self) -> Sections:
        return {
            "storage": {
                "sql": shared_mariadb().fresh_database(),
                "redis": shared_redis().url,
                "key_prefix": fresh_prefix(),
            }
        }

    def break_sql(self, server: ServerProcess) -> None:
        database = urlsplit(str(server.config["storage"]["sql"])).path.lstrip("/")
        shared_mariadb().sql("DROP TABLE t_pending", database=database)

    async def test_unavailable_while_mariadb_is_down(self) -> None:
        # A private mariadbd: stopping the shared one would break other tests.
        mariadb = MariaDBServer().start()
        self.addCleanup(mariadb.cleanup)
        mariadb.sql("CREATE DATABASE imtest_down CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        server = ServerProcess(
            {
                "storage": {
                    "sql": mariadb.url("imtest_down"),
                    "redis": shared_redis().url,
                    "key_prefix": fresh_prefix(),
                }
            }
        )
        self.addCleanup(server.cleanup)
        server.start()
        alice = await self.login(server=server)
        bob = await self.login(server=server)
        before = await self.send(alice, bob, "before")
        self.assertEqual(await self.push(bob), before.push(1, 1))

        mariadb.stop()
        # Never ok while the database is down; the connection stays open.
        await self.fails(
            alice, "unavailable", "send", timeout=30, to=bob.uid, cid="while-down", body="down"
        )
        await self.fails(
            alice, "unavailable", "send", timeout=30, to=bob.uid, cid="while-down", body="down"
        )

        mariadb.start()
        # The retry with the same cid is stored exactly once.
        retry = await self.ok(alice, "send", to=bob.uid, cid="while-down", body="down")
        assert alice.uid is not None and bob.uid is not None
        retried = Sent(retry, alice.uid, bob.uid, "while-down", "down")
        after = await self.send(alice, bob, "after")
        expected_pushes = [] if retry["dup"] else [retried.push(2, 2)]
        expected_pushes.append(after.push(3, 3))
        self.assertEqual([await self.push(bob) for _ in expected_pushes], expected_pushes)
        self.assertEqual(
            await self.sync(bob),
            {"msgs": [before.obj(), retried.obj(), after.obj()], "more": False},
        )
        again = await self.ok(alice, "send", to=bob.uid, cid="while-down", body="down")
        self.assertEqual((again["msg_id"], again["dup"]), (retried.msg_id, True))
