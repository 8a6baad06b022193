"""
The short-connection HTTP API (docs/http.md).

L{ApiTests} run the site in process on a real L{Store} and L{ChatService}
(tests/stack.py), listening on a free loopback port and spoken to with real
HTTP requests (treq on the real reactor); L{ApiRedisTests} does the same on
SQLite + a private Redis that it stops. L{HttpE2ETests} and
L{HttpMariaRedisE2ETests} speak to C{twistd -n imserver} (tests/harness.py).
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Mapping
from typing import Any

import attrs
import jwt
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from imserver.errors import ErrorCode, ImError, Unavailable
from imserver.http import site as site_module
from imserver.http.api import make_site
from imserver.http.site import ApiSite
from imserver.metrics import CONTENT_TYPE, Metrics
from imserver.services.presence import IClientLink, IPresence
from imserver.services.registry import LocalRegistry
from imserver.services.tokens import TokenService
from imserver.storage.model import DeadLetter
from tests.harness import (
    RedisServer,
    ServerProcess,
    fresh_prefix,
    shared_mariadb,
    shared_redis,
)
from tests.stack import Stack, make_stack
from tests.support import ClientsMixin, eventually, reactor, sleep, within

ADMIN_KEY = "http-test-admin-key-0123456789"
SECRET = "http-test-secret-0123456789-abcdefghijkl"
JSON = "application/json"
INT64_MAX = 2**63 - 1
BIG = 64 * 1024

_uids = itertools.count(1000)


def uid() -> int:
    return next(_uids)


@attrs.frozen
class Answer:
    status: int
    headers: Mapping[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return None if not values else values[-1]


@implementer(IBodyProducer)
class Producer:
    """A request body: some chunks, then (with C{hold}) nothing more until stopped."""

    def __init__(self, chunks: list[bytes], length: int | object, hold: bool = False) -> None:
        self.chunks = chunks
        self.length = length
        self.hold = hold
        self.stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        for chunk in self.chunks:
            consumer.write(chunk)
        if self.hold:
            return Deferred()
        return succeed(None)

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@implementer(IClientLink)
@attrs.define
class FakeLink:
    uid: int
    epoch: int = 1
    device: str = "default"
    connected_at: int = 0
    last_active: float = 0.0

    def push(self, frame: Mapping[str, Any]) -> None:
        pass

    def kick(self, reason: str) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Raw(Protocol):
    """
    Collects everything the server sends. When the server half-closes, it
    closes too, unless C{keep_sending} (then it only notes C{eof}).
    """

    def __init__(self, keep_sending: bool = False) -> None:
        self.keep_sending = keep_sending
        self.data = b""
        self.eof = False
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True
        if not self.keep_sending:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(self.data)


class HttpMixin:
    """Real HTTP requests, with connections cleaned up at the end of the test."""

    addCleanup: Any
    base: str

    def http_client(self) -> HTTPClient:
        client: HTTPClient | None = getattr(self, "_http", None)
        if client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self.addCleanup(self.close_http)
            client = self._http = HTTPClient(Agent(reactor, pool=self._pool))
        return client

    async def close_http(self) -> None:
        """Close the client's idle connections (again, if needed)."""
        pool: HTTPConnectionPool | None = getattr(self, "_pool", None)
        if pool is not None:
            await pool.closeCachedConnections()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        data: bytes | Producer | None = None,
        token: str | None = None,
        admin: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        sent: dict[str, list[str]] = {}
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = [JSON]
        if token is not None:
            sent["Authorization"] = [f"Bearer {token}"]
        if admin is not None:
            sent["X-Admin-Key"] = [admin]
        for name, value in (headers or {}).items():
            sent[name] = [value]
        response = await within(
            self.http_client().request(method, self.base + path, data=data, headers=sent)
        )
        content = await within(response.content())
        return Answer(
            response.code,
            {
                k.decode().lower(): [v.decode() for v in vs]
                for k, vs in response.headers.getAllRawHeaders()
            },
            content,
        )

    def assertAnswer(
        self, answer: Answer, status: int, body: Any, content_type: str = JSON
    ) -> None:
        test: Any = self
        test.assertEqual((answer.status, answer.json()), (status, body))
        test.assertEqual(answer.header("Content-Type"), content_type)

    def assertError(
        self, answer: Answer, status: int, code: str, message: str | None = None
    ) -> None:
        test: Any = self
        test.assertEqual(answer.status, status, answer.body)
        test.assertEqual(answer.header("Content-Type"), JSON)
        got = answer.json()
        test.assertEqual(sorted(got), ["error", "message"])
        test.assertEqual(got["error"], code)
        test.assertIsInstance(got["message"], str)
        if message is not None:
            test.assertEqual(got["message"], message)


async def serve(
    case: HttpMixin, stack: Stack, tokens: TokenService, presence: IPresence, **site: Any
) -> tuple[ApiSite, WrappingFactory, int]:
    """Listen with the API's site on a free loopback port until the end of the test."""
    made = make_site(
        chat=stack.chat,
        store=stack.store,
        tokens=tokens,
        presence=presence,
        admin_key=ADMIN_KEY,
        metrics=Metrics(),
        clock=reactor,
        **site,
    )
    assert isinstance(made, ApiSite)
    # The wrapper counts the server's connections, so the test can end
    # once they are all closed (no dirty reactor).
    server = WrappingFactory(made)
    port: IListeningPort = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        server
    )

    async def stop() -> None:
        await case.close_http()
        await eventually(lambda: not server.protocols, timeout=10)
        await port.stopListening()

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return made, server, port.getHost().port


class ApiTests(HttpMixin, TestCase):
    """The resource tree in process, on the embedded backend."""

    stack: Stack
    site: ApiSite
    server: WrappingFactory
    tokens: TokenService

    async def start(
        self,
        backend: str = "embedded",
        presence: IPresence | None = None,
        redis: RedisServer | None = None,
        **site: Any,
    ) -> None:
        self.stack = await make_stack(self, backend, redis=redis)
        self.tokens = TokenService(SECRET)
        self.site, self.server, self.port = await serve(
            self,
            self.stack,
            self.tokens,
            self.stack.presence if presence is None else presence,
            **site,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.http_client()

    async def setUp(self) -> None:
        await self.start()

    def token(self, uid: int, ttl: int = 3600) -> str:
        return self.tokens.mint(uid, now=reactor.seconds(), ttl_seconds=ttl)

    async def user(self, nickname: str = "", avatar: str = "") -> int:
        u = uid()
        await self.stack.store.upsert_user(u, nickname, avatar)
        return u

    # -- /healthz, /metrics --------------------------------------------------

    async def test_healthz(self) -> None:
        answer = await self.call("GET", "/healthz")
        self.assertAnswer(answer, 200, {"status": "ok", "sql": "ok", "redis": "embedded"})
        self.assertEqual(answer.header("Cache-Control"), "no-store")
        got = await self.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = got.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), got)
        self.assertIn(b"\r\nContent-Length: 46\r\n", head)
        self.assertEqual(body, b'{"status":"ok","sql":"ok","redis":"embedded"}\n')

    async def test_healthz_head(self) -> None:
        answer = await self.call("HEAD", "/healthz")
        self.assertEqual((answer.status, answer.body), (200, b""))
        self.assertEqual(answer.header("Content-Type"), JSON)

    async def test_healthz_sql_down(self) -> None:
        self.stack.store.db.close()
        answer = await self.call("GET", "/healthz")
        self.assertAnswer(answer, 503, {"status": "degraded", "sql": "down", "redis": "embedded"})

    async def test_metrics(self) -> None:
        answer = await self.call("GET", "/metrics")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("Content-Type"), CONTENT_TYPE)
        self.assertIn(b"# TYPE imserver_send_to_commit_seconds histogram\n", answer.body)
        self.assertIn(b"# TYPE imserver_batch_size histogram\n", answer.body)

    # -- GET /v1/users/{uid} -----------------------------------------------------

    async def test_get_user(self) -> None:
        target = await self.user("alice", "https://img/a.png")
        answer = await self.call("GET", f"/v1/users/{target}", token=self.token(uid()))
        self.assertAnswer(
            answer, 200, {"uid": target, "nickname": "alice", "avatar": "https://img/a.png"}
        )

    async def test_get_user_percent_encoded_uid(self) -> None:
        target = await self.user("alice")
        answer = await self.call(
            "GET", "/v1/users/%" + "%".join(f"{ord(c):x}" for c in str(target)), token=self.token(1)
        )
        self.assertAnswer(answer, 200, {"uid": target, "nickname": "alice", "avatar": ""})

    async def test_get_unknown_user(self) -> None:
        answer = await self.call("GET", "/v1/users/424242", token=self.token(1))
        self.assertError(answer, 404, "no_such_user", "user 424242 does not exist")

    async def test_get_user_without_token(self) -> None:
        target = await self.user()
        answer = await self.call("GET", f"/v1/users/{target}")
        self.assertError(answer, 401, "unauthorized", "missing Authorization: Bearer TOKEN")
        self.assertEqual(answer.header("WWW-Authenticate"), "Bearer")

    async def test_get_user_bad_tokens(self) -> None:
        target = await self.user()
        path = f"/v1/users/{target}"
        other = TokenService("another-secret-0123456789-abcdefghijkl")
        cases = {
            "Bearer not-a-jwt": 'Bearer error="invalid_token"',
            "Bearer " + other.mint(7, now=reactor.seconds()): 'Bearer error="invalid_token"',
            "Bearer " + self.tokens.mint(7, now=reactor.seconds() - 100, ttl_seconds=10): (
                'Bearer error="invalid_token"'
            ),
            "Basic " + base64.b64encode(b"a:b").decode(): "Bearer",
            "Bearer": "Bearer",
            "Bearer  ": "Bearer",
        }
        for value, challenge in cases.items():
            answer = await self.call("GET", path, headers={"Authorization": value})
            self.assertError(answer, 401, "unauthorized")
            self.assertEqual(answer.header("WWW-Authenticate"), challenge, value)
        expired = self.tokens.mint(7, now=reactor.seconds() - 100, ttl_seconds=10)
        answer = await self.call("GET", path, token=expired)
        self.assertError(answer, 401, "unauthorized", "token expired")

    async def test_bad_uid_in_path(self) -> None:
        token = self.token(1)
        for bad in ("abc", "0", "-1", "007", "1.5", str(INT64_MAX + 1), "1e3", "%20"):
            answer = await self.call("GET", f"/v1/users/{bad}", token=token)
            self.assertError(answer, 400, "invalid")
            self.assertIn("positive int64", answer.json()["message"])
        answer = await self.call("GET", "/v1/users/abc", token=token)
        self.assertError(
            answer, 400, "invalid", "the uid in the path must be a positive int64, not 'abc'"
        )
        # The largest uid is fine (and unknown).
        answer = await self.call("GET", f"/v1/users/{INT64_MAX}", token=token)
        self.assertError(answer, 404, "no_such_user")

    async def test_auth_is_checked_before_the_path(self) -> None:
        answer = await self.call("GET", "/v1/users/abc")
        self.assertError(answer, 401, "unauthorized")

    # -- PUT /v1/users/me ---------------------------------------------------------

    async def test_put_me(self) -> None:
        me = await self.user("old", "https://img/old.png")
        token = self.token(me)
        answer = await self.call("PUT", "/v1/users/me", {"nickname": "new"}, token=token)
        expected = {"uid": me, "nickname": "new", "avatar": "https://img/old.png"}
        self.assertAnswer(answer, 200, {"user": expected})
        answer = await self.call(
            "PUT", "/v1/users/me", {"avatar": "https://img/new.png"}, token=token
        )
        expected["avatar"] = "https://img/new.png"
        self.assertAnswer(answer, 200, {"user": expected})
        # Both fields, one of them null (= unchanged).
        answer = await self.call(
            "PUT", "/v1/users/me", {"nickname": "newer", "avatar": None}, token=token
        )
        expected["nickname"] = "newer"
        self.assertAnswer(answer, 200, {"user": expected})
        # Stored in SQL (and the hot copy), and served by the other routes.
        self.assertEqual((await self.stack.store.profiles([me]))[me].public(), expected)
        profile = self.stack.chat.profiles.cached(me)
        assert profile is not None
        self.assertEqual(profile.public(), expected)
        answer = await self.call("GET", f"/v1/users/{me}", token=self.token(1))
        self.assertAnswer(answer, 200, expected)

    async def test_put_me_limits(self) -> None:
        me = await self.user()
        token = self.token(me)
        answer = await self.call(
            "PUT", "/v1/users/me", {"nickname": "n" * 64, "avatar": "a" * 512}, token=token
        )
        self.assertAnswer(
            answer, 200, {"user": {"uid": me, "nickname": "n" * 64, "avatar": "a" * 512}}
        )
        answer = await self.call("PUT", "/v1/users/me", {"nickname": "n" * 65}, token=token)
        self.assertError(
            answer, 400, "too_large", "field 'nickname' must have at most 64 characters"
        )
        answer = await self.call("PUT", "/v1/users/me", {"avatar": "a" * 513}, token=token)
        self.assertError(
            answer, 400, "too_large", "field 'avatar' must have at most 512 characters"
        )
        # Unicode counts characters, not bytes.
        answer = await self.call("PUT", "/v1/users/me", {"nickname": "é" * 64}, token=token)
        self.assertEqual(answer.json()["user"]["nickname"], "é" * 64)

    async def test_put_me_bad_bodies(self) -> None:
        me = await self.user("kept")
        token = self.token(me)
        cases: list[tuple[bytes, str]] = [
            (b"", "the body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
            (
                b"{",
                "the body is not valid JSON: Expecting property name enclosed in double quotes:"
                " line 1 column 2 (char 1)",
            ),
            (b"[]", "the body must be a JSON object"),
            (b'"nickname"', "the body must be a JSON object"),
            (b"null", "the body must be a JSON object"),
            (b"{}", "give 'nickname', 'avatar' or both"),
            (b'{"nickname": null}', "give 'nickname', 'avatar' or both"),
            (b'{"nickname": 5}', "field 'nickname' must be a string"),
            (b'{"avatar": ["x"]}', "field 'avatar' must be a string"),
            (b'{"nick": "x"}', "unknown field 'nick' (known: avatar, nickname)"),
            (b'{"nickname": NaN}', "the body is not valid JSON: NaN is not allowed"),
            (b'{"nickname": "\xff"}', "the body must be UTF-8"),
            (b"[" * 50000, None),
        ]
        for data, message in cases:
            answer = await self.call("PUT", "/v1/users/me", data=data, token=token)
            self.assertError(answer, 400, "invalid", message)
        self.assertEqual((await self.stack.store.profiles([me]))[me].nickname, "kept")

    async def test_put_me_unknown_user(self) -> None:
        answer = await self.call("PUT", "/v1/users/me", {"nickname": "x"}, token=self.token(5555))
        self.assertError(answer, 404, "no_such_user", "user 5555 does not exist")

    async def test_put_me_without_token(self) -> None:
        answer = await self.call("PUT", "/v1/users/me", {"nickname": "x"})
        self.assertError(answer, 401, "unauthorized")
        answer = await self.call("PUT", "/v1/users/me", data=b"not json")
        self.assertError(answer, 401, "unauthorized")

    # -- admin: the key ------------------------------------------------------------

    async def test_admin_key_required(self) -> None:
        target = await self.user()
        routes = [
            ("GET", f"/v1/admin/users/{target}", None),
            ("PUT", f"/v1/admin/users/{target}", {"nickname": "x"}),
            ("POST", "/v1/admin/tokens", {"uid": target}),
            ("GET", "/v1/admin/dead-letters", None),
            ("GET", "/v1/admin/no-such-route", None),
            ("DELETE", "/v1/admin/tokens", None),
            ("GET", "/v1/admin", None),
            ("GET", "/v1/admin/", None),
        ]
        for method, path, body in routes:
            answer = await self.call(method, path, body)
            self.assertError(answer, 403, "forbidden", "missing X-Admin-Key header")
            for wrong in (ADMIN_KEY[:-1], ADMIN_KEY + "x", "", "Bearer " + ADMIN_KEY):
                answer = await self.call(method, path, body, admin=wrong)
                self.assertError(answer, 403, "forbidden", "wrong admin key")
        # A client token is no admin key.
        answer = await self.call("GET", f"/v1/admin/users/{target}", token=self.token(target))
        self.assertError(answer, 403, "forbidden")
        self.assertEqual((await self.stack.store.profiles([target]))[target].nickname, "")

    # -- admin: users ------------------------------------------------------------------

    async def test_admin_put_user_creates_then_updates(self) -> None:
        target = uid()
        answer = await self.call(
            "PUT", f"/v1/admin/users/{target}", {"nickname": "carol"}, admin=ADMIN_KEY
        )
        expected = {"uid": target, "nickname": "carol", "avatar": ""}
        self.assertAnswer(answer, 201, {"user": expected})
        self.assertEqual(answer.header("Location"), f"/v1/users/{target}")
        answer = await self.call(
            "PUT", f"/v1/admin/users/{target}", {"avatar": "https://img/c.png"}, admin=ADMIN_KEY
        )
        expected["avatar"] = "https://img/c.png"
        self.assertAnswer(answer, 200, {"user": expected})
        self.assertIsNone(answer.header("Location"))
        self.assertEqual((await self.stack.store.profiles([target]))[target].public(), expected)
        cached = self.stack.chat.profiles.cached(target)
        assert cached is not None
        self.assertEqual(cached.public(), expected)
        # The user exists for the business layer too.
        await self.stack.chat.send(target, await self.user(), "cid-1", "text", "hi")

    async def test_admin_put_user_empty_body_object(self) -> None:
        target = uid()
        answer = await self.call("PUT", f"/v1/admin/users/{target}", {}, admin=ADMIN_KEY)
        self.assertAnswer(answer, 201, {"user": {"uid": target, "nickname": "", "avatar": ""}})
        answer = await self.call("PUT", f"/v1/admin/users/{target}", {}, admin=ADMIN_KEY)
        self.assertAnswer(answer, 200, {"user": {"uid": target, "nickname": "", "avatar": ""}})

    async def test_admin_put_user_errors(self) -> None:
        answer = await self.call("PUT", "/v1/admin/users/0", {}, admin=ADMIN_KEY)
        self.assertError(
            answer, 400, "invalid", "the uid in the path must be a positive int64, not '0'"
        )
        target = uid()
        for body, code in (
            ({"nickname": "x" * 65}, "too_large"),
            ({"avatar": 1}, "invalid"),
            ({"uid": 5}, "invalid"),
            ([], "invalid"),
        ):
            answer = await self.call("PUT", f"/v1/admin/users/{target}", body, admin=ADMIN_KEY)
            self.assertError(answer, 400, code)
        answer = await self.call("PUT", f"/v1/admin/users/{target}", data=b"{", admin=ADMIN_KEY)
        self.assertError(answer, 400, "invalid")
        self.assertEqual(await self.stack.store.profiles([target]), {})

    async def test_admin_get_user(self) -> None:
        registry = LocalRegistry()
        await self.start(presence=registry)
        target = await self.user("dave", "https://img/d.png")
        answer = await self.call("GET", f"/v1/admin/users/{target}", admin=ADMIN_KEY)
        profile = {"uid": target, "nickname": "dave", "avatar": "https://img/d.png"}
        self.assertAnswer(answer, 200, {**profile, "online": False, "pending": 0})
        sender = await self.user()
        for i in range(3):
            await self.stack.chat.send(sender, target, f"cid-{i}", "text", f"m{i}")
        await self.stack.settle()
        await registry.login(target, FakeLink(target))
        answer = await self.call("GET", f"/v1/admin/users/{target}", admin=ADMIN_KEY)
        self.assertAnswer(answer, 200, {**profile, "online": True, "pending": 3})
        answer = await self.call("HEAD", f"/v1/admin/users/{target}", admin=ADMIN_KEY)
        self.assertEqual((answer.status, answer.body), (200, b""))

    async def test_admin_get_unknown_user(self) -> None:
        answer = await self.call("GET", "/v1/admin/users/987654", admin=ADMIN_KEY)
        self.assertError(answer, 404, "no_such_user", "user 987654 does not exist")
        answer = await self.call("GET", "/v1/admin/users/x1", admin=ADMIN_KEY)
        self.assertError(answer, 400, "invalid")

    # -- admin: tokens --------------------------------------------------------------------

    async def test_admin_mint_token(self) -> None:
        answer = await self.call("POST", "/v1/admin/tokens", {"uid": 42}, admin=ADMIN_KEY)
        self.assertEqual((answer.status, sorted(answer.json())), (200, ["token"]))
        self.assertEqual(answer.header("Content-Type"), JSON)
        token = answer.json()["token"]
        self.assertEqual(self.tokens.verify(token, now=reactor.seconds()), 42)
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
        self.assertEqual(claims["exp"] - claims["iat"], 86400)
        self.assertLessEqual(abs(claims["iat"] - reactor.seconds()), 2)
        # The token works on the client routes.
        await self.stack.store.upsert_user(42, "forty-two", "")
        answer = await self.call("PUT", "/v1/users/me", {"avatar": "a"}, token=token)
        self.assertAnswer(
            answer, 200, {"user": {"uid": 42, "nickname": "forty-two", "avatar": "a"}}
        )

    async def test_admin_mint_token_ttl(self) -> None:
        for ttl in (1, 3600, 30 * 86400):
            answer = await self.call(
                "POST", "/v1/admin/tokens", {"uid": INT64_MAX, "ttl": ttl}, admin=ADMIN_KEY
            )
            self.assertEqual(answer.status, 200)
            claims = jwt.decode(answer.json()["token"], SECRET, algorithms=["HS256"])
            self.assertEqual((claims["sub"], claims["exp"] - claims["iat"]), (str(INT64_MAX), ttl))

    async def test_admin_mint_token_errors(self) -> None:
        uid_message = "field 'uid' must be an integer in 1..9223372036854775807"
        ttl_message = "field 'ttl' must be an integer in 1..2592000"
        cases: list[tuple[Any, str]] = [
            ({}, "field 'uid' is required"),
            ({"uid": None}, "field 'uid' is required"),
            ({"ttl": 60}, "field 'uid' is required"),
            ({"uid": 0}, uid_message),
            ({"uid": -5}, uid_message),
            ({"uid": "42"}, uid_message),
            ({"uid": 42.0}, uid_message),
            ({"uid": True}, uid_message),
            ({"uid": INT64_MAX + 1}, uid_message),
            ({"uid": 42, "ttl": 0}, ttl_message),
            ({"uid": 42, "ttl": 30 * 86400 + 1}, ttl_message),
            ({"uid": 42, "ttl": 1.5}, ttl_message),
            ({"uid": 42, "ttl": "60"}, ttl_message),
            ({"uid": 42, "exp": 60}, "unknown field 'exp' (known: device, ttl, uid)"),
            ({"uid": 42, "device": ""}, "'device' must not be empty"),
            ({"uid": 42, "device": 5}, "field 'device' must be a string"),
            ([42], "the body must be a JSON object"),
        ]
        for body, message in cases:
            answer = await self.call("POST", "/v1/admin/tokens", body, admin=ADMIN_KEY)
            self.assertError(answer, 400, "invalid", message)

    # -- admin: dead letters ------------------------------------------------------------

    async def test_dead_letters(self) -> None:
        letters = [
            DeadLetter(
                i, "repair" if i % 2 else "notify", 100 + i, payload, f"error {i}", i, 1000 * i
            )
            for i, payload in enumerate(
                [b"\x83\xa1u\x91\x01", b'{"to": 1}', b"", b"\xff\xfe", b"text"], start=1
            )
        ]
        for letter in letters:
            await self.stack.store.add_dead_letter(letter)

        def obj(d: DeadLetter) -> dict[str, Any]:
            return {
                "id": d.id,
                "kind": d.kind,
                "ref": d.ref,
                "error": d.error,
                "attempts": d.attempts,
                "created_at": d.created_at,
                "payload": base64.b64encode(d.payload).decode(),
            }

        newest_first = [obj(d) for d in reversed(letters)]
        answer = await self.call("GET", "/v1/admin/dead-letters", admin=ADMIN_KEY)
        self.assertAnswer(answer, 200, {"dead_letters": newest_first, "more": False})
        self.assertEqual(newest_first[-1]["payload"], "g6F1kQE=")

        pages = []
        before = ""
        while True:
            answer = await self.call(
                "GET", f"/v1/admin/dead-letters?limit=2{before}", admin=ADMIN_KEY
            )
            self.assertEqual(answer.status, 200)
            page = answer.json()
            pages.append(([d["id"] for d in page["dead_letters"]], page["more"]))
            if not page["more"]:
                break
            before = f"&before={page['dead_letters'][-1]['id']}"
        self.assertEqual(pages, [([5, 4], True), ([3, 2], True), ([1], False)])

        answer = await self.call("GET", "/v1/admin/dead-letters?before=5&limit=4", admin=ADMIN_KEY)
        self.assertAnswer(answer, 200, {"dead_letters": newest_first[1:], "more": False})
        answer = await self.call("GET", "/v1/admin/dead-letters?before=1", admin=ADMIN_KEY)
        self.assertAnswer(answer, 200, {"dead_letters": [], "more": False})

    async def test_dead_letters_limits(self) -> None:
        for i in range(1, 503):
            await self.stack.store.add_dead_letter(DeadLetter(i, "notify", i, b"", "e", 1, i))
        answer = await self.call("GET", "/v1/admin/dead-letters", admin=ADMIN_KEY)
        page = answer.json()
        self.assertEqual((len(page["dead_letters"]), page["more"]), (50, True))
        self.assertEqual(page["dead_letters"][0]["id"], 502)
        answer = await self.call("GET", "/v1/admin/dead-letters?limit=500", admin=ADMIN_KEY)
        page = answer.json()
        self.assertEqual((len(page["dead_letters"]), page["more"]), (500, True))
        answer = await self.call(
            "GET", "/v1/admin/dead-letters?limit=500&before=501", admin=ADMIN_KEY
        )
        page = answer.json()
        self.assertEqual((len(page["dead_letters"]), page["more"]), (500, False))

    async def test_dead_letters_bad_query(self) -> None:
        limit = "query parameter 'limit' must be an integer in 1..500"
        before = "query parameter 'before' must be an integer in 1..9223372036854775807"
        for query, message in (
            ("limit=0", limit),
            ("limit=501", limit),
            ("limit=abc", limit),
            ("limit=", limit),
            ("limit=-1", limit),
            ("limit=1&limit=2", "query parameter 'limit' must be given once"),
            ("before=0", before),
            ("before=x", before),
            (f"before={INT64_MAX + 1}", before),
        ):
            answer = await self.call("GET", f"/v1/admin/dead-letters?{query}", admin=ADMIN_KEY)
            self.assertError(answer, 400, "invalid", message)

    # -- routing ---------------------------------------------------------------------

    async def test_unknown_routes(self) -> None:
        token = self.token(1)
        # "/" is the web chat (tests/test_webchat.py).
        for path in (
            "/nope",
            "/healthz/",
            "/healthz/x",
            "/metrics/x",
            "/v1",
            "/v1/",
            "/v1/users",
            "/v1/users/",
            "/v1/users/42/",
            "/v1/users/42/profile",
            "/v1/users/me/x",
            "/v2/users/42",
            "/V1/users/42",
        ):
            answer = await self.call("GET", path, token=token)
            self.assertError(answer, 404, "not_found", "no such route")
        for path in ("/v1/admin/nope", "/v1/admin/users", "/v1/admin/users/", "/v1/admin/tokens/x"):
            answer = await self.call("GET", path, admin=ADMIN_KEY)
            self.assertError(answer, 404, "not_found", "no such route")

    async def test_wrong_methods(self) -> None:
        target = await self.user()
        cases = [
            ("POST", "/healthz", "GET, HEAD", {}),
            ("PUT", "/metrics", "GET, HEAD", {}),
            ("DELETE", f"/v1/users/{target}", "GET, HEAD", {"token": self.token(1)}),
            ("PUT", f"/v1/users/{target}", "GET, HEAD", {"token": self.token(1)}),
            ("GET", "/v1/users/me", "PUT", {"token": self.token(1)}),
            ("POST", "/v1/users/me", "PUT", {}),
            ("DELETE", f"/v1/admin/users/{target}", "GET, HEAD, PUT", {"admin": ADMIN_KEY}),
            ("GET", "/v1/admin/tokens", "POST", {"admin": ADMIN_KEY}),
            ("PUT", "/v1/admin/tokens", "POST", {"admin": ADMIN_KEY}),
            ("POST", "/v1/admin/dead-letters", "GET, HEAD", {"admin": ADMIN_KEY}),
        ]
        for method, path, allow, auth in cases:
            answer = await self.call(method, path, **auth)
            self.assertError(
                answer, 405, "method_not_allowed", f"{method} is not allowed here; use {allow}"
            )
            self.assertEqual(answer.header("Allow"), allow)
        # The route is checked before the method.
        answer = await self.call("DELETE", "/v1/nope")
        self.assertError(answer, 404, "not_found")

    # -- body size ---------------------------------------------------------------------

    async def test_body_over_the_limit(self) -> None:
        me = await self.user()
        answer = await self.call("PUT", "/v1/users/me", data=b" " * (BIG + 1), token=self.token(me))
        self.assertError(
            answer, 413, "payload_too_large", "the request body is larger than 65536 bytes"
        )
        self.assertEqual(self.site.refused, 1)
        # At the limit: read, parsed and judged on its fields.
        body = b'{"nickname": "' + b"n" * (BIG - 16) + b'"}'
        self.assertEqual(len(body), BIG)
        answer = await self.call("PUT", "/v1/users/me", data=body, token=self.token(me))
        self.assertError(answer, 400, "too_large")
        self.assertEqual(self.site.refused, 1)
        answer = await self.call("GET", "/healthz")
        self.assertEqual(answer.status, 200)

    async def test_content_length_refused_before_the_body(self) -> None:
        # 10 MB announced, nothing sent: the answer does not wait for the body.
        producer = Producer([], length=10_000_000, hold=True)
        answer = await self.call("POST", "/v1/admin/tokens", data=producer, admin=ADMIN_KEY)
        self.assertError(answer, 413, "payload_too_large")
        await eventually(lambda: producer.stopped)
        self.assertEqual(self.site.refused, 1)

    async def test_chunked_body_refused_while_it_arrives(self) -> None:
        # No length: counted as it arrives, refused once past the limit, even
        # though the body never ends.
        producer = Producer([b" " * 20000] * 4, length=UNKNOWN_LENGTH, hold=True)
        answer = await self.call("PUT", f"/v1/admin/users/{uid()}", data=producer, admin=ADMIN_KEY)
        self.assertError(answer, 413, "payload_too_large")
        await eventually(lambda: producer.stopped)
        # A chunked body under the limit is fine.
        target = uid()
        producer = Producer([b'{"nickname":', b' "chunked"}'], length=UNKNOWN_LENGTH)
        answer = await self.call("PUT", f"/v1/admin/users/{target}", data=producer, admin=ADMIN_KEY)
        self.assertAnswer(
            answer, 201, {"user": {"uid": target, "nickname": "chunked", "avatar": ""}}
        )
        self.assertEqual(self.site.refused, 1)

    async def connect_raw(self, proto: Raw) -> Any:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        return await within(endpoint.connect(Factory.forProtocol(lambda: proto)))

    async def raw(self, data: bytes) -> bytes:
        proto = Raw()
        connected = await self.connect_raw(proto)
        connected.transport.write(data)
        return await within(proto.closed)

    async def test_expect_continue_is_not_sent_for_a_refused_body(self) -> None:
        got = await self.raw(
            b"PUT /v1/users/me HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        head, _, body = got.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), got)
        self.assertIn(b"\r\nConnection: close\r\n", head + b"\r\n")
        self.assertIn(b"\r\nContent-Length: %d\r\n" % len(body), head + b"\r\n")
        self.assertNotIn(b"100 Continue", got)
        self.assertEqual(
            json.loads(body),
            {
                "error": "payload_too_large",
                "message": "the request body is larger than 65536 bytes",
            },
        )

    async def test_refused_client_that_keeps_sending_is_cut_off(self) -> None:
        await self.start(max_body=100)
        proto = Raw(keep_sending=True)
        connected = await self.connect_raw(proto)
        connected.transport.write(
            b"PUT /v1/users/me HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (60000, b"x" * 60000)
        sent = 0
        while not proto.closed.called and sent < 100:
            connected.transport.write(chunk)
            sent += 1
            await sleep(0.01)
        got = await within(proto.closed)
        self.assertTrue(got.startswith(b"HTTP/1.1 413 "), got)
        self.assertTrue(proto.eof)
        # Cut off after about LINGER_BYTES more (1 MiB: 18 chunks), not read forever.
        self.assertLess(sent, 40)
        self.assertGreater(sent, 10)

    async def test_refused_client_that_stalls_is_cut_off(self) -> None:
        self.patch(site_module, "LINGER_SECONDS", 0.2)
        proto = Raw(keep_sending=True)
        connected = await self.connect_raw(proto)
        started = reactor.seconds()
        connected.transport.write(
            b"PUT /v1/users/me HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{"
        )
        await eventually(lambda: proto.eof)
        self.assertTrue(proto.data.startswith(b"HTTP/1.1 413 "), proto.data)
        # The server gives up on the rest of the body after LINGER_SECONDS.
        await eventually(lambda: not self.server.protocols, timeout=5)
        self.assertLess(reactor.seconds() - started, 3)
        connected.transport.abortConnection()
        await within(proto.closed)

    # -- failures ----------------------------------------------------------------------

    async def test_database_unavailable(self) -> None:
        target = await self.user("erin")
        self.stack.store.db.close()
        for method, path, body, auth in (
            ("PUT", f"/v1/admin/users/{target}", {"nickname": "x"}, {"admin": ADMIN_KEY}),
            ("GET", f"/v1/admin/users/{uid()}", None, {"admin": ADMIN_KEY}),
            ("PUT", "/v1/users/me", {"nickname": "x"}, {"token": self.token(target)}),
        ):
            answer = await self.call(method, path, body, **auth)
            self.assertError(answer, 503, "unavailable")
            self.assertEqual(answer.header("Retry-After"), "1")

    async def test_unavailable_from_the_store(self) -> None:
        async def down(uid: int) -> int:
            raise Unavailable()

        self.patch(self.stack.store, "pending_count", down)
        target = await self.user()
        answer = await self.call("GET", f"/v1/admin/users/{target}", admin=ADMIN_KEY)
        self.assertError(answer, 503, "unavailable", "the service is temporarily unavailable")

    async def test_im_errors_map_to_statuses(self) -> None:
        me = await self.user()
        for code, status in (
            (ErrorCode.INVALID, 400),
            (ErrorCode.TOO_LARGE, 400),
            (ErrorCode.CONTENT_BLOCKED, 400),
            (ErrorCode.NOT_FOUND, 404),
            (ErrorCode.NO_SUCH_USER, 404),
            (ErrorCode.FORBIDDEN, 403),
            (ErrorCode.RATE_LIMITED, 429),
        ):

            async def fail(*args: Any, code: ErrorCode = code) -> Any:
                raise ImError(code, f"it is {code}")

            self.patch(self.stack.chat, "set_profile", fail)
            answer = await self.call("PUT", "/v1/users/me", {"nickname": "x"}, token=self.token(me))
            self.assertError(answer, status, str(code), f"it is {code}")

    async def test_unexpected_error_is_500_and_logged(self) -> None:
        async def broken() -> dict[str, str]:
            raise RuntimeError("boom")

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.patch(self.stack.store, "health", broken)
        answer = await self.call("GET", "/healthz")
        self.assertError(answer, 500, "internal", "internal server error")
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(logged.value), "boom")
        [event] = [e for e in events if e.get("log_failure") is not None]
        self.assertEqual((event["method"], event["path"]), ("GET", "/healthz"))
        # The server lives on.
        self.patch(self.stack.store, "health", lambda: _ok_health())
        answer = await self.call("GET", "/healthz")
        self.assertEqual(answer.status, 200)

    async def test_client_gone_before_the_answer(self) -> None:
        gate: Deferred[dict[str, str]] = Deferred()
        entered: list[bool] = []

        async def slow() -> dict[str, str]:
            entered.append(True)
            return await gate

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.patch(self.stack.store, "health", slow)
        pending = self.http_client().get(self.base + "/healthz")
        await eventually(lambda: entered)
        pending.cancel()
        with self.assertRaises(ResponseNeverReceived):
            await within(pending)
        await eventually(lambda: not self.server.protocols)
        gate.callback({"sql": "ok", "redis": "embedded"})
        left = [e for e in events if "client left" in e.get("log_format", "")]
        self.assertEqual([(e["path"], e["status"]) for e in left], [("/healthz", 200)])
        self.assertEqual(self.flushLoggedErrors(), [])


async def _ok_health() -> dict[str, str]:
    return {"sql": "ok", "redis": "embedded"}


class ApiRedisTests(HttpMixin, TestCase):
    """The site on SQLite + a private Redis that goes away."""

    timeout = 60

    async def test_healthz_redis_down(self) -> None:
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        stack = await make_stack(self, "sqlite-redis", redis=redis)
        _, _, port = await serve(self, stack, TokenService(SECRET), stack.presence)
        self.base = f"http://127.0.0.1:{port}"
        self.assertAnswer(
            await self.call("GET", "/healthz"), 200, {"status": "ok", "sql": "ok", "redis": "ok"}
        )
        redis.stop()
        self.assertAnswer(
            await self.call("GET", "/healthz"),
            503,
            {"status": "degraded", "sql": "ok", "redis": "down", "redis_circuit": "open"},
        )
        redis.start()

        async def healthy() -> bool:
            return (await self.call("GET", "/healthz")).status == 200

        await eventually(healthy, timeout=20)


class E2EMixin(HttpMixin):
    _server: ServerProcess | None = None
    sections: dict[str, dict[str, Any]] = {}

    @property
    def server(self) -> ServerProcess:
        cls = type(self)
        if cls._server is None or not cls._server.running:
            cls._server = ServerProcess(self.sections).start()
        return cls._server

    @property
    def admin(self) -> str:
        return str(self.server.config["auth"]["admin_key"])

    def setUp(self) -> None:
        self.base = f"http://127.0.0.1:{self.server.http_port}"


class HttpE2ETests(E2EMixin, ClientsMixin, TestCase):
    """C{twistd -n imserver} on its embedded backend."""

    timeout = 120

    async def test_healthz_and_metrics(self) -> None:
        self.assertAnswer(
            await self.call("GET", "/healthz"),
            200,
            {"status": "ok", "sql": "ok", "redis": "embedded", "node": 1},
        )
        answer = await self.call("GET", "/metrics")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("Content-Type"), CONTENT_TYPE)
        self.assertIn(b"\nimserver_connections ", answer.body)
        self.assertIn(b'imserver_sql_transactions_total{pool="realtime",result="ok"}', answer.body)
        self.assertIn(
            b'imserver_sql_lost_commits_total{outcome="committed",pool="realtime"}', answer.body
        )
        self.assertIn(b'imserver_http_requests_total{code="200"}', answer.body)

    async def test_admin_and_client_routes(self) -> None:
        alice, bob = uid(), uid()
        answer = await self.call(
            "PUT", f"/v1/admin/users/{bob}", {"nickname": "bob"}, admin=self.admin
        )
        self.assertAnswer(answer, 201, {"user": {"uid": bob, "nickname": "bob", "avatar": ""}})
        answer = await self.call("POST", "/v1/admin/tokens", {"uid": alice}, admin=self.admin)
        self.assertEqual(answer.status, 200)
        token = answer.json()["token"]

        # The minted token logs in on the TCP gateway (creating alice).
        client = await self.client(self.server.endpoint, token)
        self.assertEqual(client.uid, alice)
        answer = await self.call("GET", f"/v1/admin/users/{alice}", admin=self.admin)
        self.assertAnswer(
            answer,
            200,
            {"uid": alice, "nickname": "", "avatar": "", "online": True, "pending": 0},
        )
        await within(client.request("send", to=bob, cid="http-e2e-1", body="hi"))
        answer = await self.call("GET", f"/v1/admin/users/{bob}", admin=self.admin)
        self.assertAnswer(
            answer,
            200,
            {"uid": bob, "nickname": "bob", "avatar": "", "online": False, "pending": 1},
        )

        answer = await self.call("PUT", "/v1/users/me", {"nickname": "alice"}, token=token)
        self.assertAnswer(answer, 200, {"user": {"uid": alice, "nickname": "alice", "avatar": ""}})
        answer = await self.call("GET", f"/v1/users/{alice}", token=self.server.token(bob))
        self.assertAnswer(answer, 200, {"uid": alice, "nickname": "alice", "avatar": ""})
        # The TCP side sees the same profile.
        reply = await within(client.request("profile", uids=[alice, bob]))
        self.assertEqual(
            reply["users"],
            [
                {"uid": alice, "nickname": "alice", "avatar": ""},
                {"uid": bob, "nickname": "bob", "avatar": ""},
            ],
        )

    async def test_errors(self) -> None:
        self.assertError(await self.call("GET", "/v1/users/1"), 401, "unauthorized")
        self.assertError(
            await self.call("GET", "/v1/admin/dead-letters", admin="wrong"), 403, "forbidden"
        )
        self.assertAnswer(
            await self.call("GET", "/v1/admin/dead-letters", admin=self.admin),
            200,
            {"dead_letters": [], "more": False},
        )
        self.assertError(await self.call("GET", "/nope"), 404, "not_found")
        answer = await self.call("DELETE", "/healthz")
        self.assertError(answer, 405, "method_not_allowed")
        self.assertEqual(answer.header("Allow"), "GET, HEAD")
        answer = await self.call(
            "POST", "/v1/admin/tokens", data=b"{" + b" " * BIG + b"}", admin=self.admin
        )
        self.assertError(answer, 413, "payload_too_large")
        self.assertError(
            await self.call("POST", "/v1/admin/tokens", data=b"{", admin=self.admin),
            400,
            "invalid",
        )


class HttpMariaRedisE2ETests(E2EMixin, TestCase):
    """C{twistd -n imserver} on MariaDB + Redis."""

    timeout = 120

    @property
    def server(self) -> ServerProcess:
        cls = type(self)
        if cls._server is None or not cls._server.running:
            sections = {
                "storage": {
                    "sql": shared_mariadb().fresh_database(),
                    "redis": shared_redis().url,
                    "key_prefix": fresh_prefix(),
                }
            }
            cls._server = ServerProcess(sections).start()
        return cls._server

    async def test_healthz(self) -> None:
        # With Redis the node is part of a cluster: its pub/sub channel counts.
        self.assertAnswer(
            await self.call("GET", "/healthz"),
            200,
            {"status": "ok", "sql": "ok", "redis": "ok", "pubsub": "ok", "node": 1},
        )

    async def test_profile_round_trip(self) -> None:
        me = uid()
        answer = await self.call(
            "PUT", f"/v1/admin/users/{me}", {"nickname": "frank"}, admin=self.admin
        )
        self.assertAnswer(answer, 201, {"user": {"uid": me, "nickname": "frank", "avatar": ""}})
        token = (
            await self.call("POST", "/v1/admin/tokens", {"uid": me, "ttl": 600}, admin=self.admin)
        ).json()["token"]
        answer = await self.call(
            "PUT",
            "/v1/users/me",
            {"nickname": "frankie", "avatar": "https://img/f.png"},
            token=token,
        )
        expected = {"uid": me, "nickname": "frankie", "avatar": "https://img/f.png"}
        self.assertAnswer(answer, 200, {"user": expected})
        self.assertAnswer(await self.call("GET", f"/v1/users/{me}", token=token), 200, expected)
        answer = await self.call("GET", f"/v1/admin/users/{me}", admin=self.admin)
        self.assertAnswer(answer, 200, {**expected, "online": False, "pending": 0})

        # Written to MariaDB and to the Redis profile cache.
        storage = self.server.config["storage"]
        database = storage["sql"].rsplit("/", 1)[1]
        row = shared_mariadb().sql(
            f"SELECT nickname, avatar FROM t_user WHERE uid = {me}", database
        )
        self.assertEqual(row, "frankie\thttps://img/f.png\n")
        cached = shared_redis().command("HGET", f"{storage['key_prefix']}:user:{me}", "n")
        self.assertEqual(cached, b"$7\r\nfrankie\r\n")
