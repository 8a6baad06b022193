"""Client side of wire protocol v1 over Twisted."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, DeferredQueue, fail
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from imserver.wire.codec import Frame, decode_body, encode, pack
from imserver.wire.framing import HEADER, FrameDecoder


class RequestFailed(Exception):
    """The server answered a request with an error frame."""

    def __init__(self, frame: Mapping[str, Any]) -> None:
        self.code: str = frame.get("code", "")
        self.message: str = frame.get("message", "")
        self.frame = dict(frame)
        super().__init__(f"{self.code}: {self.message}")


def client_error(code: str, message: str) -> RequestFailed:
    """An error made on this side (C{timeout}, C{disconnected}, ...), shaped like the server's."""
    return RequestFailed({"t": "error", "code": code, "message": message})


class ConnectionClosed(Exception):
    """The connection closed before the reply arrived."""


class IMClientProtocol(Protocol):
    """
    One client connection. Requests are matched to replies by id, so many
    may be in flight at once.
    """

    transport: Any

    def __init__(self, max_frame_bytes: int = 16 * 1024 * 1024) -> None:
        self._decoder = FrameDecoder(max_frame_bytes)
        self._ids = itertools.count(1)
        self._waiting: dict[int, Deferred[Frame]] = {}
        self._pushes: DeferredQueue[Frame] = DeferredQueue()
        self.on_push: Callable[[Frame], None] = self._pushes.put
        self.closed: Deferred[None] = Deferred()
        self.uid: int | None = None
        self.is_open = False
        # A frame as written to the transport: length-prefixed on a byte
        # stream, the bare body with message framing (L{use_message_framing}).
        self._encode: Callable[[Mapping[str, Any]], bytes] = encode
        self._prefix = HEADER.size
        #: A request whose frame body is larger fails with C{too_large} and is
        #: not written (the server would close the connection: C{frame_too_large}).
        self.max_request_bytes: int | None = None
        #: The body size of each request not answered yet.
        self._sizes: dict[int, int] = {}

    def use_message_framing(self) -> None:
        """
        Frame by messages, not by length prefixes (a WebSocket carries one
        frame body per message): every C{write} to the transport is one
        body, and bodies come in through L{bodies_received}, not
        L{dataReceived}.
        """
        self._encode = pack
        self._prefix = 0

    def connectionMade(self) -> None:
        self.is_open = True

    def dataReceived(self, data: bytes) -> None:
        self.bodies_received(self._decoder.feed(data))

    def bodies_received(self, bodies: list[bytes]) -> None:
        """Complete frame bodies have arrived (from the decoder, or as messages)."""
        for body in bodies:
            frame = decode_body(body)
            req_id = frame.get("id")
            waiter = None
            if req_id is not None:
                waiter = self._waiting.pop(req_id, None)
                self._sizes.pop(req_id, None)
            if waiter is None:
                self.on_push(frame)
            elif frame.get("t") == "error":
                waiter.errback(RequestFailed(frame))
            else:
                waiter.callback(frame)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.is_open = False
        waiting, self._waiting = self._waiting, {}
        self._sizes = {}
        for d in waiting.values():
            d.errback(ConnectionClosed(str(reason.value)))
        self.closed.callback(None)

    def send_frame(self, frame: Mapping[str, Any]) -> None:
        """Write one frame as is (no id bookkeeping)."""
        self.transport.write(self._encode(frame))

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (with message framing: one message)."""
        self.transport.write(data)

    def request(self, op: str, **fields: Any) -> Deferred[Frame]:
        """Send C{{"t": op, "id": N, **fields}}; fire with the ok frame."""
        req_id = next(self._ids)
        data = self._encode({"t": op, "id": req_id, **fields})
        size = len(data) - self._prefix
        limit = self.max_request_bytes
        if limit is not None and size > limit:
            return fail(
                RequestFailed(
                    {
                        "t": "error",
                        "code": "too_large",
                        "message": f"a {op} frame of {size} bytes is over {limit}",
                    }
                )
            )
        d: Deferred[Frame] = Deferred()
        self._waiting[req_id] = d
        self._sizes[req_id] = size
        self.transport.write(data)
        return d

    @property
    def largest_unanswered(self) -> int:
        """The body size of the largest request written and not answered yet (0: none)."""
        return max(self._sizes.values(), default=0)

    async def auth(self, token: str, **fields: Any) -> Frame:
        reply = await self.request("auth", token=token, **fields)
        self.uid = reply["uid"]
        return reply

    def next_push(self) -> Deferred[Frame]:
        """The next push frame (only when C{on_push} is left as the default)."""
        return self._pushes.get()

    @property
    def pending_pushes(self) -> int:
        return len(self._pushes.pending)

    def close(self) -> Deferred[None]:
        if self.is_open:
            self.transport.loseConnection()
        return self.closed


def endpoint_string(target: str) -> str:
    """
    A Twisted client endpoint string for C{tcp://host:port} (or
    C{tls://host:port}) URLs; anything else is taken as one already.
    """
    for scheme, kind in (("tcp://", "tcp"), ("tls://", "tls")):
        if target.startswith(scheme):
            parts = urlsplit(target)
            if parts.hostname is None or parts.port is None:
                raise ValueError(f"{target!r}: expected {scheme}host:port")
            host = parts.hostname.replace(":", "\\:")
            return f"{kind}:host={host}:port={parts.port}"
    return target


async def connect(
    reactor: Any,
    endpoint: str | IStreamClientEndpoint,
    token: str | None = None,
    **auth_fields: Any,
) -> IMClientProtocol:
    """
    Connect (and authenticate if a token is given). C{endpoint} is a
    Twisted endpoint string (C{tcp:127.0.0.1:7000}), a C{tcp://host:port}
    URL, or an endpoint.
    """
    ep: IStreamClientEndpoint = (
        clientFromString(reactor, endpoint_string(endpoint))
        if isinstance(endpoint, str)
        else endpoint
    )
    proto: Any = await ep.connect(Factory.forProtocol(IMClientProtocol))
    assert isinstance(proto, IMClientProtocol)
    if token is not None:
        await proto.auth(token, **auth_fields)
    return proto
