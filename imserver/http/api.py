"""
The short-connection HTTP API: health, metrics, profiles, and the admin
routes (users, tokens, dead letters). docs/http.md is its reference.

    GET  /healthz                  backends' health (200 or 503)
    GET  /metrics                  Prometheus text
    GET  /v1/users/{uid}           a profile                     (Bearer token)
    PUT  /v1/users/me              update one's own profile      (Bearer token)
    GET  /v1/admin/users/{uid}     profile, presence, pending    (X-Admin-Key)
    PUT  /v1/admin/users/{uid}     create or update a user       (X-Admin-Key)
    GET  /v1/admin/users/{uid}/devices         the user's devices        (X-Admin-Key)
    POST /v1/admin/users/{uid}/devices/revoke  kick one, refuse its tokens (X-Admin-Key)
    GET  /v1/admin/users/{uid}/blocks          whom the user blocks      (X-Admin-Key)
    PUT  /v1/admin/users/{uid}/blocks/{other}  block other               (X-Admin-Key)
    DELETE /v1/admin/users/{uid}/blocks/{other}  unblock other           (X-Admin-Key)
    POST /v1/admin/tokens          mint a client token           (X-Admin-Key)
    GET  /v1/admin/dead-letters    dead letters, newest first    (X-Admin-Key)
    GET  /v1/web/config            where the web chat's WebSocket is
    GET  /, /app.js, /app.css      the web chat (imserver.http.web)

L{make_site} builds the L{twisted.web.server.Site}; the composition root
(L{imserver.server}) listens on it. Every collaborator, the clock included,
is passed in.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource
from twisted.web.server import Request

from imserver.chat.service import ChatService
from imserver.errors import ErrorCode
from imserver.http.resource import (
    Call,
    Endpoint,
    Handler,
    HttpError,
    JsonResource,
    NotFound,
    Refuse,
    Reply,
    Responder,
    json_reply,
)
from imserver.http.site import MAX_BODY, ApiSite
from imserver.http.web import WebConfig, WebSocketPlace, add_static
from imserver.metrics import CONTENT_TYPE, Metrics
from imserver.services.presence import IPresence
from imserver.services.tokens import INT64_MAX, MAX_DEVICE, InvalidToken, TokenService
from imserver.storage.model import DeadLetter, Profile
from imserver.storage.store import Store

NICKNAME_MAX = 64
AVATAR_MAX = 512
DEFAULT_TTL_SECONDS = 86400
MAX_TTL_SECONDS = 30 * 86400
DEFAULT_DEAD_LETTERS = 50
MAX_DEAD_LETTERS = 500
DEFAULT_BLOCKED = 100
MAX_BLOCKED = 500

_POSITIVE = re.compile(rb"[1-9][0-9]{0,18}")
_DIGITS = re.compile(rb"[0-9]{1,19}")


class Api(Responder):
    """The collaborators of the routes, and the checks they share."""

    def __init__(
        self,
        *,
        chat: ChatService,
        store: Store,
        tokens: TokenService,
        presence: IPresence,
        admin_key: str,
        metrics: Metrics,
        clock: IReactorTime,
        pubsub: Callable[[], str] | None = None,
        node: int | None = None,
    ) -> None:
        self.pubsub = pubsub
        self.node = node
        self.chat = chat
        self.store = store
        self.tokens = tokens
        self.presence = presence
        self._admin_key = admin_key.encode()
        self.metrics = metrics
        self.clock = clock

    def authenticate(self, call: Call) -> int:
        """The uid of the request's Bearer token, or 401."""
        raw = call.header(b"Authorization")
        if raw is None:
            raise _unauthorized("missing Authorization: Bearer TOKEN")
        scheme, _, token = raw.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token or not token.isascii():
            raise _unauthorized("the Authorization header must be 'Bearer TOKEN'")
        try:
            return self.tokens.verify(token.decode("ascii"), now=self.clock.seconds())
        except InvalidToken as e:
            raise _unauthorized(e.message, b'Bearer error="invalid_token"') from None

    def admin_refusal(self, request: Request) -> HttpError | None:
        """None if the request carries the admin key, else the 403 to answer."""
        given: bytes | None = request.getHeader(b"X-Admin-Key")
        if given is None:
            return HttpError(403, ErrorCode.FORBIDDEN, "missing X-Admin-Key header")
        if not hmac.compare_digest(given, self._admin_key):
            return HttpError(403, ErrorCode.FORBIDDEN, "wrong admin key")
        return None

    async def profile(self, uid: int) -> Profile:
        found = await self.chat.profiles.get([uid])
        if uid not in found:
            raise HttpError(404, ErrorCode.NO_SUCH_USER, f"user {uid} does not exist")
        return found[uid]


# ---------------------------------------------------------------------------
# Input checks: each raises HttpError 400 naming what is wrong.


def _unauthorized(message: str, challenge: bytes = b"Bearer") -> HttpError:
    return HttpError(401, "unauthorized", message, ((b"WWW-Authenticate", challenge),))


def _invalid(message: str) -> HttpError:
    return HttpError(400, ErrorCode.INVALID, message)


def path_uid(segment: bytes) -> int:
    """A uid from the path: a positive int64 in canonical decimal."""
    if _POSITIVE.fullmatch(segment) and int(segment) <= INT64_MAX:
        return int(segment)
    shown = segment[:40].decode("utf-8", "replace")
    raise _invalid(f"the uid in the path must be a positive int64, not {shown!r}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def json_object(body: bytes, fields: frozenset[str]) -> dict[str, Any]:
    """The body as a JSON object whose keys are all among C{fields}."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise _invalid("the body must be UTF-8")
    except (ValueError, RecursionError) as e:
        raise _invalid(f"the body is not valid JSON: {e}")
    if not isinstance(value, dict):
        raise _invalid("the body must be a JSON object")
    unknown = sorted(set(value) - fields)
    if unknown:
        raise _invalid(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    return value


def opt_str(obj: Mapping[str, Any], key: str, max_len: int) -> str | None:
    """An optional string field; absent or null gives None."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str:
        raise _invalid(f"field {key!r} must be a string")
    if len(value) > max_len:
        raise HttpError(
            400, ErrorCode.TOO_LARGE, f"field {key!r} must have at most {max_len} characters"
        )
    return value


def int_field(obj: Mapping[str, Any], key: str, lo: int, hi: int, default: int | None) -> int:
    """An integer field in C{lo..hi}; required when C{default} is None."""
    value = obj.get(key)
    if value is None:
        if default is None:
            raise _invalid(f"field {key!r} is required")
        return default
    if type(value) is not int or not lo <= value <= hi:
        raise _invalid(f"field {key!r} must be an integer in {lo}..{hi}")
    return value


def query_int(request: Request, key: str, lo: int, hi: int, default: int | None) -> int | None:
    """An integer query parameter in C{lo..hi}, given at most once."""
    values = (request.args or {}).get(key.encode(), [])
    if not values:
        return default
    if len(values) > 1:
        raise _invalid(f"query parameter {key!r} must be given once")
    raw = values[0]
    if not _DIGITS.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise _invalid(f"query parameter {key!r} must be an integer in {lo}..{hi}")
    return int(raw)


def profile_fields(body: bytes) -> tuple[str | None, str | None]:
    obj = json_object(body, frozenset({"nickname", "avatar"}))
    return opt_str(obj, "nickname", NICKNAME_MAX), opt_str(obj, "avatar", AVATAR_MAX)


# ---------------------------------------------------------------------------
# Routes


class ApiResource(JsonResource):
    """A resource of this API: its routes reach the collaborators as C{self.api}."""

    def __init__(self, api: Api) -> None:
        super().__init__(api)
        self.api = api


class ApiEndpoint(Endpoint):
    """An endpoint of this API (see L{ApiResource})."""

    def __init__(self, api: Api) -> None:
        super().__init__(api)
        self.api = api


class Health(ApiEndpoint):
    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"GET": self.get}

    async def get(self, call: Call) -> Reply:
        status = await self.api.store.health()
        if self.api.pubsub is not None:
            status["pubsub"] = self.api.pubsub()
        healthy = (
            status.get("sql") == "ok"
            and status.get("redis") in ("ok", "embedded")
            and status.get("pubsub", "ok") == "ok"
        )
        body: dict[str, Any] = {"status": "ok" if healthy else "degraded", **status}
        if self.api.node is not None:
            body["node"] = self.api.node
        return json_reply(body, 200 if healthy else 503)


class MetricsPage(ApiEndpoint):
    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"GET": self.get}

    async def get(self, call: Call) -> Reply:
        return Reply(200, self.api.metrics.render(), CONTENT_TYPE.encode())


class Users(ApiResource):
    """C{/v1/users/}: C{me} or a uid."""

    def __init__(self, api: Api) -> None:
        super().__init__(api)
        self.putChild(b"me", Me(api))

    def getChild(self, path: bytes, request: Request) -> IResource:
        if not path:
            return NotFound(self.api)
        return User(self.api, path)


class User(ApiEndpoint):
    """C{/v1/users/{uid}}: read a profile."""

    def __init__(self, api: Api, segment: bytes) -> None:
        super().__init__(api)
        self.segment = segment

    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"GET": self.get}

    async def get(self, call: Call) -> Reply:
        self.api.authenticate(call)
        profile = await self.api.profile(path_uid(self.segment))
        return json_reply(profile.public())


class Me(ApiEndpoint):
    """C{/v1/users/me}: update one's own profile."""

    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"PUT": self.put}

    async def put(self, call: Call) -> Reply:
        uid = self.api.authenticate(call)
        nickname, avatar = profile_fields(call.body)
        if nickname is None and avatar is None:
            raise _invalid("give 'nickname', 'avatar' or both")
        return json_reply(await self.api.chat.set_profile(uid, nickname, avatar))


class Admin(ApiResource):
    """C{/v1/admin/}: nothing below it answers without the admin key."""

    def __init__(self, api: Api) -> None:
        super().__init__(api)
        self.putChild(b"users", AdminUsers(api))
        self.putChild(b"tokens", Tokens(api))
        self.putChild(b"dead-letters", DeadLetters(api))

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        refusal = self.api.admin_refusal(request)
        if refusal is not None:
            return Refuse(self.api, refusal)
        child: IResource = super().getChildWithDefault(path, request)
        return child

    def render(self, request: Request) -> int:
        refusal = self.api.admin_refusal(request)
        if refusal is not None:
            return Refuse(self.api, refusal).render(request)
        return super().render(request)


class AdminUsers(ApiResource):
    def getChild(self, path: bytes, request: Request) -> IResource:
        if not path:
            return NotFound(self.api)
        return AdminUser(self.api, path)


class AdminUser(ApiEndpoint):
    """C{/v1/admin/users/{uid}}: inspect, create or update a user."""

    def __init__(self, api: Api, segment: bytes) -> None:
        super().__init__(api)
        self.segment = segment

    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"GET": self.get, b"PUT": self.put}

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"devices":
            return AdminDevices(self.api, self.segment)
        if path == b"blocks":
            return AdminBlocks(self.api, self.segment)
        return NotFound(self.api)

    async def get(self, call: Call) -> Reply:
        uid = path_uid(self.segment)
        profile = await self.api.profile(uid)
        pending = await self.api.store.pending_count(uid)
        online = await self.api.presence.online(uid)
        return json_reply({**profile.public(), "online": online, "pending": pending})

    async def put(self, call: Call) -> Reply:
        uid = path_uid(self.segment)
        nickname, avatar = profile_fields(call.body)
        profile, created = await self.api.chat.upsert_user(uid, nickname, avatar)
        if created:
            location = b"/v1/users/%d" % uid
            return json_reply({"user": profile.public()}, 201, ((b"Location", location),))
        return json_reply({"user": profile.public()})


class AdminDevices(ApiEndpoint):
    """C{/v1/admin/users/{uid}/devices}: the user's devices, online or not."""

    def __init__(self, api: Api, segment: bytes) -> None:
        super().__init__(api)
        self.segment = segment

    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"GET": self.get}

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"revoke":
            return AdminRevoke(self.api, self.segment)
        return NotFound(self.api)

    async def get(self, call: Call) -> Reply:
        uid = path_uid(self.segment)
        await self.api.profile(uid)  # 404 for a user that does not exist
        return json_reply(await self.api.chat.devices_of(uid))


class AdminRevoke(ApiEndpoint):
    """
    C{/v1/admin/users/{uid}/devices/revoke} C{{"device": NAME}}: the device is
    kicked (C{revoked}) wherever it is connected, and the tokens issued
    before now are refused for it; a token minted afterwards works again.
    """

    def __init__(self, api: Api, segment: bytes) -> None:
        super().__init__(api)
        self.segment = segment

    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"POST": self.post}

    async def post(self, call: Call) -> Reply:
        uid = path_uid(self.segment)
        obj = json_object(call.body, frozenset({"device"}))
        device = opt_str(obj, "device", MAX_DEVICE)
        if not device:
            raise _invalid("give 'device', the device's name")
        if not await self.api.chat.revoke_device(uid, device):
            raise HttpError(
                404, ErrorCode.NOT_FOUND, f"user {uid} has no device {device[:MAX_DEVICE]!r}"
            )
        return json_reply({"revoked": True})


class AdminBlocks(ApiEndpoint):
    """C{/v1/admin/users/{uid}/blocks?after=&limit=}: whom the user blocks, ascending."""

    def __init__(self, api: Api, segment: bytes) -> None:
        super().__init__(api)
        self.segment = segment

    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"GET": self.get}

    def getChild(self, path: bytes, request: Request) -> IResource:
        if not path:
            return NotFound(self.api)
        return AdminBlock(self.api, self.segment, path)

    async def get(self, call: Call) -> Reply:
        uid = path_uid(self.segment)
        limit = query_int(call.request, "limit", 1, MAX_BLOCKED, DEFAULT_BLOCKED)
        assert limit is not None
        after = query_int(call.request, "after", 0, INT64_MAX, 0)
        assert after is not None
        await self.api.profile(uid)  # 404 for a user that does not exist
        return json_reply(await self.api.chat.blocks.blocked(uid, after, limit))


class AdminBlock(ApiEndpoint):
    """
    C{/v1/admin/users/{uid}/blocks/{other}}: C{PUT} blocks, C{DELETE}
    unblocks, as the user's own C{block} and C{unblock} ops do (the user's
    devices are told, every node's cache learns it); both idempotent.
    """

    def __init__(self, api: Api, segment: bytes, other: bytes) -> None:
        super().__init__(api)
        self.segment = segment
        self.other = other

    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"PUT": self.put, b"DELETE": self.delete}

    def _pair(self, call: Call) -> tuple[int, int]:
        if call.body.strip():
            json_object(call.body, frozenset())
        return path_uid(self.segment), path_uid(self.other)

    async def put(self, call: Call) -> Reply:
        uid, other = self._pair(call)
        await self.api.chat.blocks.block(uid, other)
        return json_reply({"blocked": True})

    async def delete(self, call: Call) -> Reply:
        uid, other = self._pair(call)
        await self.api.profile(uid)  # 404 for a user that does not exist
        await self.api.chat.blocks.unblock(uid, other)
        return json_reply({"blocked": False})


class Tokens(ApiEndpoint):
    """C{/v1/admin/tokens}: mint a client token (bound to a device if one is given)."""

    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"POST": self.post}

    async def post(self, call: Call) -> Reply:
        obj = json_object(call.body, frozenset({"uid", "ttl", "device"}))
        uid = int_field(obj, "uid", 1, INT64_MAX, None)
        ttl = int_field(obj, "ttl", 1, MAX_TTL_SECONDS, DEFAULT_TTL_SECONDS)
        device = opt_str(obj, "device", MAX_DEVICE)
        if device == "":
            raise _invalid("'device' must not be empty")
        token = self.api.tokens.mint(
            uid, now=self.api.clock.seconds(), ttl_seconds=ttl, device=device
        )
        return json_reply({"token": token})


class DeadLetters(ApiEndpoint):
    """C{/v1/admin/dead-letters?limit=&before=}: newest first, paged by id."""

    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"GET": self.get}

    async def get(self, call: Call) -> Reply:
        limit = query_int(call.request, "limit", 1, MAX_DEAD_LETTERS, DEFAULT_DEAD_LETTERS)
        assert limit is not None
        before = query_int(call.request, "before", 1, INT64_MAX, None)
        rows = await self.api.store.dead_letters(before, limit + 1)
        return json_reply(
            {"dead_letters": [dead_letter(d) for d in rows[:limit]], "more": len(rows) > limit}
        )


def dead_letter(d: DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id,
        "kind": d.kind,
        "ref": d.ref,
        "error": d.error,
        "attempts": d.attempts,
        "created_at": d.created_at,
        "payload": base64.b64encode(d.payload).decode("ascii"),
    }


def make_site(
    *,
    chat: ChatService,
    store: Store,
    tokens: TokenService,
    presence: IPresence,
    admin_key: str,
    metrics: Metrics,
    clock: IReactorTime,
    max_body: int = MAX_BODY,
    pubsub: Callable[[], str] | None = None,
    node: int | None = None,
    websocket: Callable[[], WebSocketPlace | None] = lambda: None,
    websocket_origins: tuple[str, ...] = (),
    recall_seconds: int = 120,
) -> ApiSite:
    """
    The API's site.

    @param pubsub: the state of this node's pub/sub subscription (C{ok} or
        C{down}) in a cluster; part of the health.
    @param node: this node's id, shown by C{/healthz} (which node of a
        cluster, or worker of a machine, answered).
    @param clock: the reactor (or a L{twisted.internet.task.Clock}): token
        times, and the site's own timers (idle connections, refused bodies).
    @param websocket: where the WebSocket listener is (None: off), asked
        per request of C{/v1/web/config}, since it listens after the site is made.
    @param websocket_origins: its origin allow-list; the web chat's own
        origin must be in it (else the config says so).
    """
    api = Api(
        chat=chat,
        store=store,
        tokens=tokens,
        presence=presence,
        admin_key=admin_key,
        metrics=metrics,
        clock=clock,
        pubsub=pubsub,
        node=node,
    )
    root = JsonResource(api)
    root.putChild(b"healthz", Health(api))
    root.putChild(b"metrics", MetricsPage(api))
    v1 = JsonResource(api)
    root.putChild(b"v1", v1)
    v1.putChild(b"users", Users(api))
    v1.putChild(b"admin", Admin(api))
    web = JsonResource(api)
    v1.putChild(b"web", web)
    web.putChild(
        b"config",
        WebConfig(
            api,
            websocket=websocket,
            origins=websocket_origins,
            recall_seconds=recall_seconds,
        ),
    )
    add_static(root)
    return ApiSite(root, clock=clock, max_body=max_body)
