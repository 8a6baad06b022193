"""
The high-level client (docs/sdk.md): one connection per device, kept up
with heartbeats and jittered reconnects, caught up after every connect,
events de-duplicated and acked, sends queued in an outbox and retried with
the same cid.

    client = Client("tcp://127.0.0.1:7000", token, store=JSONFileStore(path))
    client.on("message", lambda e: print(e.msg["body"]))
    client.start()
    await client.wait_live()
    await client.send(7, "hello")
    await client.close()
"""

from __future__ import annotations

import inspect
import random as _random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import imserver
from imserver.client.backoff import Backoff, RandomSource
from imserver.client.connection import Connection
from imserver.client.events import (
    NAMES,
    Edit,
    Event,
    Message,
    Push,
    Recall,
    Reset,
    StateChanged,
    from_frame,
)
from imserver.client.outbox import Entry, Outbox, random_id
from imserver.client.protocol import IMClientProtocol, RequestFailed, client_error, connect
from imserver.client.store import MemoryStore, Store
from imserver.client.stream import LRU, Position
from imserver.client.websocket import connect_ws
from imserver.wire.codec import pack

log = Logger()

Result = dict[str, Any]
Token = str | Callable[[], "str | Awaitable[str]"]
#: (reactor, url) -> an unauthenticated IMClientProtocol, or a Deferred / awaitable of one.
Connector = Callable[[Any, str], Any]
Handler = Callable[[Any], Any]

CONNECTING = "connecting"
SYNCING = "syncing"
LIVE = "live"
OFFLINE = "offline"
KICKED = "kicked"
FAILED = "failed"
CLOSED = "closed"
TERMINAL = frozenset({KICKED, FAILED, CLOSED})

#: Push types that are events of the user's stream (they carry its seq).
STREAM = frozenset({"msg", "read", "recall", "edit", "hide", "clear", "mute"})
#: Pushes known not to be of the stream: any other type with an int seq (a
#: newer server's stream event) advances the seq like a known one, so it is
#: acked and later seqs are no gap.
NOT_STREAM = frozenset(
    {"delivered", "typing", "presence", "profile", "block", "kick", "sync", "goaway", "error"}
)
#: Replies that carry the caller's seq of the event they made.
SEQ_REPLIES = frozenset({"send", "read", "recall", "edit", "hide", "clear", "mute"})

ACK_DELAY = 1.0
ACK_BATCH = 100
#: A failing ack (error or no answer) is retried after 1 s doubling to 30 s
#: (half jitter), back to ACK_DELAY once one succeeds.
ACK_RETRY_BASE = 1.0
ACK_RETRY_MAX = 30.0
GAP_DELAY = 3.0
CATCHUP_LIMIT = 500
SYNC_LIMIT = 100
DEFAULT_HEARTBEAT = 30.0
CLOSE_TIMEOUT = 5.0
GOAWAY_CLOSE = 5.0
#: The largest request id a frame size is reckoned with (msgpack uint32).
_ID_BOUND = 2**32 - 1


def _version() -> str:
    return f"imserver-py/{imserver.__version__}"


def connect_url(reactor: Any, url: str, origin: str | None = None) -> Deferred[IMClientProtocol]:
    """
    Open an unauthenticated connection: C{ws://} and C{wss://} URLs over
    WebSocket, C{tcp://host:port} URLs and Twisted endpoint strings over TCP.
    """
    if url.startswith(("ws://", "wss://")):
        return maybeDeferred(connect_ws, reactor, url, origin=origin)
    return Deferred.fromCoroutine(connect(reactor, url))


class Client:
    """
    @param url: C{tcp://host:port}, a Twisted client endpoint string
        (C{tcp:127.0.0.1:7000}, C{tls:...}), or C{ws://} / C{wss://}.
    @param token: a token, or a callable returning one (or a Deferred or
        awaitable of one), called before every connect.
    @param reactor: the reactor (connections and every timer: a
        L{twisted.internet.task.Clock} in tests, with C{connector}).
    @param connector: C{(reactor, url) -> IMClientProtocol} (a Deferred or
        awaitable of one), unauthenticated; default L{connect_url}.
    @param random: the jitter and id source (an object with C{random()}).
    @param max_frame_bytes: the server's C{max_frame_bytes} (its config;
        default 65536). A request whose frame is larger fails with
        C{too_large} without being sent: the server would close the
        connection, and a send would be retried for ever. A C{frame_too_large}
        from the server lowers it below the largest frame then in flight.
    """

    def __init__(
        self,
        url: str,
        token: Token,
        *,
        device: str | None = None,
        client: str | None = None,
        store: Store | None = None,
        request_timeout: float = 15.0,
        ping_timeout: float = 10.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        reactor: Any = None,
        connector: Connector | None = None,
        random: RandomSource | None = None,
        origin: str | None = None,
        max_frame_bytes: int = 65536,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.url = url
        self.reactor: Any = reactor
        self.request_timeout = request_timeout
        self.ping_timeout = ping_timeout
        self.max_frame_bytes = max_frame_bytes
        self.client_name = client or _version()
        self._token = token
        self._origin = origin
        self._connector = connector
        self._rng: RandomSource = random if random is not None else _random.SystemRandom()
        self._backoff = Backoff(backoff_base, backoff_max, self._rng)
        self._store: Store = store if store is not None else MemoryStore()
        #: The end-of-turn save scheduled by L{_save}, if any.
        self._save_call: IDelayedCall | None = None
        use_reactor = getattr(self._store, "use_reactor", None)
        if use_reactor is not None:
            use_reactor(reactor)  # JSONFileStore: written in its threads

        saved = self._store.load() or {}
        saved_device = saved.get("device") if isinstance(saved.get("device"), str) else None
        self._device: str = device or saved_device or "py-" + random_id(self._rng, 12)
        # The state belongs to the user, not the device: another device name
        # keeps the seq and the outbox (cids are unique strings); only another
        # uid (checked at auth) discards them.
        saved_uid = saved.get("uid")
        self._saved_uid: int | None = saved_uid if isinstance(saved_uid, int) else None
        self._position = Position(int(saved.get("seq", 0)))
        self._acked_seq = self._position.seq

        self._state = OFFLINE
        self._reason: str | None = None
        self._uid: int | None = None
        self._started = False
        self._conn: Connection | None = None
        self._opening: Deferred[Any] | None = None
        self._sleeping: dict[Deferred[None], IDelayedCall] = {}
        self._live_waiters: list[Deferred[Connection]] = []
        self._handlers: dict[str, list[Handler]] = {}

        self._msgs = LRU()
        self._edits = LRU()
        self._recalls = LRU()
        self._ack_ids: list[int] = []
        self._ack_timer: IDelayedCall | None = None
        self._ack_retry = Backoff(ACK_RETRY_BASE, ACK_RETRY_MAX, self._rng)
        #: Acks failed in a row on a live connection (the backoff's attempt).
        self._ack_failures = 0
        self._gap_timer: IDelayedCall | None = None
        self._resyncing = False
        self._resync_again = False
        self._resync_sync = False
        self._watched: list[int] = []

        self._outbox = Outbox(
            self._device, self._rng, self._transmit, self._sleep, self._backoff, self._save
        )
        self._outbox.restore(saved.get("outbox", []))
        self._save_now()

    # -- properties

    @property
    def state(self) -> str:
        return self._state

    @property
    def uid(self) -> int | None:
        """The authenticated uid (None before the first auth)."""
        return self._uid

    @property
    def device(self) -> str:
        return self._device

    @property
    def seq(self) -> int:
        """The highest contiguous seq of the user's stream this client has."""
        return self._position.seq

    @property
    def outbox(self) -> list[Result]:
        """The sends not answered yet: C{{cid, to, type, body}} each, in order per peer."""
        return self._outbox.state()

    # -- lifecycle

    def start(self) -> None:
        """Connect, and keep connecting until L{close} (or a kick, or a refused token)."""
        if self._started:
            return
        self._started = True
        self._outbox.start()
        d = Deferred.fromCoroutine(self._run())
        d.addErrback(lambda f: log.failure("the client's connection loop failed", f))

    def wait_live(self, timeout: float | None = None) -> Deferred[None]:
        """Fires once live (at once if live); fails on kicked / failed / closed or timeout."""
        d = self._when_live(timeout)
        return d.addCallback(lambda _: None)

    def close(self) -> Deferred[None]:
        """Stop: acks flushed, the connection closed, waiters and sends rejected (C{closed})."""
        if self._state == CLOSED:
            return succeed(None)
        conn = self._conn
        if conn is not None and conn.authed and not conn.gone:
            self._flush_acks()
        self._finish(CLOSED, None)
        if self._opening is not None:
            self._opening.cancel()
        self._wake()
        if conn is not None and not conn.gone:
            return self._close_connection(conn)
        return succeed(None)

    def _close_connection(self, conn: Connection) -> Deferred[None]:
        """Close politely (queued writes go out first); abort if that takes 5 s."""
        done: Deferred[None] = Deferred()
        transport = getattr(conn.proto, "transport", None)
        abort = getattr(transport, "abortConnection", None)
        timer = self.reactor.callLater(CLOSE_TIMEOUT, abort) if abort is not None else None

        def closed(_: object) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            done.callback(None)

        conn.proto.close().addBoth(closed)
        conn.gone_now(client_error("closed", "the client is closed"))
        return done

    def on(self, name: str, handler: Handler) -> Callable[[], None]:
        """Call C{handler(event)} for every C{name} event; returns the unsubscriber."""
        if name not in NAMES:
            raise ValueError(f"unknown event {name!r} (one of {', '.join(sorted(NAMES))})")
        handlers = self._handlers.setdefault(name, [])
        handlers.append(handler)

        def off() -> None:
            if handler in handlers:
                handlers.remove(handler)

        return off

    # -- requests

    def request(self, op: str, **fields: Any) -> Deferred[Result]:
        """Any op: the ok reply's fields (without C{t}, C{id}), once live."""
        return Deferred.fromCoroutine(self._call(op, fields))

    def send(self, to: int, body: Any, type: str | None = None) -> Deferred[Result]:
        """
        Queue a message (the outbox): fires with C{msg_id, session_id, ts,
        dup, seq} once the server stored it, however many reconnects that takes.
        """
        d: Deferred[Result] = Deferred()
        entry = Entry(self._outbox.new_cid(), to, body, type, d)
        try:
            self._check_size(entry)
            self._outbox.add(entry)
        except RequestFailed as e:
            return fail(e)
        return d

    def _check_size(self, entry: Entry) -> None:
        """Refuse at once a send the server could not read (it would close the connection)."""
        try:
            size = len(pack({"t": "send", "id": _ID_BOUND, **_send_fields(entry)}))
        except (TypeError, ValueError, OverflowError) as e:
            raise client_error("invalid", f"the body cannot be encoded: {e}") from e
        if size > self.max_frame_bytes:
            raise client_error(
                "too_large",
                f"a send frame of {size} bytes is over max_frame_bytes ({self.max_frame_bytes})",
            )

    def read(self, session_id: int, msg_id: int) -> Deferred[Result]:
        return self.request("read", session_id=session_id, msg_id=msg_id)

    def unread(self) -> Deferred[Result]:
        return self.request("unread")

    def convs(self, limit: int | None = None, before: int | None = None) -> Deferred[Result]:
        return self.request("convs", **_given(limit=limit, before=before))

    def history(
        self,
        peer: int | None = None,
        session_id: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> Deferred[Result]:
        return self.request(
            "history", **_given(peer=peer, session_id=session_id, before=before, limit=limit)
        )

    def recall(self, msg_id: int) -> Deferred[Result]:
        return self.request("recall", msg_id=msg_id)

    def profile(self, uids: list[int]) -> Deferred[Result]:
        return self.request("profile", uids=list(uids))

    def set_profile(
        self,
        nickname: str | None = None,
        avatar: str | None = None,
        presence: str | None = None,
    ) -> Deferred[Result]:
        return self.request(
            "set_profile", **_given(nickname=nickname, avatar=avatar, presence=presence)
        )

    def devices(self) -> Deferred[Result]:
        return self.request("devices")

    def logout_device(self, device: str) -> Deferred[Result]:
        return self.request("logout_device", device=device)

    def block(self, uid: int) -> Deferred[Result]:
        return self.request("block", uid=uid)

    def unblock(self, uid: int) -> Deferred[Result]:
        return self.request("unblock", uid=uid)

    def blocked(self, after: int | None = None, limit: int | None = None) -> Deferred[Result]:
        return self.request("blocked", **_given(after=after, limit=limit))

    def mute(self, session_id: int, until: int) -> Deferred[Result]:
        return self.request("mute", session_id=session_id, until=until)

    def edit(self, msg_id: int, body: Any) -> Deferred[Result]:
        return self.request("edit", msg_id=msg_id, body=body)

    def hide(self, msg_ids: list[int]) -> Deferred[Result]:
        return self.request("hide", msg_ids=list(msg_ids))

    def clear(self, session_id: int) -> Deferred[Result]:
        return self.request("clear", session_id=session_id)

    def presence(self, uids: list[int]) -> Deferred[Result]:
        return self.request("presence", uids=list(uids))

    def watch(self, uids: list[int]) -> Deferred[Result]:
        """
        Watch these users' presence (replacing the set); watched again after
        reconnects, once the server accepted it (a refused set is not kept).
        """
        watching = list(uids)

        def accepted(result: Result) -> Result:
            self._watched = watching
            return result

        return self.request("watch", uids=watching).addCallback(accepted)

    def typing(self, to: int, active: bool) -> Deferred[Result]:
        return self.request("typing", to=to, active=active)

    def ping(self) -> Deferred[Result]:
        return self.request("ping")

    async def _call(self, op: str, fields: Mapping[str, Any]) -> Result:
        conn = await self._when_live(self.request_timeout)
        reply = await conn.request(op, **fields)
        return self._result(op, reply)

    def _result(self, op: str, reply: Mapping[str, Any]) -> Result:
        result = {k: v for k, v in reply.items() if k not in ("t", "id")}
        seq = result.get("seq")
        if op in SEQ_REPLIES and isinstance(seq, int) and not isinstance(seq, bool):
            self._note_seq(seq)
        return result

    async def _transmit(self, entry: Entry) -> Result:
        conn = await self._when_live(None)
        if entry.discarded:
            raise client_error("discarded", "another user's stored send")
        sending = conn.request("send", **_send_fields(entry))
        # Unanswered on a live connection (a stuck backend): sent again, same cid.
        sending.addTimeout(self.request_timeout, self.reactor)
        try:
            reply = await sending
        except TimeoutError as e:
            raise client_error("timeout", f"no answer within {self.request_timeout}s") from e
        return self._result("send", reply)

    def _when_live(self, timeout: float | None) -> Deferred[Connection]:
        conn = self._conn
        if self._state == LIVE and conn is not None and not conn.gone:
            return succeed(conn)
        if self._state in TERMINAL:
            return fail(self._terminal_error())
        call: IDelayedCall | None = None

        def cancel(d: Deferred[Connection]) -> None:
            if d in self._live_waiters:
                self._live_waiters.remove(d)

        d: Deferred[Connection] = Deferred(cancel)
        self._live_waiters.append(d)
        if timeout is not None:

            def expire() -> None:
                if d in self._live_waiters:
                    self._live_waiters.remove(d)
                    d.errback(client_error("timeout", f"not connected within {timeout}s"))

            call = self.reactor.callLater(timeout, expire)

            def stop_timer(result: object) -> object:
                if call is not None and call.active():
                    call.cancel()
                return result

            d.addBoth(stop_timer)
        return d

    def _terminal_error(self) -> RequestFailed:
        if self._state == KICKED:
            return client_error("kicked", f"kicked: {self._reason}")
        if self._state == FAILED:
            return client_error("auth_failed", self._reason or "the token was refused")
        return client_error("closed", "the client is closed")

    # -- the connection loop

    async def _run(self) -> None:
        attempt = 0
        while self._state not in TERMINAL:
            self._set_state(CONNECTING)
            conn: Connection | None = None
            reason = "connection lost"
            quick = False
            try:
                conn = await self._open()
                await self._catch_up(conn)
            except CancelledError:
                if self._state in TERMINAL:
                    return
                reason = "timeout"
            except RequestFailed as e:
                reason = e.code
                if e.code == "auth_failed" and not callable(self._token):
                    if conn is not None:
                        conn.drop("auth_failed")
                    self._finish(FAILED, e.message or "auth_failed")
                    return
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
                log.info("connecting to {url} failed: {reason}", url=self.url, reason=reason)
            else:
                attempt = 0
                await conn.lost
                reason = conn.reason
            if conn is None and self._conn is not None and self._conn.gone:
                self._conn = None
            if conn is not None:
                conn.drop(reason)
                if conn.kicked is not None:
                    self._finish(KICKED, conn.kicked)
                    return
                quick = conn.goaway
                if self._conn is conn:
                    self._conn = None
            if self._state in TERMINAL:
                return
            if quick:
                delay = self._rng.random()
            else:
                delay = self._backoff.delay(attempt)
                attempt += 1
            self._set_state(OFFLINE, reason, delay)
            await self._sleep(delay)

    async def _open(self) -> Connection:
        """
        Token, connect and auth under one C{request_timeout} (the connect
        timeout), counted from the start of the attempt: a token callable
        that never answers is a failed attempt like a silent server.
        """
        opening = Deferred.fromCoroutine(self._token_and_connect())
        self._opening = opening
        opening.addTimeout(self.request_timeout, self.reactor)
        try:
            return await opening
        finally:
            self._opening = None

    async def _token_and_connect(self) -> Connection:
        token = await self._fetch_token()
        if self._state in TERMINAL:
            raise CancelledError()
        return await self._connect_and_auth(str(token))

    def _fetch_token(self) -> Deferred[Any]:
        """
        The token, in a Deferred of our own: a timeout or close() cancels
        ours, never the caller's (it may still fire it later).
        """
        if not callable(self._token):
            return succeed(self._token)
        try:
            token = self._token()
        except Exception:
            return fail()
        if not inspect.isawaitable(token):
            return succeed(token)
        theirs = token if isinstance(token, Deferred) else Deferred.fromCoroutine(_await(token))
        ours: Deferred[Any] = Deferred()

        def relay(result: object) -> None:
            if not ours.called:
                if isinstance(result, Failure):
                    ours.errback(result)
                else:
                    ours.callback(result)

        theirs.addBoth(relay)
        return ours

    async def _connect_and_auth(self, token: str) -> Connection:
        connector = self._connector or (lambda r, u: connect_url(r, u, self._origin))
        proto: IMClientProtocol = await maybeDeferred(connector, self.reactor, self.url)
        proto.max_request_bytes = self.max_frame_bytes
        conn = Connection(proto, self.reactor, self.ping_timeout, self._on_push)
        if self._state in TERMINAL:
            conn.drop("closed")
            raise CancelledError()
        self._conn = conn
        try:
            reply = await conn.request(
                "auth",
                token=token,
                device=self._device,
                client=self.client_name,
                since=self._position.seq,
            )
        except BaseException:
            conn.drop("auth did not succeed")
            raise
        conn.authed = True
        self._uid = proto.uid = int(reply["uid"])
        if self._saved_uid is not None and self._saved_uid != self._uid:
            # Another user's state: its seq and its unsent messages are not ours.
            log.info(
                "the store was {old}'s, not {uid}'s: its state is discarded",
                old=self._saved_uid,
                uid=self._uid,
            )
            self._outbox.discard_restored()
            self._position.reset(int(reply.get("head", reply.get("seq", 0)) or 0))
            self._acked_seq = self._position.seq
        self._saved_uid = self._uid
        conn.start_heartbeat(float(reply.get("heartbeat", DEFAULT_HEARTBEAT)))
        start = reply.get("seq")
        if reply.get("reset"):
            self._position.reset(int(start if start is not None else reply.get("head", 0)))
            self._acked_seq = self._position.seq
            self._save()
            self._emit(Reset())
        elif isinstance(start, int) and start > self._position.seq:
            # A new device starts at the stream's head.
            self._position.advance_to(start)
            self._acked_seq = self._position.seq
            self._save()
        return conn

    async def _catch_up(self, conn: Connection) -> None:
        self._set_state(SYNCING)
        await self._catchup_pages(conn)
        await self._sync_pages(conn)
        if self._watched:
            await self._watch_again(conn)
        if conn.gone:
            raise client_error("disconnected", "the connection closed while catching up")
        held, conn.held = conn.held or [], None
        self._set_state(LIVE)
        for frame in held:
            if conn.gone:
                break
            self._handle(conn, frame)
        self._check_gap()
        if self._ack_ids or self._position.seq > self._acked_seq:
            self._schedule_acks()

    async def _internal(self, conn: Connection, op: str, **fields: Any) -> dict[str, Any]:
        """
        A request the client itself awaits (catch-up, sync, watch): under
        C{request_timeout}, and the connection dropped if it passes, so a
        server that never answers costs a reconnect, not a stuck state.
        """
        d = conn.request(op, **fields)
        d.addTimeout(self.request_timeout, self.reactor)
        try:
            return await d
        except TimeoutError as e:
            conn.drop("timeout")
            raise client_error("timeout", f"no {op} answer within {self.request_timeout}s") from e

    async def _watch_again(self, conn: Connection) -> None:
        """A watch lasts as long as its connection: watch again, and say the state now."""
        watched = self._watched
        try:
            reply = await self._internal(conn, "watch", uids=watched)
        except RequestFailed as e:
            if conn.gone:
                raise
            # Live anyway: presence is not worth the connection.
            log.warn("watching {count} users again failed: {code}", count=len(watched), code=e.code)
            if e.code in ("too_large", "invalid", "forbidden") and self._watched is watched:
                self._watched = []
            return
        for user in reply.get("users", []):
            self._stream_event(conn, {"t": "presence", **user}, replay=True)

    async def _catchup_pages(self, conn: Connection) -> None:
        while True:
            page = await self._internal(
                conn, "catchup", after=self._position.seq, limit=CATCHUP_LIMIT
            )
            for event in page.get("events", []):
                self._stream_event(conn, dict(event), replay=True)
            seq = page.get("seq")
            if isinstance(seq, int):
                self._advance_to(seq)
            self._save()
            self._flush_acks()
            if not page.get("more"):
                return

    async def _sync_pages(self, conn: Connection) -> None:
        after: int | None = None
        while True:
            fields: dict[str, Any] = {"limit": SYNC_LIMIT}
            if after is not None:
                fields["after"] = after
            page = await self._internal(conn, "sync", **fields)
            msgs = page.get("msgs", [])
            for msg in msgs:
                self._stream_event(conn, {"t": "msg", **msg}, replay=True)
            if not page.get("more"):
                return
            after = page.get("after") or (msgs[-1]["msg_id"] if msgs else None)
            if after is None:
                return

    def _resync(self, conn: Connection, with_sync: bool) -> None:
        """Catch-up (and sync) on a live connection: a C{sync} push, or a seq gap."""
        self._resync_sync = self._resync_sync or with_sync
        if self._resyncing:
            self._resync_again = True
            return
        self._resyncing = True

        async def run() -> None:
            try:
                while True:
                    self._resync_again = False
                    with_sync, self._resync_sync = self._resync_sync, False
                    await self._catchup_pages(conn)
                    if with_sync:
                        await self._sync_pages(conn)
                    if not self._resync_again:
                        return
            except RequestFailed as e:
                # A lost connection: the reconnect catches up anyway.
                log.info("catch-up on the live connection failed: {code}", code=e.code)
            finally:
                self._resyncing = False
                self._check_gap()

        d = Deferred.fromCoroutine(run())
        d.addErrback(lambda f: log.failure("catch-up failed", f))

    # -- pushes and events

    def _on_push(self, conn: Connection, frame: dict[str, Any]) -> None:
        if conn is not self._conn:
            return
        self._emit(Push(dict(frame)))
        t = frame.get("t")
        if t == "kick":
            # Kicked now, whether or not the server's close follows.
            conn.kicked = str(frame.get("reason", ""))
            self._handle(conn, frame)
            conn.drop("kicked")
            return
        if t == "error" and frame.get("code") == "frame_too_large":
            # The server closes now. The largest frame in flight is over its
            # limit (the one it refused is): lower ours, so that one fails
            # with too_large on the next connection instead of closing it too.
            largest = conn.proto.largest_unanswered
            if 0 < largest <= self.max_frame_bytes:
                self.max_frame_bytes = largest - 1
                log.warn(
                    "the server refused a frame of {size} bytes (frame_too_large):"
                    " max_frame_bytes is now {limit}",
                    size=largest,
                    limit=self.max_frame_bytes,
                )
            return
        if t == "goaway":
            conn.goaway = True
            # The server closes right after; close ourselves if it does not.
            conn.drop_after(GOAWAY_CLOSE, "goaway")
            return
        if conn.held is not None:
            conn.held.append(frame)
        else:
            self._handle(conn, frame)

    def _handle(self, conn: Connection, frame: dict[str, Any]) -> None:
        if frame.get("t") == "sync":
            self._resync(conn, with_sync=True)
        else:
            self._stream_event(conn, frame, replay=False)

    def _stream_event(self, conn: Connection, frame: dict[str, Any], replay: bool) -> None:
        t = frame.get("t")
        seq = frame.get("seq")
        to_me = t == "msg" and frame.get("to") == self._uid
        has_seq = isinstance(seq, int) and not isinstance(seq, bool)
        in_stream = t in STREAM or t not in NOT_STREAM
        if in_stream and has_seq and not self._note_seq(int(seq or 0)):
            if to_me:
                self._queue_ack(frame.get("msg_id"))
            return
        event = from_frame(frame, replay)
        if event is None:
            return
        if isinstance(event, Message):
            msg_id = event.msg.get("msg_id")
            if msg_id in self._msgs:
                if to_me:
                    self._queue_ack(msg_id)
                return
            self._msgs.put(msg_id)
            version, newer = self._edits.get(msg_id, (-1, None))
            if int(event.msg.get("edited", 0)) > version:
                self._edits.put(msg_id, (int(event.msg.get("edited", 0)), None))
            elif newer is not None:
                # A newer edit came first (pushes race): show that version, not this one.
                event = attrs.evolve(event, msg={**event.msg, **newer})
        elif isinstance(event, Edit):
            msg_id = event.msg.get("msg_id")
            edited = int(event.msg.get("edited", 0))
            if self._edits.get(msg_id, (-1, None))[0] >= edited:
                return
            self._edits.put(msg_id, (edited, dict(event.msg)))
        elif isinstance(event, Recall) and event.seq is None:
            if event.msg_id in self._recalls:
                return
            self._recalls.put(event.msg_id)
        self._emit(event)
        if to_me:
            self._queue_ack(frame.get("msg_id"))

    def _emit(self, event: Event) -> None:
        if self._state == CLOSED and not isinstance(event, StateChanged):
            return  # closed (maybe from a handler mid-page): nothing more is emitted
        for handler in list(self._handlers.get(event.name, ())):
            try:
                result = handler(event)
            except Exception:
                log.failure("a {name} handler failed", name=event.name)
                continue
            if inspect.isawaitable(result):
                d = Deferred.fromCoroutine(result) if inspect.iscoroutine(result) else result
                if isinstance(d, Deferred):
                    d.addErrback(_log_handler_failure, event.name)

    def _set_state(
        self, state: str, reason: str | None = None, retry_in: float | None = None
    ) -> None:
        if self._state in TERMINAL and state not in TERMINAL:
            return  # closed (or kicked) from a handler while connecting
        self._state = state
        self._reason = reason
        self._emit(StateChanged(state, reason, retry_in))
        if state == LIVE:
            waiters, self._live_waiters = self._live_waiters, []
            for d in waiters:
                if self._conn is not None:
                    d.callback(self._conn)

    def _finish(self, state: str, reason: str | None) -> None:
        """A terminal state: no reconnect; waiters and the outbox fail."""
        self._set_state(state, reason)
        error = self._terminal_error()
        waiters, self._live_waiters = self._live_waiters, []
        for d in waiters:
            d.errback(error)
        self._outbox.stop(error)
        self._wake()  # the outbox's retry delays (and a reconnect's) end now
        for timer in (self._ack_timer, self._gap_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._ack_timer = self._gap_timer = None
        self._save_now()
        flush = getattr(self._store, "flush", None)
        if flush is not None:
            try:
                flush()  # the final state, written now
            except Exception:
                log.failure("saving the client's state failed")

    def _sleep(self, seconds: float) -> Deferred[None]:
        """A delay (the reconnect's, the outbox's retries) that close() ends at once."""
        d: Deferred[None] = Deferred()
        self._sleeping[d] = self.reactor.callLater(seconds, d.callback, None)

        def done(result: object) -> object:
            self._sleeping.pop(d, None)
            return result

        return d.addBoth(done)

    def _wake(self) -> None:
        sleeping, self._sleeping = self._sleeping, {}
        for d, call in sleeping.items():
            if call.active():
                call.cancel()
                d.callback(None)

    # -- seq, acks

    def _note_seq(self, seq: int) -> bool:
        """Record a seq of the stream; False if it was had already."""
        if not self._position.note(seq):
            return False
        self._moved()
        return True

    def _advance_to(self, seq: int) -> None:
        self._position.advance_to(seq)
        self._moved()

    def _moved(self) -> None:
        if self._position.seq > self._acked_seq:
            self._schedule_acks()
        self._check_gap()

    def _check_gap(self) -> None:
        if self._position.gap and self._state not in TERMINAL:
            if self._gap_timer is None or not self._gap_timer.active():
                self._gap_timer = self.reactor.callLater(GAP_DELAY, self._gap_expired)
        elif self._gap_timer is not None:
            if self._gap_timer.active():
                self._gap_timer.cancel()
            self._gap_timer = None

    def _gap_expired(self) -> None:
        self._gap_timer = None
        conn = self._conn
        if not self._position.gap or conn is None or conn.gone or self._state != LIVE:
            return
        log.info("seq gap after {seq}: catching up", seq=self._position.seq)
        self._resync(conn, with_sync=False)

    def _queue_ack(self, msg_id: Any) -> None:
        if not isinstance(msg_id, int) or msg_id in self._ack_ids:
            return
        self._ack_ids.append(msg_id)
        if len(self._ack_ids) >= ACK_BATCH and not self._ack_failures:
            self._flush_acks()
        else:
            self._schedule_acks()

    def _schedule_acks(self, retry: bool = False) -> None:
        """
        The next ack batch: within ACK_DELAY, or while acks fail, after the
        backoff's delay (a retry replaces a sooner timer: new ids wait too).
        """
        if self._state in TERMINAL:
            return
        if retry and self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        if self._ack_timer is None or not self._ack_timer.active():
            delay = ACK_DELAY
            if self._ack_failures:
                delay = self._ack_retry.half_jitter(self._ack_failures - 1)
            self._ack_timer = self.reactor.callLater(delay, self._flush_acks)

    def _flush_acks(self) -> None:
        if self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        self._ack_timer = None
        conn = self._conn
        if conn is None or conn.gone or not conn.authed:
            return  # the next connection acks them
        ids, self._ack_ids = self._ack_ids[:500], self._ack_ids[500:]
        fields: dict[str, Any] = {}
        if ids:
            fields["msg_ids"] = ids
        seq = self._position.seq
        if seq > self._acked_seq:
            fields["seq"] = seq
        if not fields:
            return

        def acked(_: object) -> None:
            if self._ack_failures:
                log.info("acks succeed again after {count} failures", count=self._ack_failures)
                self._ack_failures = 0
            if "seq" in fields and seq > self._acked_seq:
                self._acked_seq = seq
                self._save()

        def failed(f: Failure) -> None:
            # Still pending on the server: acked again by the next batch (on this
            # connection if it is still up, a timer makes sure there is one).
            self._ack_ids = [i for i in ids if i not in self._ack_ids] + self._ack_ids
            if self._state == CLOSED:  # close() acks and closes: that reply is lost
                return
            if self._conn is not conn or conn.gone:
                return  # the connection's loss: the next connection acks them
            self._ack_failures += 1
            if self._ack_failures == 1:  # once per failure streak
                log.info(
                    "ack failed ({error}): retried after {base}s doubling to {max}s",
                    error=f.getErrorMessage(),
                    base=ACK_RETRY_BASE,
                    max=ACK_RETRY_MAX,
                )
            self._schedule_acks(retry=True)

        acking = conn.request("ack", **fields)
        # An ack never answered (a stuck backend) is failed, so it is sent again.
        acking.addTimeout(self.request_timeout, self.reactor)
        acking.addCallbacks(acked, failed)
        if self._ack_ids:
            self._schedule_acks()

    def _save(self) -> None:
        """
        Save the state at the end of this reactor turn: a burst of sends
        builds the state (the whole outbox) once, not once per send.
        """
        if self._save_call is None:
            self._save_call = self.reactor.callLater(0, self._save_now)

    def _save_now(self) -> None:
        if self._save_call is not None:
            if self._save_call.active():
                self._save_call.cancel()
            self._save_call = None
        try:
            self._store.save(
                {
                    "device": self._device,
                    "uid": self._uid if self._uid is not None else self._saved_uid,
                    "seq": self._position.seq,
                    "outbox": self._outbox.state(),
                }
            )
        except Exception:
            log.failure("saving the client's state failed")


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _log_handler_failure(f: Failure, name: str) -> None:
    log.failure("a {name} handler failed", f, name=name)


def _send_fields(entry: Entry) -> dict[str, Any]:
    fields: dict[str, Any] = {"to": entry.to, "cid": entry.cid, "body": entry.body}
    if entry.type is not None:
        fields["type"] = entry.type
    return fields


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}
