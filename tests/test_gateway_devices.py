"""
The connection layer's part of devices: the token's device claim, where a
device's stream starts (the login hook), and catch-up mode (each event once).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from imserver.config import LimitsConfig
from imserver.gateway.ops import business_ops, login_hook
from imserver.gateway.protocol import ClientProtocol, Gateway
from imserver.services.tokens import Claims
from imserver.storage.model import DeviceRow, Login, Profile
from imserver.wire import frames
from tests.test_gateway import Client, GatewayTestsMixin


class DeviceClaimTests(GatewayTestsMixin, SynchronousTestCase):
    def auth(self, token: str, **fields: Any) -> list[dict[str, Any]]:
        client = Client(self.gateway)
        client.send({"t": "auth", "id": 1, "token": token, **fields})
        return client.received()

    def test_claim_must_match_the_device(self) -> None:
        token = self.tokens.mint(42, now=self.clock.seconds(), device="phone")
        [reply] = self.auth(token, device="phone")
        self.assertEqual(reply["t"], "ok")
        [reply] = self.auth(token, device="desktop")
        self.assertEqual((reply["t"], reply["code"]), ("error", "auth_failed"))
        # No device in auth is the device "default": not "phone".
        [reply] = self.auth(token)
        self.assertEqual((reply["t"], reply["code"]), ("error", "auth_failed"))

    def test_default_claim_fits_a_client_without_device(self) -> None:
        token = self.tokens.mint(42, now=self.clock.seconds(), device="default")
        [reply] = self.auth(token)
        self.assertEqual(reply["t"], "ok")


class CatchupModeTests(SynchronousTestCase):
    """ClientProtocol.push: pushes with a seq wait for the catch-up, then come once."""

    def proto(self, *, since: bool) -> tuple[ClientProtocol, list[Any]]:
        written: list[Any] = []
        proto = ClientProtocol.__new__(ClientProtocol)
        proto.filter_stream = proto.catching_up = since
        proto.position = 10
        proto._held = 0
        proto._send = lambda frame, op=None: written.append(frame)  # type: ignore[method-assign]
        return proto, written

    def test_held_back_while_catching_up(self) -> None:
        proto, written = self.proto(since=True)
        proto.push({"t": "msg", "seq": 11})
        proto.push({"t": "sync"})
        self.assertEqual(written, [{"t": "sync"}])
        proto.caught_up(12, more=True)
        proto.push({"t": "msg", "seq": 13})
        self.assertEqual(written, [{"t": "sync"}])
        proto.caught_up(15, more=False)
        for seq in (14, 15, 16, 17):
            proto.push({"t": "msg", "seq": seq})
        self.assertEqual(written[1:], [{"t": "msg", "seq": 16}, {"t": "msg", "seq": 17}])

    def test_push_held_beyond_the_last_page_means_more(self) -> None:
        """
        Regression: a push held back while the last page was read (its event
        committed after the page's snapshot) was lost: the page said the
        stream ended before it, and the connection went live past it.
        """
        proto, written = self.proto(since=True)
        proto.push({"t": "msg", "seq": 13})
        self.assertTrue(proto.caught_up(12, more=False))
        self.assertTrue(proto.catching_up)
        self.assertFalse(proto.caught_up(13, more=False))
        proto.push({"t": "msg", "seq": 13})
        proto.push({"t": "msg", "seq": 14})
        self.assertEqual(written, [{"t": "msg", "seq": 14}])

    def test_no_since_no_filter(self) -> None:
        """A client that never asked for catch-up mode gets every push (v1 behaviour)."""
        proto, written = self.proto(since=False)
        for seq in (3, 11):
            proto.push({"t": "msg", "seq": seq})
        self.assertEqual([f["seq"] for f in written], [3, 11])


@attrs.define
class FakeChat:
    """The part of ChatService the login hook and the catchup op use."""

    login_result: Login
    pages: list[dict[str, Any]] = attrs.Factory(list)
    asked: list[tuple[int, int, int, int]] = attrs.Factory(list)

    async def login(self, uid: int, device: str, client: str, issued_at: float | None) -> Login:
        return self.login_result

    async def catchup(self, uid: int, device_id: int, after: int, limit: int) -> dict[str, Any]:
        self.asked.append((uid, device_id, after, limit))
        return self.pages.pop(0)


def login(created: bool, cursor: int = 5, head: int = 9) -> Login:
    row = DeviceRow(
        id=77,
        uid=42,
        device="phone",
        client="",
        cursor=cursor,
        created_at=0,
        last_seen=0,
        revoked_at=0,
    )
    return Login(profile=Profile(42), device=row, created=created, head=head)


class LoginHookTests(SynchronousTestCase):
    """Where a device's stream starts, by what the client says and the server knows."""

    def start(self, result: Login, since: int | None) -> tuple[dict[str, Any], ClientProtocol]:
        hook = login_hook(FakeChat(result))  # type: ignore[arg-type]
        conn = ClientProtocol.__new__(ClientProtocol)
        conn.position = 0
        conn.catching_up = conn.filter_stream = False
        request = frames.Auth(id=1, token="t", device="phone", since=since)
        out: list[Any] = []
        Deferred.fromCoroutine(hook(Claims(42), conn, request)).addCallback(out.append)
        [reply] = out
        return dict(reply), conn

    def test_known_device_with_since(self) -> None:
        reply, conn = self.start(login(created=False), since=7)
        self.assertEqual(reply, {"device": "phone", "seq": 7, "head": 9, "new_device": False})
        self.assertEqual((conn.position, conn.catching_up, conn.device_id), (7, True, 77))

    def test_known_device_without_since_is_live_from_its_cursor(self) -> None:
        reply, conn = self.start(login(created=False), since=None)
        self.assertEqual(reply["seq"], 5)
        self.assertEqual((conn.catching_up, conn.filter_stream), (False, False))

    def test_new_device_starts_at_the_head(self) -> None:
        for since in (None, 0):
            reply, conn = self.start(login(created=True), since=since)
            self.assertEqual((reply["seq"], reply["new_device"]), (9, True))
            self.assertNotIn("reset", reply)
            self.assertEqual(conn.catching_up, since is not None)

    def test_forgotten_device_is_reset(self) -> None:
        reply, conn = self.start(login(created=True), since=3)
        self.assertEqual((reply["seq"], reply["reset"]), (9, True))
        self.assertTrue(conn.catching_up)

    def test_since_beyond_the_head_is_reset(self) -> None:
        reply, _ = self.start(login(created=False), since=10)
        self.assertEqual((reply["seq"], reply["reset"]), (9, True))


class CatchupOpTests(GatewayTestsMixin, SynchronousTestCase):
    def test_pages_move_the_connection(self) -> None:
        chat = FakeChat(
            login(created=False),
            pages=[
                {"events": [{"t": "msg", "seq": 8}], "seq": 8, "more": True},
                {"events": [], "seq": 9, "more": False},
            ],
        )
        self.gateway = Gateway(
            config=self.config,
            clock=self.clock,
            tokens=self.tokens,
            presence=self.registry,
            ops=business_ops(chat, LimitsConfig()),  # type: ignore[arg-type]
            on_login=login_hook(chat),  # type: ignore[arg-type]
        )
        client = Client(self.gateway)
        client.send({"t": "auth", "id": 1, "token": self.token(42), "device": "phone", "since": 7})
        [reply] = client.received()
        self.assertEqual(reply["seq"], 7)
        client.proto.push({"t": "msg", "seq": 8})  # held back: the page brings it
        client.send({"t": "catchup", "id": 2})
        client.send({"t": "catchup", "id": 3, "limit": 5})
        self.assertEqual([r["seq"] for r in client.received()], [8, 9])
        self.assertEqual(chat.asked, [(42, 77, 7, 100), (42, 77, 8, 5)])
        client.proto.push({"t": "msg", "seq": 9})  # was in the pages
        client.proto.push({"t": "msg", "seq": 10})
        self.assertEqual(client.received(), [{"t": "msg", "seq": 10}])
