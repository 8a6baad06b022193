"""
JSON resources: routing nodes, endpoints with async handlers, and the error
vocabulary of the HTTP API.

An L{Endpoint} maps methods to C{async} handlers. Its C{render} starts the
handler with L{Deferred.fromCoroutine} and returns C{NOT_DONE_YET}; the
answer is written when the handler is done, unless the client went away
meanwhile. Handlers return a L{Reply} or raise L{HttpError} (or
L{imserver.errors.ImError}, mapped by L{STATUS_BY_CODE}); anything else is
logged with its traceback and answered 500 C{internal}.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from imserver.errors import ErrorCode, ImError

JSON_TYPE = b"application/json"

#: HTTP status of each L{ErrorCode} an L{ImError} may carry.
STATUS_BY_CODE: Mapping[str, int] = {
    ErrorCode.INVALID: 400,
    ErrorCode.TOO_LARGE: 400,
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.FRAME_TOO_LARGE: 400,
    ErrorCode.CONTENT_BLOCKED: 400,
    ErrorCode.TOO_LATE: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.AUTH_FAILED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NO_SUCH_USER: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNKNOWN_OP: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}
#: Seconds a client should wait before retrying a 503.
RETRY_AFTER_SECONDS = 1


def json_body(obj: Any) -> bytes:
    """Compact UTF-8 JSON and a newline (friendly to curl)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode() + b"\n"


def error_body(code: str, message: str) -> bytes:
    return json_body({"error": code, "message": message})


Headers = tuple[tuple[bytes, bytes], ...]


@attrs.frozen
class Reply:
    """A complete answer: status, body and headers."""

    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    headers: Headers = ()


def json_reply(obj: Any, status: int = 200, headers: Headers = ()) -> Reply:
    return Reply(status, json_body(obj), JSON_TYPE, headers)


class HttpError(Exception):
    """An error answer: C{{"error": code, "message": message}} with a status."""

    def __init__(self, status: int, code: str, message: str, headers: Headers = ()) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def reply(self) -> Reply:
        return Reply(self.status, error_body(self.code, self.message), JSON_TYPE, self.headers)


def im_error_reply(error: ImError) -> Reply:
    status = STATUS_BY_CODE.get(error.code, 400)
    headers: Headers = ()
    if status == 503:
        headers = ((b"Retry-After", b"%d" % RETRY_AFTER_SECONDS),)
    return HttpError(status, str(error.code), error.message, headers).reply()


def not_found() -> HttpError:
    return HttpError(404, ErrorCode.NOT_FOUND, "no such route")


@attrs.frozen
class Call:
    """What a handler gets: the request and its whole body (read before any wait)."""

    request: Request
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        value: bytes | None = self.request.getHeader(name)
        return value


Handler = Callable[[Call], Awaitable[Reply]]


class Responder:
    """Runs handlers and writes their answers (or errors) to requests still connected."""

    log = Logger()

    def dispatch(self, request: Request, handler: Handler) -> int:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        content: Any = request.content
        content.seek(0)
        call = Call(request, content.read())
        d = Deferred.fromCoroutine(self._answer(call, handler, gone))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _answer(self, call: Call, handler: Handler, gone: list[Failure]) -> None:
        request = call.request
        try:
            reply = await handler(call)
        except HttpError as e:
            reply = e.reply()
        except ImError as e:
            reply = im_error_reply(e)
        except Exception:
            self.log.failure(
                "HTTP {method} {path} failed",
                method=_text(request.method),
                path=_text(request.path),
            )
            reply = HttpError(500, ErrorCode.INTERNAL, "internal server error").reply()
        if gone or request.finished:
            self.log.info(
                "HTTP {method} {path}: the client left before the answer ({status})",
                method=_text(request.method),
                path=_text(request.path),
                status=reply.status,
            )
            return
        write_reply(request, reply)

    def _failed(self, failure: Failure, request: Request) -> None:
        self.log.failure("HTTP {path}: cannot answer", failure, path=_text(request.path))
        if not request.finished and request.channel is not None:
            request.loseConnection()


def write_reply(request: Request, reply: Reply) -> None:
    request.setResponseCode(reply.status)
    request.setHeader(b"Content-Type", reply.content_type)
    request.setHeader(b"Content-Length", b"%d" % len(reply.body))
    request.setHeader(b"Cache-Control", b"no-store")
    for name, value in reply.headers:
        request.setHeader(name, value)
    request.write(reply.body)
    request.finish()


def _text(raw: bytes) -> str:
    return raw.decode("latin-1")


class JsonResource(Resource):
    """A resource of the API: anything below it that is not a child is a JSON 404."""

    def __init__(self, responder: Responder) -> None:
        super().__init__()
        self.responder = responder

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NotFound(self.responder)

    def render(self, request: Request) -> int:
        return self.responder.dispatch(request, self.handler_for(request))

    def handler_for(self, request: Request) -> Handler:
        return _raise(not_found())


class NotFound(JsonResource):
    pass


class Refuse(JsonResource):
    """Answers every request below it with one error (403 for a bad admin key)."""

    def __init__(self, responder: Responder, error: HttpError) -> None:
        super().__init__(responder)
        self.error = error

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self

    def handler_for(self, request: Request) -> Handler:
        return _raise(self.error)


class Endpoint(JsonResource):
    """A route: C{handlers()} maps methods to handlers; HEAD is GET without the body."""

    def handlers(self) -> Mapping[bytes, Handler]:
        raise NotImplementedError

    def handler_for(self, request: Request) -> Handler:
        handlers = self.handlers()
        method = request.method
        handler = handlers.get(b"GET" if method == b"HEAD" else method)
        if handler is not None:
            return handler
        allowed = sorted({*handlers, b"HEAD"} if b"GET" in handlers else handlers)
        error = HttpError(
            405,
            "method_not_allowed",
            f"{_text(method)} is not allowed here; use {_text(b', '.join(allowed))}",
            ((b"Allow", b", ".join(allowed)),),
        )
        return _raise(error)


def _raise(error: HttpError) -> Handler:
    """A handler that answers with C{error}."""
    reply = error.reply()

    async def handler(call: Call) -> Reply:
        return reply

    return handler
