"""
``python -m bench.connmem [N]``: the Python memory and the gc-tracked objects
of N authenticated connections in the gateway, in one process, without
sockets (issue 13): a C{Gateway} on a fake clock, each connection a
C{ClientProtocol} on a C{StringTransport} that has sent its auth. Measured
with tracemalloc after a full collection, so that it is the same on a busy
machine and names what one connection costs in Python (the kernel's socket
buffers and Twisted's C{tcp.Server} of a real connection come on top; C{bench
idle} measures those with RSS).

Keep N at a few thousand on a commit that arms a DelayedCall per connection:
the fake clock keeps its calls in a sorted list (quadratic), the reactor does not.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from imserver.config import ServerConfig
from imserver.gateway.protocol import Gateway
from imserver.services.registry import LocalRegistry
from imserver.services.tokens import TokenService
from imserver.wire.codec import encode


def measure(n: int) -> dict[str, float]:
    clock = Clock()
    clock.advance(1_700_000_000)
    tokens = TokenService("connmem-secret-0123456789-abcdefghijkl")
    gateway = Gateway(
        config=ServerConfig(idle_timeout_seconds=90),
        clock=clock,
        tokens=tokens,
        presence=LocalRegistry(),
        on_login=lambda claims, conn, request: succeed(None),
    )
    now = clock.seconds()
    auths = [
        encode({"t": "auth", "id": 1, "token": tokens.mint(u, now=now, ttl_seconds=600)})
        for u in range(1, n + 1)
    ]
    kept = []
    gc.collect()
    gc.freeze()
    tracemalloc.start()
    bytes0, objects0 = tracemalloc.get_traced_memory()[0], len(gc.get_objects())
    for auth in auths:
        proto = gateway.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(auth)
        transport.clear()
        kept.append((proto, transport))
    gc.collect()
    bytes1, objects1 = tracemalloc.get_traced_memory()[0], len(gc.get_objects())
    tracemalloc.stop()
    return {
        "connections": n,
        "bytes_per_connection": round((bytes1 - bytes0) / n),
        "tracked_objects_per_connection": round((objects1 - objects0) / n, 2),
        "delayed_calls": len(clock.getDelayedCalls()),
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    print(measure(n))


if __name__ == "__main__":
    main()
