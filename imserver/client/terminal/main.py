"""The running program: the terminal, the Client and the app, wired on a reactor."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.stdio import StandardIO
from twisted.logger import globalLogBeginner, textFileLogObserver

from imserver.client.terminal.app import ChatApp
from imserver.client.terminal.model import ChatModel
from imserver.client.terminal.screen import TerminalProtocol


def make_client(
    reactor: Any, url: str, token: str | Callable[[], str], device: str | None, store: Any
) -> Any:
    from imserver.client import Client

    return Client(url, token, device=device, store=store, client="imserver-chat", reactor=reactor)


def chat(
    reactor: Any,
    uid: int,
    url: str,
    token: str | Callable[[], str],
    state_path: str,
    args: argparse.Namespace,
) -> Deferred[None]:
    """Run until the user quits (or stdin closes); the terminal is restored in any case."""
    from imserver.client.store import JSONFileStore

    if args.log:
        log_file = open(args.log, "a", encoding="utf-8")  # noqa: SIM115 (open for the run)
        globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    else:
        globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)

    # The Client keeps its device name (a new one the first time), seq and outbox there.
    client = make_client(reactor, url, token, args.device, JSONFileStore(state_path))
    model = ChatModel(uid, device=client.device, now=reactor.seconds)
    # Keys and the end of stdin go to the app (made next: they come once StandardIO runs).
    terminal = TerminalProtocol(reactor, lambda key: app.key(key), lambda: app.quit())
    app = ChatApp(client, model, terminal.draw, terminal.size, nickname=args.nick, clock=reactor)
    StandardIO(terminal, reactor=reactor)
    reactor.addSystemEventTrigger("before", "shutdown", terminal.restore)
    previous = signal.signal(signal.SIGWINCH, lambda *_: reactor.callFromThread(app.resized))
    app.start()

    async def run() -> None:
        try:
            await app.done
        finally:
            signal.signal(signal.SIGWINCH, previous)
            terminal.restore()
            terminal.transport.loseConnection()  # written out first, then closed
            await terminal.lost

    return Deferred.fromCoroutine(run())
