"""
The admin API's blocks (docs/http.md, "Blocks"), in process on both
backends: list, block, unblock, their errors, and that an admin block acts
as the user's own (the send is refused, the user's devices are told, the
other nodes hear of it).
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.trial.unittest import TestCase

from imserver.errors import ImError
from imserver.services.tokens import TokenService
from tests.stack import Stack, make_stack
from tests.test_http import ADMIN_KEY, SECRET, HttpMixin, serve

_uids = itertools.count(420_000)


class AdminBlocksContract(HttpMixin):
    backend = ""
    stack: Stack
    assertEqual: Any

    async def setUp(self) -> None:
        assert isinstance(self, TestCase)
        self.stack = await make_stack(self, self.backend)
        _, _, port = await serve(self, self.stack, TokenService(SECRET), self.stack.presence)
        self.base = f"http://127.0.0.1:{port}"

    async def user(self) -> int:
        uid = next(_uids)
        await self.stack.store.ensure_user(uid)
        return uid

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        return await self.call(method, path, body, admin=ADMIN_KEY)

    async def forbidden(self, sender: int, to: int) -> None:
        try:
            await self.stack.chat.send(sender, to, f"c{next(_uids)}", "text", "hi")
        except ImError as e:
            self.assertEqual(e.code, "forbidden")
            return
        raise AssertionError("the send should be refused")

    async def test_block_list_unblock(self) -> None:
        a, b, c = await self.user(), await self.user(), await self.user()
        self.stack.presence.online_users.add(a)
        path = f"/v1/admin/users/{a}/blocks"
        self.assertAnswer(await self.admin("GET", path), 200, {"uids": [], "more": False})
        for other in (c, b, b):
            self.assertAnswer(await self.admin("PUT", f"{path}/{other}"), 200, {"blocked": True})
        self.assertAnswer(await self.admin("GET", path), 200, {"uids": [b, c], "more": False})
        self.assertAnswer(
            await self.admin("GET", f"{path}?limit=1"), 200, {"uids": [b], "more": True}
        )
        self.assertAnswer(
            await self.admin("GET", f"{path}?limit=1&after={b}"), 200, {"uids": [c], "more": False}
        )
        # As the user's own block: sends refused both ways, the user's devices told.
        await self.forbidden(b, a)
        await self.forbidden(a, b)
        self.assertEqual(
            self.stack.presence.take(a, "block"),
            [
                {"t": "block", "uid": c, "blocked": True},
                {"t": "block", "uid": b, "blocked": True},
                {"t": "block", "uid": b, "blocked": True},
            ],
        )
        self.assertIn(("block", [a, b, True]), self.stack.presence.broadcasts)
        for _ in range(2):
            self.assertAnswer(await self.admin("DELETE", f"{path}/{b}"), 200, {"blocked": False})
        self.assertAnswer(await self.admin("GET", path), 200, {"uids": [c], "more": False})
        await self.stack.chat.send(b, a, "z", "text", "hi")
        # A PUT may carry an empty object.
        self.assertAnswer(await self.admin("PUT", f"{path}/{b}", {}), 200, {"blocked": True})

    async def test_errors(self) -> None:
        a = await self.user()
        unknown = next(_uids)
        path = f"/v1/admin/users/{a}/blocks"
        self.assertError(await self.admin("PUT", f"{path}/{a}"), 400, "invalid")
        self.assertError(await self.admin("DELETE", f"{path}/{a}"), 400, "invalid")
        self.assertError(await self.admin("PUT", f"{path}/{unknown}"), 404, "no_such_user")
        for method in ("GET", "PUT", "DELETE"):
            suffix = "" if method == "GET" else f"/{a}"
            answer = await self.admin(method, f"/v1/admin/users/{unknown}/blocks{suffix}")
            self.assertError(answer, 404, "no_such_user")
        for bad in ("0", "-1", "x", "01", str(2**63)):
            self.assertError(await self.admin("PUT", f"{path}/{bad}"), 400, "invalid")
            self.assertError(
                await self.admin("GET", f"/v1/admin/users/{bad}/blocks"), 400, "invalid"
            )
        for query in ("limit=0", "limit=501", "after=x", "limit=1&limit=2"):
            self.assertError(await self.admin("GET", f"{path}?{query}"), 400, "invalid")
        self.assertError(await self.admin("PUT", f"{path}/{a}", {"x": 1}), 400, "invalid")
        self.assertError(await self.admin("POST", f"{path}/{a}"), 405, "method_not_allowed")
        self.assertError(await self.admin("DELETE", path), 405, "method_not_allowed")
        self.assertError(await self.admin("GET", f"{path}/{a}/more"), 404, "not_found")
        for method in ("GET", "PUT", "DELETE"):
            answer = await self.call(method, f"{path}/{a}" if method != "GET" else path)
            self.assertError(answer, 403, "forbidden")

    async def test_the_limit(self) -> None:
        a = await self.user()
        self.stack.chat.blocks.max_blocks = 2
        path = f"/v1/admin/users/{a}/blocks"
        for _ in range(2):
            self.assertAnswer(
                await self.admin("PUT", f"{path}/{await self.user()}"), 200, {"blocked": True}
            )
        self.assertError(await self.admin("PUT", f"{path}/{await self.user()}"), 400, "too_large")


class EmbeddedAdminBlocksTests(AdminBlocksContract, TestCase):
    backend = "embedded"


class MariaDBAdminBlocksTests(AdminBlocksContract, TestCase):
    backend = "redis"
