"""
End-to-end: who may do what about whom (docs/protocol.md, "Who may do what"),
as a matrix: every op that names another user, a conversation or a message,
asked by a user outside the conversation, and by a user blocked by (or
blocking) the other one; over real TCP to C{twistd -n imserver}, on both
backends. Nothing an outsider or a blocked user asks may reach the other
users as a push.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from imserver.client import IMClientProtocol
from tests.harness import fresh_prefix, shared_mariadb, shared_redis
from tests.support import sleep
from tests.test_e2e_messaging import MessagingHelpers, Sections, new_cid

#: How a user one may not see is answered.
HIDDEN = {"online": False, "last_seen": 0}


class AuthorizationTestsMixin(MessagingHelpers):
    async def conversation(self) -> tuple[IMClientProtocol, IMClientProtocol, int, int]:
        """Alice and Bob, online, with a conversation: (alice, bob, session_id, msg_id)."""
        alice = await self.login()
        bob = await self.login()
        sent = await self.send(alice, bob, "hello bob")
        push = await self.push(bob)
        self.assertEqual(push["t"], "msg")
        return alice, bob, sent.reply["session_id"], sent.reply["msg_id"]

    async def quiet(self, *clients: IMClientProtocol) -> None:
        """None of these clients has a push waiting (after a round trip of each)."""
        await sleep(0.3)
        for client in clients:
            await self.ok(client, "ping")
            pending = []
            while client.pending_pushes:
                pending.append(await self.push(client))
            self.assertEqual(pending, [], f"uid {client.uid} was pushed")

    async def test_outsider_is_forbidden_everything_about_the_conversation(self) -> None:
        alice, bob, sid, mid = await self.conversation()
        eve = await self.login()
        assert alice.uid is not None and bob.uid is not None
        matrix: list[tuple[str, dict[str, Any]]] = [
            ("read", {"session_id": sid, "msg_id": mid}),
            ("history", {"session_id": sid}),
            ("recall", {"msg_id": mid}),
            ("edit", {"msg_id": mid, "body": "eve was here"}),
            ("hide", {"msg_ids": [mid]}),
            ("clear", {"session_id": sid}),
            ("mute", {"session_id": sid, "until": 0}),
            ("typing", {"to": alice.uid, "active": True}),
            ("typing", {"to": bob.uid, "active": False}),
        ]
        for op, fields in matrix:
            await self.fails(eve, "forbidden", op, **fields)
        # Nobody's presence is shared with strangers by default ("contacts").
        for op in ("presence", "watch"):
            reply = await self.result(eve, op, uids=[alice.uid, bob.uid])
            self.assertEqual(
                reply["users"], [{"uid": alice.uid, **HIDDEN}, {"uid": bob.uid, **HIDDEN}]
            )
        # The peer's history asked by peer: eve never talked to them.
        self.assertEqual(await self.history(eve, peer=alice.uid), {"msgs": [], "more": False})
        # A contact sees the other one.
        reply = await self.result(bob, "presence", uids=[alice.uid])
        self.assertIs(reply["users"][0]["online"], True)
        await self.quiet(alice, bob)
        # The conversation is unchanged for its members.
        history = await self.history(bob, session_id=sid)
        self.assertEqual([m["body"] for m in history["msgs"]], ["hello bob"])

    async def test_blocked_pair_sends_nothing_sees_nothing_keeps_history(self) -> None:
        alice, bob, sid, mid = await self.conversation()
        assert alice.uid is not None and bob.uid is not None
        for client in (alice, bob):
            await self.ok(client, "set_profile", presence="everyone")
        await self.ok(bob, "block", uid=alice.uid)
        # Either way: the blocked user and the blocker.
        for sender, to in ((alice, bob), (bob, alice)):
            await self.fails(sender, "forbidden", "send", to=to.uid, cid=new_cid(), body="hi")
            # Typing is answered, and shown to nobody (a block is not revealed by it).
            await self.ok(sender, "typing", to=to.uid, active=True)
            for op in ("presence", "watch"):
                reply = await self.result(sender, op, uids=[to.uid])
                self.assertEqual(reply["users"], [{"uid": to.uid, **HIDDEN}])
        await self.fails(alice, "forbidden", "edit", msg_id=mid, body="changed")
        # Going offline and back is not shown to the watcher either.
        await self.ok(alice, "watch", uids=[bob.uid])
        await bob.close()
        bob = await self.login(bob.uid)
        await self.quiet(alice, bob)
        # History stays, for both.
        for client in (alice, bob):
            history = await self.history(client, session_id=sid)
            self.assertEqual([m["msg_id"] for m in history["msgs"]], [mid])
        # The blocked user cannot undo it; the blocker can.
        reply = await self.result(bob, "blocked")
        self.assertEqual(reply["uids"], [alice.uid])
        await self.ok(alice, "unblock", uid=bob.uid)
        await self.fails(alice, "forbidden", "send", to=bob.uid, cid=new_cid(), body="still?")
        await self.ok(bob, "unblock", uid=alice.uid)
        await self.send(alice, bob, "hello again")
        self.assertEqual((await self.push(bob))["body"], "hello again")
        reply = await self.result(alice, "presence", uids=[bob.uid])
        self.assertIs(reply["users"][0]["online"], True)


class EmbeddedAuthorizationTests(AuthorizationTestsMixin, TestCase):
    _server = None

    def backend(self) -> Sections:
        return {}


class MariaDBRedisAuthorizationTests(AuthorizationTestsMixin, TestCase):
    _server = None

    def backend(self) -> Sections:
        return {
            "storage": {
                "sql": shared_mariadb().fresh_database(),
                "redis": shared_redis().url,
                "key_prefix": fresh_prefix(),
            }
        }
