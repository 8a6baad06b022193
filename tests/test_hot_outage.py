"""
The store while its hot store hangs or fails (issue 9, defect 5): replies
of acks, reads and logins do not wait for it, the user still reads their own
writes (from SQL), failures share one repair, and the repair runs as soon as
the hot store is back.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from imserver.storage.hot.interface import HotUnavailable
from tests.stack import Stack, make_stack
from tests.support import eventually, within

_uids = itertools.count(70_000)


class HotOutageTests(TestCase):
    timeout = 10

    async def stack(self) -> tuple[Stack, int, int]:
        stack = await make_stack(self)
        a, b = next(_uids), next(_uids)
        for uid in (a, b):
            await stack.chat.login(uid)
        return stack, a, b

    def hang(self, stack: Stack, *names: str) -> Deferred[None]:
        """Make these hot-store writes wait for the returned Deferred (errback: fail)."""
        gate: Deferred[None] = Deferred()

        def waiting(*args: Any, **kwargs: Any) -> Deferred[None]:
            d: Deferred[None] = Deferred()

            def release(result: object) -> object:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)
                return result

            gate.addBoth(release)
            return d

        for name in names:
            self.patch(stack.hot, name, waiting)
        return gate

    async def test_ack_and_read_replies_do_not_wait_for_the_hot_store(self) -> None:
        stack, a, b = await self.stack()
        sent = [await stack.chat.send(a, b, f"c{i}", "text", f"m{i}") for i in range(3)]
        await stack.settle()
        self.assertEqual(len((await stack.chat.sync(b, 10, 0, None))["msgs"]), 3)  # hot copy
        gate = self.hang(stack, "ack", "apply_rows")

        # within() fails the test if a reply waits for the hung hot store.
        await within(stack.chat.ack(b, [sent[0]["msg_id"]]), 1)
        read = await within(stack.chat.read(b, sent[0]["session_id"], sent[1]["msg_id"]), 1)
        self.assertEqual(read, {"unread": 1, "total_unread": 1, "seq": read["seq"]})
        # Meanwhile b reads his own writes (from SQL).
        fallbacks = stack.store.hot_fallbacks
        synced = (await stack.chat.sync(b, 10, 0, None))["msgs"]
        self.assertEqual([m["msg_id"] for m in synced], [s["msg_id"] for s in sent[1:]])
        self.assertEqual((await stack.chat.unread(b))["total"], 1)
        self.assertGreater(stack.store.hot_fallbacks, fallbacks)

        # The hot store fails the steps: one repair for both, run when it is back.
        gate.errback(HotUnavailable("redis: timeout"))
        gate.addErrback(lambda _: None)
        self.assertEqual(stack.store.retries.depth, 1)
        self.assertIn(b, stack.store.suspect_users)
        stack.store.hot_back()
        await eventually(lambda: not stack.store.suspect_users, timeout=2, interval=0.01)
        self.assertEqual(stack.store.retries.depth, 0)
        synced = (await stack.chat.sync(b, 10, 0, None))["msgs"]
        self.assertEqual([m["msg_id"] for m in synced], [s["msg_id"] for s in sent[1:]])
        self.assertEqual((await stack.chat.unread(b))["total"], 1)

    async def test_a_login_does_not_wait_for_the_profile_cache(self) -> None:
        stack, _, _ = await self.stack()
        gate = self.hang(stack, "put_profiles")
        login = await within(stack.chat.login(next(_uids)), 1)  # a new user
        self.assertEqual(login.profile.nickname, "")
        gate.errback(HotUnavailable("redis: timeout"))
        gate.addErrback(lambda _: None)
        # A cache fill that failed needs no repair: the next read fills it.
        self.assertEqual(stack.store.retries.depth, 0)

    async def test_drain_waits_for_the_steps_after_replies(self) -> None:
        stack, a, b = await self.stack()
        sent = await stack.chat.send(a, b, "c", "text", "m")
        await stack.settle()
        gate = self.hang(stack, "ack")
        await within(stack.chat.ack(b, [sent["msg_id"]]), 1)
        drained = Deferred.fromCoroutine(stack.store.drain())
        self.assertFalse(drained.called)
        gate.callback(None)
        await within(drained, 2)
