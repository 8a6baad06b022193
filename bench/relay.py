"""
The baseline: a bare Twisted relay speaking wire protocol v1, no storage.

``python -m bench.relay --port 0 --secret S`` prints ``listening PORT`` on
stdout once it accepts connections.

It uses the server's own framing and codec (L{FrameDecoder}, L{decode_body},
L{encode}: the same checks, one C{transport.write} per frame, like the
server), so the difference with imserver is what imserver does beyond
decode -> route by uid -> encode:

* C{auth}: the token is verified with the same secret and the same
  L{TokenService} as the server (so C{connect} numbers compare the same
  crypto); a second login of a uid replaces the first, without a kick;
* C{send}: a push C{{"t": "msg", ...}} shaped like the server's (msg object
  with a constant C{sender} profile and unread counts) is written to the
  recipient if connected, then C{{"t": "ok", "id", "msg_id", "session_id",
  "ts", "dup": false}}; nothing is stored, an offline recipient loses it;
* like imserver, connections turn Nagle's algorithm off (C{TCP_NODELAY})
  unless C{--nagle} is given;
* C{ack}, C{ping}: ok (C{server_time} for ping); C{sync}: an empty page;
  anything else: C{unknown_op};
* C{--devices} (several devices per user, L{FanoutProtocol}): every
  connection of a uid stays online, and a C{send} is pushed to every
  connection of the recipient and every other connection of the sender, as
  imserver does; without it the routing above is left as it was.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from imserver.services.tokens import TokenService
from imserver.wire.codec import BadFrame, Frame, decode_body, encode
from imserver.wire.framing import FrameDecoder, FrameTooLarge

reactor: Any = _reactor
SENDER = {"nickname": "", "avatar": ""}
MASK53 = (1 << 53) - 1


def session_of(a: int, b: Any) -> int:
    """A stable id for the pair, below 2**53 like the server's."""
    if not isinstance(b, int):
        return 0
    low, high = min(a, b), max(a, b)
    return (low * 1_000_003 ^ high) & MASK53 or 1


class RelayProtocol(Protocol):
    transport: Any

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.decoder = FrameDecoder(relay.max_frame_bytes)
        self.uid: int | None = None

    def connectionMade(self) -> None:
        if not self.relay.nagle:
            self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        try:
            bodies = self.decoder.feed(data)
        except FrameTooLarge:
            self.error("frame_too_large", None)
            self.transport.loseConnection()
            return
        for body in bodies:
            try:
                frame = decode_body(body)
            except BadFrame as e:
                self.error("bad_frame", None, str(e))
                continue
            self.handle(frame)

    def handle(self, f: Frame) -> None:
        t = f.get("t")
        req_id = f.get("id")
        write = self.transport.write
        if self.uid is None:
            if t != "auth":
                self.error("unauthenticated", req_id)
                self.transport.loseConnection()
                return
            try:
                uid = self.relay.tokens.verify(f.get("token", ""), now=time.time())
            except Exception:
                self.error("auth_failed", req_id)
                self.transport.loseConnection()
                return
            self.uid = uid
            self.relay.online[uid] = self
            write(encode({"t": "ok", "id": req_id, "uid": uid, "heartbeat": 30.0,
                          "server_time": int(time.time() * 1000)}))  # fmt: skip
        elif t == "send":
            to = f.get("to")
            relay = self.relay
            msg_id = next(relay.ids)
            ts = int(time.time() * 1000)
            sender = self.uid
            session_id = session_of(sender, to)
            peer = relay.online.get(to) if isinstance(to, int) else None
            if peer is not None:
                peer.transport.write(
                    encode(
                        {
                            "t": "msg",
                            "msg_id": msg_id,
                            "session_id": session_id,
                            "from": sender,
                            "to": to,
                            "cid": f.get("cid"),
                            "type": f.get("type", "text"),
                            "body": f.get("body"),
                            "ts": ts,
                            "sender": SENDER,
                            "unread": 1,
                            "total_unread": 1,
                        }
                    )
                )
            write(encode({"t": "ok", "id": req_id, "msg_id": msg_id, "session_id": session_id,
                          "ts": ts, "dup": False}))  # fmt: skip
        elif t == "ack":
            write(encode({"t": "ok", "id": req_id}))
        elif t == "ping":
            write(encode({"t": "ok", "id": req_id, "server_time": int(time.time() * 1000)}))
        elif t == "sync":
            write(encode({"t": "ok", "id": req_id, "msgs": [], "more": False}))
        else:
            self.error("unknown_op", req_id)

    def error(self, code: str, req_id: Any, message: str = "") -> None:
        frame: Frame = {"t": "error", "code": code, "message": message or code}
        if req_id is not None:
            frame["id"] = req_id
        self.transport.write(encode(frame))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.uid is not None and self.relay.online.get(self.uid) is self:
            del self.relay.online[self.uid]


class FanoutProtocol(RelayProtocol):
    """Several connections per uid (C{--devices}): a message goes to every
    connection of its recipient and to the sender's other connections, encoded
    once per connection like imserver (the recipient's frame has unread counts,
    the sender's does not). A subclass, so the one-device relay keeps its path."""

    def handle(self, f: Frame) -> None:
        t = f.get("t")
        if self.uid is None or t != "send":
            was = self.uid
            super().handle(f)
            if was is None and self.uid is not None:
                self.relay.devices.setdefault(self.uid, []).append(self)
            return
        to = f.get("to")
        relay = self.relay
        msg_id = next(relay.ids)
        ts = int(time.time() * 1000)
        sender = self.uid
        session_id = session_of(sender, to)
        push = {
            "t": "msg",
            "msg_id": msg_id,
            "session_id": session_id,
            "from": sender,
            "to": to,
            "cid": f.get("cid"),
            "type": f.get("type", "text"),
            "body": f.get("body"),
            "ts": ts,
            "sender": SENDER,
        }
        for peer in relay.devices.get(to, ()) if isinstance(to, int) else ():
            peer.transport.write(encode({**push, "unread": 1, "total_unread": 1}))
        for own in relay.devices.get(sender, ()):
            if own is not self:
                own.transport.write(encode(push))
        ok = {"t": "ok", "id": f.get("id"), "msg_id": msg_id, "session_id": session_id,
              "ts": ts, "dup": False}  # fmt: skip
        self.transport.write(encode(ok))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        conns = self.relay.devices.get(self.uid, []) if self.uid is not None else []
        if self in conns:
            conns.remove(self)
        super().connectionLost(reason)


class Relay(Factory):
    noisy = False

    def __init__(
        self, secret: str, max_frame_bytes: int = 65536, nagle: bool = False, fanout: bool = False
    ) -> None:
        self.tokens = TokenService(secret)
        self.nagle = nagle
        self.max_frame_bytes = max_frame_bytes
        self.online: dict[int, RelayProtocol] = {}
        self.devices: dict[int, list[RelayProtocol]] = {}  # --devices: every connection
        self.protocol_class = FanoutProtocol if fanout else RelayProtocol
        self.ids = itertools.count(1)

    def buildProtocol(self, addr: Any) -> RelayProtocol:
        return self.protocol_class(self)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--secret", required=True)
    parser.add_argument(
        "--nagle", action="store_true", help="keep Nagle on (imserver turns it off)"
    )
    parser.add_argument("--backlog", type=int, default=50, help="listen backlog (Twisted default)")
    parser.add_argument(
        "--devices",
        action="store_true",
        help="several connections per uid: push to all of them (and to the sender's others)",
    )
    args = parser.parse_args()

    def listening(port: Any) -> None:
        sys.stdout.write(f"listening {port.getHost().port}\n")
        sys.stdout.flush()

    endpoint = TCP4ServerEndpoint(
        reactor, args.port, backlog=args.backlog, interface=args.interface
    )
    d = endpoint.listen(Relay(args.secret, nagle=args.nagle, fanout=args.devices))
    d.addCallbacks(listening, lambda f: (sys.stderr.write(f.getTraceback()), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
