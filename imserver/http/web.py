"""
The web chat: the page built from clients/web (committed under
C{imserver/http/static/}, installed as package data, so no node is needed
to serve it), and C{GET /v1/web/config}, which tells the page where to open
its WebSocket.

    GET /                  index.html
    GET /app.js, /app.css  the bundle
    GET /v1/web/config     {"websocket": "ws://HOST:PORT/v1/ws" or null, ...}

Only the bundle's files are served (no directory listing, no other path).
They are revalidated on every load (C{Cache-Control: no-cache} with
C{Last-Modified}): their names carry no hash, and a new server version must
not run an old script.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.static import File

from imserver.gateway.websocket import PATH as WS_PATH
from imserver.gateway.websocket import origin_allowed
from imserver.http.resource import Call, Endpoint, Handler, Reply, Responder, json_reply

STATIC = Path(__file__).parent / "static"
#: The files of the bundle and their content types.
FILES: Mapping[str, bytes] = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "app.css": b"text/css; charset=utf-8",
}
#: The page talks to its own origin (HTTP) and to any WebSocket (the listener
#: may be another port or host); avatars are URLs anywhere.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; "
    b"img-src * data:; connect-src 'self' ws: wss:; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@attrs.frozen
class WebSocketPlace:
    """Where the WebSocket listener is: its port, and whether it is C{ssl:} (wss)."""

    port: int
    secure: bool = False


class StaticFile(File):
    """One file of the bundle, with its content type and the page's headers."""

    def __init__(self, path: Path, content_type: bytes) -> None:
        super().__init__(str(path), defaultType=content_type.decode())
        self.type = content_type.decode()
        self.encoding = None

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return super().render_GET(request)


def add_static(root: Resource, static: Path = STATIC) -> None:
    """Put the bundle's files at C{/} (index.html also as C{/index.html})."""
    for name, content_type in FILES.items():
        child = StaticFile(static / name, content_type)
        root.putChild(name.encode(), child)
        if name == "index.html":
            root.putChild(b"", child)


class WebConfig(Endpoint):
    """
    C{/v1/web/config}: the WebSocket URL for this request's host, or null
    when the listener is off or refuses this page's origin (C{problem} says
    why), and the recall window.
    """

    def __init__(
        self,
        responder: Responder,
        *,
        websocket: Callable[[], WebSocketPlace | None],
        origins: tuple[str, ...],
        recall_seconds: int,
    ) -> None:
        super().__init__(responder)
        self.websocket = websocket
        self.origins = origins
        self.recall_seconds = recall_seconds

    def handlers(self) -> Mapping[bytes, Handler]:
        return {b"GET": self.get}

    async def get(self, call: Call) -> Reply:
        request = call.request
        host = request.getRequestHostname().decode("ascii", "replace")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address (Twisted drops the brackets)
        place = self.websocket()
        url: str | None = None
        problem: str | None = None
        if place is None:
            problem = "the server has no WebSocket listener ([server] websocket is off)"
        else:
            scheme = "wss" if place.secure else "ws"
            url = f"{scheme}://{host}:{place.port}{WS_PATH}"
            origin = page_origin(request)
            if self.origins and not origin_allowed(origin, self.origins):
                problem = f"this page's origin {origin} is not in [server] websocket_origins"
                url = None
        return json_reply(
            {"websocket": url, "problem": problem, "recall_seconds": self.recall_seconds}
        )


def page_origin(request: Request) -> str:
    """The origin a browser gives this page: C{http(s)://} and the Host header."""
    scheme = "https" if request.isSecure() else "http"
    host = (request.getHeader(b"Host") or b"").decode("ascii", "replace")
    return f"{scheme}://{host}"
