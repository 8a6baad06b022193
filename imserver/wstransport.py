"""
The WebSocket side of the framing both ends share (docs/protocol.md, "WebSocket").

Over WebSocket one binary message is one msgpack frame body, with no length
prefix. The gateway's L{ClientProtocol} and the SDK's L{IMClientProtocol}
stay transport-agnostic: they are given a L{MessageTransport}, which turns
each write into one binary message and takes flow control and addresses from
the TCP (or TLS) transport below the autobahn protocol.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IAddress

#: The subprotocol both ends speak (a server accepts only this one).
SUBPROTOCOL = "imserver.v1"

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSED = WebSocketProtocol.STATE_CLOSED


class MessageTransport:
    """
    What a protocol above the WebSocket sees as its transport: a write is one
    binary message, closing is the WebSocket closing handshake (or dropping
    a connection whose handshake has not finished); flow control and
    addresses are the TCP transport's.
    """

    __slots__ = ("ws",)

    def __init__(self, ws: WebSocketProtocol) -> None:
        self.ws = ws

    def write(self, data: bytes) -> None:
        ws = self.ws
        if ws.state == _OPEN:
            ws.sendMessage(data, isBinary=True)

    def writeSequence(self, data: list[bytes]) -> None:
        for body in data:
            self.write(body)

    def loseConnection(self) -> None:
        ws = self.ws
        if ws.state == _OPEN:
            ws.sendClose(1000)
        elif ws.state != _CLOSED:
            ws.dropConnection(abort=False)

    def abortConnection(self) -> None:
        self.transport.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.ws.registerProducer(producer, streaming)  # type: ignore[attr-defined]

    def unregisterProducer(self) -> None:
        self.ws.unregisterProducer()  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def getPeer(self) -> IAddress:
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        return self.transport.getHost()

    @property
    def transport(self) -> Any:
        """The TCP (or TLS) transport below."""
        return self.ws.transport  # type: ignore[attr-defined]
