"""
The HTTP transport of the API: a L{Site} whose requests refuse large bodies
while they arrive, and an access log through L{twisted.logger}.

A body is limited to L{MAX_BODY} bytes. A C{Content-Length} above it is
refused as soon as the headers are in; a chunked body is counted chunk by
chunk and refused as soon as it passes the limit. Either way nothing past
the limit is kept: the server answers 413 at once (C{Connection: close}),
half-closes the connection so the client reads the whole answer, and
discards what the client still sends for a short while
(L{LINGER_SECONDS}, at most L{LINGER_BYTES}) before it aborts the connection.
Closing at once would make the kernel reset the connection and could lose
the answer before the client reads it.
"""

from __future__ import annotations

from collections import Counter
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import REQUEST_ENTITY_TOO_LARGE, RESPONSES
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from imserver.http.resource import JSON_TYPE, error_body

#: The largest request body accepted, in bytes.
MAX_BODY = 64 * 1024
#: After refusing a body: how long to keep reading (and discarding) it ...
LINGER_SECONDS = 5.0
#: ... and how many more bytes to discard before giving up on the client.
LINGER_BYTES = 1024 * 1024
#: Idle connections are closed after this long.
IDLE_TIMEOUT_SECONDS = 60.0


class ApiRequest(Request):
    """A request whose body is limited while it is received (see the module)."""

    log = Logger()

    _body: BytesIO
    _received = 0
    _refused = False
    _discarded = 0
    _linger: IDelayedCall | None = None

    def _site(self) -> ApiSite:
        channel: Any = self.channel
        site = channel.site
        assert isinstance(site, ApiSite)
        return site

    def _transport(self) -> Any:
        channel: Any = self.channel
        return None if channel is None else channel.transport

    def gotLength(self, length: int | None) -> None:
        # The body is small: keep it in memory (never a temporary file).
        self._body = self.content = BytesIO()
        if length is not None and length > self._site().max_body:
            # allHeadersReceived answers "100 Continue" after this: not now.
            self.requestHeaders.removeHeader(b"Expect")
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            self._discard(len(data))
            return
        self._received += len(data)
        if self._received > self._site().max_body:
            self._body = self.content = BytesIO()
            self._refuse()
            return
        self._body.write(data)

    def _refuse(self) -> None:
        """Answer 413 now, half-close, and discard the rest of the body for a while."""
        self._refused = True
        site = self._site()
        site.refused += 1
        body = error_body(
            "payload_too_large", f"the request body is larger than {site.max_body} bytes"
        )
        head = [
            b"HTTP/1.1 413 " + RESPONSES[REQUEST_ENTITY_TOO_LARGE],
            b"Content-Type: " + JSON_TYPE,
            b"Content-Length: %d" % len(body),
            b"Cache-Control: no-store",
            b"Connection: close",
        ]
        transport = self._transport()
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.log.info(
            "refused a request body over {limit} bytes from {client}",
            limit=site.max_body,
            client=_client(self),
        )
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        half_close()
        self._linger = site.clock.callLater(LINGER_SECONDS, self._abort)

    def _discard(self, n: int) -> None:
        self._discarded += n
        if self._discarded > LINGER_BYTES:
            self._abort()

    def _abort(self) -> None:
        self._stop_lingering()
        transport = self._transport()
        if transport is not None:
            transport.abortConnection()

    def process(self) -> None:
        if self._refused:
            # Answered already; the connection is closing.
            return
        super().process()

    def connectionLost(self, reason: Failure) -> None:
        self._stop_lingering()
        super().connectionLost(reason)

    def _stop_lingering(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None


class ApiSite(Site):
    """The API's site: L{ApiRequest}s, structured access log, no form parsing."""

    requestFactory = ApiRequest
    noisy = False
    access_log = Logger()

    def __init__(
        self,
        resource: IResource,
        *,
        clock: IReactorTime,
        max_body: int = MAX_BODY,
        timeout: float = IDLE_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, timeout=timeout, reactor=clock)
        self.clock = clock
        self.max_body = max_body
        self.displayTracebacks = False
        #: Bodies refused for their size (read by tests and metrics).
        self.refused = 0
        #: Answered requests by status code (read by metrics).
        self.answered: Counter[int] = Counter()

    def log(self, request: Any) -> None:
        """One access-log event per answered request, with its fields."""
        self.answered[request.code] += 1
        self.access_log.info(
            "{client} {method} {path} {code} {length}",
            client=_client(request),
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            code=request.code,
            length=request.sentLength,
        )


def _client(request: Any) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return str(address) if host is None else str(host)
