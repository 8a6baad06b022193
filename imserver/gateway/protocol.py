"""
The long-lived client connection: wire protocol v1 over a stream transport.

Layers, as in L{twisted.protocols.amp}: L{imserver.wire.framing} cuts the
byte stream into frame bodies, L{imserver.wire.codec} decodes them,
L{imserver.wire.frames} validates requests, and the L{Gateway}'s op table
dispatches them to the business layer. This module holds the state machine
that ties them to a transport:

    AWAIT_AUTH --auth ok--> READY --kick/goaway/idle/error--> CLOSING
         |                                                       ^
         +-- any other first frame, bad token, auth timeout -----+

Replies are written as soon as a handler's Deferred fires, so replies of
concurrent requests may overtake each other and interleave with pushes;
clients match replies by id.

Backpressure: the protocol registers itself as a streaming producer on its
own transport. When the transport's buffer is full, Twisted calls
L{pauseProducing}: the connection stops reading (so a client that does not
read its replies cannot make us queue more work for it) and counts what is
still written; past C{max_outbound_bytes} the connection is dropped.

Input is bounded the same way (issue 9, defects 3 and 10): at most
C{max_in_flight} requests of a connection are handled at once, and none
while its auth is in progress. Frames already cut from the received bytes
wait in a small inbox and the connection stops reading until the inbox is
empty again, so a client pipelining thousands of requests holds at most one
socket read in memory. Requests other than send and ack then pass a
node-wide L{FairQueue}, round-robin by connection.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imserver.config import ServerConfig
from imserver.errors import ErrorCode, ImError
from imserver.fairqueue import FairQueue
from imserver.gateway.idlewheel import IdleWheel, Timed
from imserver.services.presence import IClientLink, IPresence
from imserver.services.ratelimit import TokenBucket
from imserver.services.tokens import Claims, TokenService
from imserver.wire import frames
from imserver.wire.codec import BadFrame, Frame, decode_body, encode, pack
from imserver.wire.framing import HEADER_SIZE, FrameDecoder, FrameTooLarge

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

Result = Mapping[str, Any] | None
Handler = Callable[["ClientProtocol", frames.Request], "Result | Deferred[Result]"]
#: Called on each successful auth before the connection joins presence (the
#: business layer creates the user and the device there); what it returns
#: joins the auth reply.
LoginHook = Callable[[Claims, "ClientProtocol", frames.Auth], Awaitable[Mapping[str, Any] | None]]

# How long a closing connection may take to flush before it is aborted.
CLOSE_GRACE_SECONDS = 5.0
#: How late an idle connection may be closed at most: its deadline rounded
#: up to the idle wheel's bucket (issue 13: one timer for all of them).
IDLE_RESOLUTION_SECONDS = 1.0
#: Bytes of frames a connection may have waiting beyond one frame: more than
#: one socket read (64 KiB) with room to spare. Only a transport that goes on
#: delivering after it was paused reaches it.
INBOX_SLACK_BYTES = 256 * 1024


def _no_delay(transport: Any) -> None:
    """
    Replies and pushes are small and latency-bound: turn Nagle off (a quiet
    recipient would otherwise hold them until its delayed ACK). Under TLS
    the TCP transport is the one below the TLS protocol.
    """
    for candidate in (transport, getattr(transport, "transport", None)):
        set_nodelay = getattr(candidate, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
            return


#: What requests still waiting for the fair queue get when their connection goes.
_GONE = Failure(ImError(ErrorCode.UNAVAILABLE, "connection closed"))


def source_key(addr: IAddress | None) -> str | None:
    """
    The source a connection counts against in the per-address cap: the IPv4
    address, or the /64 of an IPv6 one (one subscriber's usual allocation).
    None for loopback (a local proxy or load generator, which counts only
    in the total) and for non-IP transports.
    """
    host = getattr(addr, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        else:
            return None if ip.is_loopback else str(ipaddress.IPv6Network((ip, 64), strict=False))
    return None if ip.is_loopback else str(ip)


class Refused(Protocol):
    """
    A connection refused by a cap, on a listener that wraps the protocol it
    is given (TLS): closed as soon as it is made. (A TLS listener would wrap
    None and fail with a traceback in its accept loop; a plain TCP port
    closes the socket for None at once, which is cheaper: see
    L{Gateway.factory_for}.)
    """

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


#: Endpoint types whose port closes the socket itself when the factory gives None.
PLAIN_ENDPOINTS = frozenset({"tcp", "tcp6", "unix", "systemd"})


class _Refusing(Factory):
    """The gateway as a wrapping listener (TLS) needs it: a refusal is L{Refused}."""

    noisy = False

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self.gateway.buildProtocol(addr) or Refused()


class State(enum.Enum):
    AWAIT_AUTH = "await_auth"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSING = "closing"


@attrs.frozen
class Op:
    """One entry of the op table: the request schema and its handler."""

    schema: type[frames.Request]
    handle: Handler
    #: Admitted through the node's L{FairQueue}. Off for send and ack: they
    #: are group-committed already (one transaction carries many users'
    #: items) and must keep their order and latency.
    fair: bool = False


@implementer(IPushProducer, IClientLink)
class ClientProtocol(Protocol):
    log = Logger()
    # A connected stream transport: ITCPTransport, IProducer and IConsumer.
    transport: Any

    # Slots (issue 13): with ~35 attributes an instance outgrew CPython's
    # shared-key dicts and carried a 1.5 KiB dict of its own per connection.
    # Protocol's own attributes are slots too, so that the inherited
    # __dict__ is never materialised.
    __slots__ = (
        "_abort_call",
        "_connected",
        "_decoder",
        "_draining",
        "_encode",
        "_held",
        "_in_flight",
        "_inbox",
        "_inbox_bytes",
        "_inbox_limit",
        "_last_activity",
        "_lose_when_idle",
        "_max_write",
        "_paused",
        "_paused_bytes",
        "_reading_paused",
        "_timer",
        "buckets",
        "catching_up",
        "client",
        "connected",
        "connected_at",
        "device",
        "device_id",
        "epoch",
        "factory",
        "filter_stream",
        "gateway",
        "idle_bucket",
        "position",
        "send_bucket",
        "source",
        "state",
        "transport",
        "uid",
        "unauthenticated",
    )

    def __init__(self, gateway: Gateway, epoch: int, source: str | None = None) -> None:
        self.transport = None
        self.factory = None
        self.connected = 0
        self.gateway = gateway
        self.epoch = epoch
        #: The source address as the unauthenticated caps count it (None: uncounted).
        self.source = source
        self.unauthenticated = True
        self.uid: int | None = None
        self.state = State.AWAIT_AUTH
        self.device: str = frames.DEFAULT_DEVICE
        self.client: str | None = None
        #: The device's id in SQL (0 until logged in): the catch-up skips its own sends.
        self.device_id = 0
        #: When it authenticated (ms since the epoch).
        self.connected_at = 0
        # The user's stream as this connection follows it (docs/protocol.md,
        # "Devices"): where its catch-up stands, whether pushes carrying a
        # seq wait for the catch-up (auth with since), and whether pushes at
        # or below the position are dropped (they were in catch-up pages).
        self.position = 0
        self.catching_up = False
        self.filter_stream = False
        # The highest seq held back while catching up.
        self._held = 0
        # The send rate limit of this connection, made by the op table.
        self.send_bucket: TokenBucket | None = None
        #: Rate limits of the other limited ops, by name (see gateway.ops.limited),
        #: made with the first of them: most connections never use one.
        self.buckets: dict[str, TokenBucket] | None = None
        self._decoder = FrameDecoder(gateway.config.max_frame_bytes)
        # How a frame is written (the length prefix and the body: a stream
        # transport) and the largest one written, its prefix included. A
        # message transport (WebSocket) writes the body alone: see
        # L{use_message_framing}.
        self._encode: Callable[[Mapping[str, Any]], bytes] = encode
        self._max_write = gateway.config.max_frame_bytes + HEADER_SIZE
        # Frame bodies received but not handled yet (in-flight cap, auth):
        # None while there are none (a deque is 760 bytes; most connections
        # are idle), made by the read that brings frames, dropped once drained.
        self._inbox: deque[bytes] | None = None
        self._inbox_bytes = 0
        self._inbox_limit = gateway.config.max_frame_bytes + INBOX_SLACK_BYTES
        self._draining = False
        # We asked the transport to stop reading (for whatever reason).
        self._reading_paused = False
        # The auth timeout until logged in; then the gateway's idle wheel
        # holds the connection in a deadline bucket (no timer of its own).
        self._timer: IDelayedCall | None = None
        self.idle_bucket: dict[Timed, None] | None = None
        self._abort_call: IDelayedCall | None = None
        self._last_activity = 0.0
        self._paused = False
        self._paused_bytes = 0
        self._connected = False
        self._in_flight = 0
        self._lose_when_idle = False

    def use_message_framing(self) -> None:
        """
        Frame by messages, not by length prefixes: every C{write} to the
        transport is one frame body, and bodies come in through
        L{frames_received} (a WebSocket carries one frame per message).
        """
        self._encode = pack
        self._max_write = self.gateway.config.max_frame_bytes

    # -- connection lifecycle ------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        _no_delay(self.transport)
        self.transport.registerProducer(self, True)
        clock = self.gateway.clock
        self._last_activity = clock.seconds()
        self._timer = clock.callLater(self.gateway.config.auth_timeout_seconds, self._auth_timeout)
        self.gateway.connection_made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        self.state = State.CLOSING
        self._clear_inbox()
        self.gateway.scheduler.discard(self, _GONE)
        for call in (self._timer, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._abort_call = None
        self.gateway.idle_wheel.discard(self)
        if self.uid is not None:
            self.gateway.presence.logout(self.uid, self)
            if self.gateway.on_logout is not None:
                self.gateway.on_logout(self)
        self.gateway.connection_lost(self)

    def close(self, reason: str, *, after_replies: bool = False) -> None:
        """
        Flush what is written, then close; abort if the peer does not let us
        flush within the grace period. With C{after_replies}, stop reading
        but let the requests already being handled reply first.
        """
        if self.state is State.CLOSING:
            return
        self.state = State.CLOSING
        self._clear_inbox()
        self.log.debug(
            "closing connection {epoch} (uid {uid}): {reason}",
            epoch=self.epoch,
            uid=self.uid,
            reason=reason,
        )
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.gateway.idle_wheel.discard(self)
        if self._connected:
            self._abort_call = self.gateway.clock.callLater(CLOSE_GRACE_SECONDS, self._abort)
        if after_replies and self._in_flight:
            self._lose_when_idle = True
            self._pause_reading()
        else:
            self.transport.loseConnection()

    def _abort(self) -> None:
        self._abort_call = None
        self.transport.abortConnection()

    # -- IClientLink -----------------------------------------------------------

    @property
    def last_active(self) -> float:
        """When the client last sent anything (reactor seconds)."""
        return self._last_activity

    def push(self, frame: Mapping[str, Any]) -> None:
        seq = frame.get("seq")
        if seq is not None and self.filter_stream:
            if self.catching_up:
                # A catch-up page brings it: each event once.
                if seq > self._held:
                    self._held = seq
                return
            if seq <= self.position:
                return  # a page brought it
        self._send(frame)

    def caught_up(self, position: int, more: bool) -> bool:
        """
        A catch-up page reaches C{position}: whether more follows. A push held
        back beyond the page (committed after the page's snapshot was read)
        means more: the next page brings it, so no event falls between the
        pages and the live pushes.
        """
        self.position = max(self.position, position)
        if not more and self._held > self.position:
            more = True
        if not more:
            self.catching_up = False
        return more

    def kick(self, reason: str) -> None:
        if self.state is State.CLOSING:
            return
        self._send(frames.push("kick", reason=reason))
        self.close(f"kicked: {reason}")

    def goaway(self, reason: str) -> None:
        """Say goodbye; requests in flight still get their replies."""
        if self.state is State.CLOSING:
            return
        self._send(frames.push("goaway", reason=reason))
        self.close(f"goaway: {reason}", after_replies=True)

    # -- IPushProducer: our transport's buffer is full / has drained ------------

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._paused_bytes = 0
            self._pause_reading()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._paused_bytes = 0
            self._maybe_resume_reading()

    def stopProducing(self) -> None:
        self._paused = False

    # -- reading: paused for full output, a full inbox, or closing ------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _maybe_resume_reading(self) -> None:
        if (
            self._reading_paused
            and self._connected
            and not self._paused
            and not self._inbox
            and self.state is not State.CLOSING
        ):
            self._reading_paused = False
            self.transport.resumeProducing()

    def _clear_inbox(self) -> None:
        if self._inbox is not None:
            self._inbox.clear()  # a drain loop in progress holds it: it ends
            self._inbox = None
        self._inbox_bytes = 0

    # -- output ------------------------------------------------------------------

    def _send(self, frame: Mapping[str, Any], op: str | None = None) -> None:
        """Write a frame (C{op}: the request's, for a reply: logged if it is too large)."""
        if not self._connected:
            return
        data = self._encode(frame)
        if len(data) > self._max_write:
            self._oversized(frame, len(data), op)
            return
        if self._paused:
            self._paused_bytes += len(data)
            if self._paused_bytes > self.gateway.config.max_outbound_bytes:
                self.log.warn(
                    "dropping connection {epoch} (uid {uid}): the client does not read "
                    "and {queued} bytes are queued",
                    epoch=self.epoch,
                    uid=self.uid,
                    queued=self._paused_bytes,
                )
                self.gateway.overflowed += 1
                self._connected = False
                self.state = State.CLOSING
                self.transport.abortConnection()
                return
        self.transport.write(data)

    def _oversized(self, frame: Mapping[str, Any], size: int, op: str | None) -> None:
        """
        A frame larger than max_frame_bytes: the client would refuse it and
        close (its decoder cannot skip it). The chat layer bounds its
        replies; this is the backstop for anything it missed. A reply
        becomes an C{internal} error for its request id, a push is dropped.
        """
        kind = frame.get("t")
        req_id = frame.get("id") if kind in ("ok", "error") else None
        if req_id is None:
            self.gateway.oversized["push"] += 1
            self.log.warn(
                "dropped a {push} push of {size} bytes to uid {uid}: over max_frame_bytes {max}",
                push=kind,
                size=size,
                uid=self.uid,
                max=self.gateway.config.max_frame_bytes,
            )
            return
        self.gateway.oversized["reply"] += 1
        self.log.error(
            "reply to op {op} (id {req_id}) of uid {uid} is {size} bytes, over"
            " max_frame_bytes {max}: answered internal",
            op=op,
            req_id=req_id,
            uid=self.uid,
            size=size,
            max=self.gateway.config.max_frame_bytes,
        )
        self._error(
            ErrorCode.INTERNAL, "internal server error: the reply exceeds max_frame_bytes", req_id
        )

    def _reply_error(self, e: ImError, req_id: int | None) -> None:
        self._error(e.code, e.message, req_id)

    def _error(self, code: ErrorCode, message: str, req_id: int | None = None) -> None:
        self.gateway.errors[code] += 1
        self._send(frames.error(code, message, req_id))

    # -- input -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.CLOSING:
            return
        self._last_activity = self.gateway.clock.seconds()
        try:
            bodies = self._decoder.feed(data)
        except FrameTooLarge as e:
            self._error(ErrorCode.FRAME_TOO_LARGE, str(e))
            self.close("frame too large")
            return
        if bodies:
            self.frames_received(bodies)

    def frames_received(self, bodies: list[bytes]) -> None:
        """Complete frame bodies have arrived (from the decoder, or as messages)."""
        inbox = self._inbox
        if inbox is None:
            self._inbox = deque(bodies)
        else:
            inbox.extend(bodies)
        self._inbox_bytes += sum(map(len, bodies))
        if self._inbox_bytes > self._inbox_limit:
            self.gateway.inbox_overflowed += 1
            self._error(
                ErrorCode.RATE_LIMITED,
                f"more than {self._inbox_limit} bytes of requests waiting; wait for replies",
            )
            self.close("inbox overflow")
            return
        self._drain()

    def _drain(self) -> None:
        """
        Handle waiting frames while the connection may take more: it is not
        authenticating and has fewer than C{max_in_flight} requests being
        handled. Stop reading while some wait; read again once none do.
        """
        if self._draining:
            return  # a reply came at once, inside the loop below: it goes on
        inbox = self._inbox
        if inbox is None:
            self._maybe_resume_reading()
            return
        self._draining = True
        limit = self.gateway.config.max_in_flight
        try:
            while inbox:
                state = self.state
                if state is State.CLOSING:
                    self._clear_inbox()
                    return
                if state is State.AUTHENTICATING or self._in_flight >= limit:
                    if not self._reading_paused:
                        self.gateway.throttled += 1
                        self._pause_reading()
                    return
                body = inbox.popleft()
                self._inbox_bytes -= len(body)
                self._handle(body)
            if self._inbox is inbox:
                self._inbox = None  # drained: idle connections hold no deque
        finally:
            self._draining = False
        self._maybe_resume_reading()

    def _handle(self, body: bytes) -> None:
        try:
            frame = decode_body(body)
        except BadFrame as e:
            self._error(ErrorCode.BAD_FRAME, str(e))
            return
        if self.state is State.READY:
            self._dispatch(frame)
        else:
            self._begin_auth(frame)

    def _dispatch(self, frame: Frame) -> None:
        gateway = self.gateway
        try:
            request = frames.parse_request(frame, gateway.schemas)
        except ImError as e:
            self._reply_error(e, frames.request_id(frame))
            return
        req_id = request.id
        op = gateway.ops[request.op]
        result: Result | Deferred[Result]
        try:
            if op.fair:
                result = gateway.scheduler.submit(self, lambda: op.handle(self, request))
            else:
                result = op.handle(self, request)
        except ImError as e:
            self._reply_error(e, req_id)
            return
        except Exception:
            self._internal_error(Failure(), request)
            return
        if isinstance(result, Deferred):
            self._in_flight += 1
            # One callback (for both outcomes) that replies and then does the
            # bookkeeping, not a pair and an addBoth: one trip fewer through
            # Deferred._runCallbacks per request (issue 13).
            result.addBoth(self._answer, request)
        else:
            self._send(frames.ok(req_id, result), request.op)

    def _answer(self, outcome: Result | Failure, request: frames.Request) -> None:
        try:
            if isinstance(outcome, Failure):
                self._reply_failure(outcome, request)
            else:
                self._reply_ok(outcome, request)
        except Exception:
            self._reply_crashed(request)
        self._replied(None)

    def _reply_crashed(self, request: frames.Request) -> None:
        """Writing a reply raised: logged; the request still counts as answered."""
        self.log.failure(
            "writing the reply to op {op} (id {req_id}) of uid {uid} failed",
            op=request.op,
            req_id=request.id,
            uid=self.uid,
        )

    def _replied(self, _: None) -> None:
        """A reply was written: close if this was the last one we waited for."""
        self._in_flight -= 1
        if self._lose_when_idle and not self._in_flight:
            self._lose_when_idle = False
            self.transport.loseConnection()
        elif self._inbox:
            self._drain()

    def _reply_ok(self, result: Result, request: frames.Request) -> None:
        self._send(frames.ok(request.id, result), request.op)

    def _reply_failure(self, failure: Failure, request: frames.Request) -> None:
        error = failure.value
        if isinstance(error, ImError):
            if self._connected:  # not counted for a client that is gone
                self._reply_error(error, request.id)
        else:
            self._internal_error(failure, request)

    def _internal_error(self, failure: Failure, request: frames.Request) -> None:
        self.log.failure(
            "op {op} (id {req_id}) of uid {uid} failed",
            failure,
            op=request.op,
            req_id=request.id,
            uid=self.uid,
        )
        self._error(ErrorCode.INTERNAL, "internal server error", request.id)

    # -- authentication ----------------------------------------------------------

    def _begin_auth(self, frame: Frame) -> None:
        req_id = frames.request_id(frame)
        if frame.get("t") != "auth":
            self._error(ErrorCode.UNAUTHENTICATED, "auth must come first", req_id)
            self.close("request before auth")
            return
        clock = self.gateway.clock
        try:
            request = frames.parse_request(frame, {"auth": frames.Auth})
            assert isinstance(request, frames.Auth)
            claims = self.gateway.tokens.verify_claims(request.token, now=clock.seconds())
        except ImError as e:
            self.gateway.auths["failed"] += 1
            self._error(ErrorCode.AUTH_FAILED, e.message, req_id)
            self.close("auth failed")
            return
        if claims.device is not None and claims.device != request.device:
            self.gateway.auths["failed"] += 1
            self._error(
                ErrorCode.AUTH_FAILED, "this token is for another device of the user", req_id
            )
            self.close("auth failed: device claim")
            return
        uid = claims.uid
        self.state = State.AUTHENTICATING
        self.device, self.client = request.device, request.client
        self.connected_at = int(clock.seconds() * 1000)
        d = self.gateway.login(claims, self, request)
        d.addCallbacks(
            self._logged_in,
            self._login_failed,
            callbackArgs=(uid, request),
            errbackArgs=(request,),
        )

    def _logged_in(self, extra: Mapping[str, Any] | None, uid: int, request: frames.Auth) -> None:
        if self.state is not State.AUTHENTICATING:
            # The connection went away while we were logging in.
            self.gateway.presence.logout(uid, self)
            return
        self.uid = uid
        self.state = State.READY
        self.gateway.authenticated(self)
        self.gateway.auths["ok"] += 1
        config = self.gateway.config
        clock = self.gateway.clock
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.gateway.idle_wheel.add(self, clock.seconds() + config.idle_timeout_seconds)
        self._send(
            frames.ok(
                request.id,
                {
                    "uid": uid,
                    "heartbeat": config.heartbeat_seconds,
                    "server_time": int(clock.seconds() * 1000),
                    **(extra or {}),
                },
            ),
            "auth",
        )
        self._drain()

    def _login_failed(self, failure: Failure, request: frames.Auth) -> None:
        self.gateway.auths["error"] += 1
        error = failure.value
        if not isinstance(error, ImError):
            self.log.failure("login failed", failure)
            error = ImError(ErrorCode.INTERNAL, "internal server error")
        self._error(error.code, error.message, request.id)
        self.close("login failed")

    # -- timers --------------------------------------------------------------------

    def _auth_timeout(self) -> None:
        self._timer = None
        if self.state in (State.AWAIT_AUTH, State.AUTHENTICATING):
            self._error(ErrorCode.UNAUTHENTICATED, "no auth within the time allowed")
            self.close("auth timeout")

    def check_idle(self) -> None:
        """
        The idle wheel's bucket of this connection is due. Lazy: activity
        only records a timestamp, and the connection is filed again for its
        remaining time, so a busy connection costs one check per idle period
        instead of a reschedule per frame.
        """
        if self.state is State.CLOSING:
            return
        timeout = self.gateway.config.idle_timeout_seconds
        now = self.gateway.clock.seconds()
        deadline = self._last_activity + timeout
        if deadline <= now:
            self.gateway.idle_closed += 1
            self.close(f"idle for {now - self._last_activity:.0f}s")
        else:
            self.gateway.idle_wheel.add(self, deadline)


def _check_idle(conn: Timed) -> None:
    assert isinstance(conn, ClientProtocol)
    conn.check_idle()


def _ping(conn: ClientProtocol, request: frames.Request) -> Result:
    return {"server_time": int(conn.gateway.clock.seconds() * 1000)}


CORE_OPS: dict[str, Op] = {"ping": Op(frames.Ping, _ping)}


class Gateway(Factory):
    """
    Owns every client connection of one listener set: builds protocols,
    holds the op table, and says goodbye to everyone on shutdown.

    @param ops: the business ops (C{send}, C{sync}, ...) by name; C{ping} is
        built in and C{auth} is handled by the protocol itself. An op missing
        from the table is answered C{unknown_op}.
    @param on_login: called once a token is verified, before the connection is
        registered in C{presence}; its failure (an L{ImError}) is sent to the
        client and closes the connection; what it returns joins the auth reply.
    @param on_logout: called when an authenticated connection has closed.
    @param max_connections: connections held at most, authenticated or not
        (L{imserver.listen.connection_budget}); past it new ones are closed.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        *,
        config: ServerConfig,
        clock: IReactorTime,
        tokens: TokenService,
        presence: IPresence,
        ops: Mapping[str, Op] | None = None,
        on_login: LoginHook | None = None,
        on_logout: Callable[[ClientProtocol], None] | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.config = config
        #: Connections held at most (the process's descriptor budget); None: no cap.
        self.max_connections = max_connections
        self.clock = clock
        self.tokens = tokens
        self.presence = presence
        self.ops: dict[str, Op] = {**CORE_OPS, **(ops or {})}
        self.schemas = {name: op.schema for name, op in self.ops.items()}
        self._on_login = on_login
        #: Called when an authenticated connection closes (its device's last-seen time).
        self.on_logout = on_logout
        self.connections: set[ClientProtocol] = set()
        self._epochs = itertools.count(1)
        self._all_closed: list[Deferred[None]] = []
        self.accepting = True
        #: Requests other than send and ack pass here, round-robin by connection.
        self.scheduler: FairQueue[Result] = FairQueue(config.max_concurrent_requests)
        #: Connections not authenticated yet, in total and by L{source_key}.
        self.unauthenticated = 0
        self._unauthenticated_by: Counter[str] = Counter()
        # Counters read by metrics.
        self.auths = {"ok": 0, "failed": 0, "error": 0}
        self.errors: Counter[str] = Counter()
        self.overflowed = 0
        #: Frames over max_frame_bytes not written: replies (answered
        #: internal instead) and pushes (dropped).
        self.oversized = {"reply": 0, "push": 0}
        self.idle_closed = 0
        #: Every authenticated connection's idle timeout: one reactor timer
        #: for all of them instead of a DelayedCall each (issue 13).
        self.idle_wheel = IdleWheel(clock, _check_idle, IDLE_RESOLUTION_SECONDS)
        #: Connections refused by the unauthenticated caps, by cap.
        self.refused = {"total": 0, "per_address": 0, "descriptors": 0}
        #: Times a connection stopped being read for its requests in flight or auth.
        self.throttled = 0
        #: Connections closed for sending on while they were not read.
        self.inbox_overflowed = 0

    def buildProtocol(self, addr: IAddress | None) -> ClientProtocol | None:
        """
        A protocol for a new connection, or None (the port closes the socket
        at once, in its accept loop) while shutting down or past a cap: one
        source cannot hold every descriptor of the process with connections
        that never authenticate.
        """
        if not self.accepting:
            return None
        config = self.config
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            self._refuse("descriptors", addr)
            return None
        if self.unauthenticated >= config.max_unauthenticated:
            self._refuse("total", addr)
            return None
        source = source_key(addr)
        per_address = config.max_unauthenticated_per_address
        if source is not None:
            if per_address and self._unauthenticated_by[source] >= per_address:
                self._refuse("per_address", addr)
                return None
            self._unauthenticated_by[source] += 1
        self.unauthenticated += 1
        return ClientProtocol(self, next(self._epochs), source)

    def factory_for(self, kind: str) -> Factory:
        """The factory to listen with on an endpoint of type C{kind} (C{tcp}, C{ssl}...)."""
        return self if kind in PLAIN_ENDPOINTS else _Refusing(self)

    def _refuse(self, cap: str, addr: IAddress | None) -> None:
        self.refused[cap] += 1
        # One line per 1,000 refusals: a flood must not flood the log too.
        if self.refused[cap] % 1000 == 1:
            self.log.warn(
                "refusing connections: {cap} cap reached, e.g. from {addr} ({n} refused so far)",
                cap=cap,
                addr=getattr(addr, "host", addr),
                n=self.refused[cap],
            )

    def authenticated(self, conn: ClientProtocol) -> None:
        """C{conn} logged in: it no longer counts against the unauthenticated caps."""
        if not conn.unauthenticated:
            return
        conn.unauthenticated = False
        self.unauthenticated -= 1
        source = conn.source
        if source is not None:
            left = self._unauthenticated_by[source] - 1
            if left:
                self._unauthenticated_by[source] = left
            else:
                del self._unauthenticated_by[source]

    def connection_made(self, conn: ClientProtocol) -> None:
        self.connections.add(conn)

    def connection_lost(self, conn: ClientProtocol) -> None:
        self.authenticated(conn)  # uncounted: gone
        self.connections.discard(conn)
        if not self.connections:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def login(
        self, claims: Claims, conn: ClientProtocol, request: frames.Auth
    ) -> Deferred[Mapping[str, Any] | None]:
        async def login() -> Mapping[str, Any] | None:
            extra = None
            if self._on_login is not None:
                extra = await self._on_login(claims, conn, request)
            await self.presence.login(claims.uid, conn)
            return extra

        return Deferred.fromCoroutine(login())

    def goaway_all(self, reason: str = "shutdown") -> Deferred[None]:
        """
        Stop accepting, send every client C{goaway}, and fire once all
        connections are closed (closing ones are aborted after a grace period).
        """
        self.accepting = False
        for conn in list(self.connections):
            conn.goaway(reason)
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)
        return d
