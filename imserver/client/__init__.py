"""
The client SDK (docs/sdk.md).

Applications use L{Client}: it keeps one connection per device (heartbeats,
reconnects with jittered backoff, no reconnect after a kick), catches up
after every connect, de-duplicates and acks what it receives, and sends
through an outbox that retries with the same cid:

    client = Client("tcp://127.0.0.1:7000", token)
    client.on("message", lambda event: print(event.msg["body"]))
    client.start()
    await client.wait_live()
    await client.send(7, "hello")
    await client.close()

The low-level L{IMClientProtocol} (one connection, request/reply by id) stays
for tests, bots and the benchmark:

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

from imserver.client.client import Client, connect_url
from imserver.client.events import (
    Block,
    Clear,
    Delivered,
    Edit,
    Event,
    Hide,
    Kick,
    Message,
    Mute,
    Presence,
    Profile,
    Push,
    Read,
    Recall,
    Reset,
    StateChanged,
    Typing,
)
from imserver.client.protocol import (
    ConnectionClosed,
    IMClientProtocol,
    RequestFailed,
    connect,
)
from imserver.client.store import JSONFileStore, MemoryStore, Store
from imserver.client.websocket import HandshakeFailed, connect_ws

__all__ = [
    "Block",
    "Clear",
    "Client",
    "ConnectionClosed",
    "Delivered",
    "Edit",
    "Event",
    "HandshakeFailed",
    "Hide",
    "IMClientProtocol",
    "JSONFileStore",
    "Kick",
    "MemoryStore",
    "Message",
    "Mute",
    "Presence",
    "Profile",
    "Push",
    "Read",
    "Recall",
    "RequestFailed",
    "Reset",
    "StateChanged",
    "Store",
    "Typing",
    "connect",
    "connect_url",
    "connect_ws",
]
