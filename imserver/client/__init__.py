"""
The client SDK: wire protocol v1 for Python programs (tests, the benchmark
tool, bots).

    client = await connect(reactor, "tcp:127.0.0.1:7000", token)
    # or over WebSocket: await connect_ws(reactor, "ws://127.0.0.1:7001/v1/ws", token)
    reply = await client.request("send", to=7, cid="c1", body="hello")
    push = await client.next_push()          # {"t": "msg", ...}
    await client.close()

L{IMClientProtocol.request} fires with the C{ok} frame or fails with
L{RequestFailed}; pushes (and error frames without an id) go to C{on_push},
by default a queue read by L{IMClientProtocol.next_push}. A C{{"t": "sync"}}
push (docs/protocol.md) arrives there too: it asks the program to C{sync},
as after a reconnect, because pushes may have been lost; ignoring it only
delays those messages to the next C{sync}.
"""

from imserver.client.protocol import (
    ConnectionClosed,
    IMClientProtocol,
    RequestFailed,
    connect,
)
from imserver.client.websocket import HandshakeFailed, connect_ws

__all__ = [
    "ConnectionClosed",
    "HandshakeFailed",
    "IMClientProtocol",
    "RequestFailed",
    "connect",
    "connect_ws",
]
