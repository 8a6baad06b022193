"""
The terminal: raw-mode keys in, L{View}s out as ANSI, redrawing only the
rows that changed. Used over L{twisted.internet.stdio.StandardIO}.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from imserver.client.terminal.keys import KeyParser
from imserver.client.terminal.model import View

CSI = "\x1b["
STYLES = {
    "": "",
    "title": CSI + "1;7m",
    "header": CSI + "1m",
    "selected": CSI + "7m",
    "dim": CSI + "2m",
    "mine": CSI + "36m",
    "input": "",
}
#: A lone ESC is a key once no sequence follows it within this many seconds.
ESC_DELAY = 0.05


def encode_view(view: View, previous: tuple[Any, ...] = ()) -> str:
    """The escape sequences that turn C{previous}'s rows into C{view}'s."""
    out = [CSI + "?25l"]
    for row, line in enumerate(view.lines):
        if row < len(previous) and previous[row] == line:
            continue
        out.append(f"{CSI}{row + 1};1H{STYLES.get(line.style, '')}{line.text}{CSI}0m{CSI}K")
    row, col = view.cursor
    out.append(f"{CSI}{row + 1};{col + 1}H{CSI}?25h")
    return "".join(out)


class TerminalProtocol(Protocol):
    """
    The process's terminal. C{on_key} gets each key, C{on_close} is called
    when stdin ends. L{draw} writes a view; L{restore} gives the terminal
    back as it was (cooked mode, main screen).
    """

    transport: Any

    def __init__(
        self,
        reactor: Any,
        on_key: Callable[[str], None],
        on_close: Callable[[], None],
        fd: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.on_key = on_key
        self.on_close = on_close
        self.fd = sys.stdin.fileno() if fd is None else fd
        self._parser = KeyParser()
        self._esc_timer: Any = None
        self._saved_mode: Any = None
        self._previous: tuple[Any, ...] = ()
        self._restored = False
        #: Fires when both ends are closed (after L{restore} and C{loseConnection}).
        self.lost: Deferred[None] = Deferred()

    def size(self) -> tuple[int, int]:
        """(columns, rows) of the terminal (80x24 when it cannot be told)."""
        try:
            size = os.get_terminal_size(sys.stdout.fileno())
        except (OSError, ValueError):
            return 80, 24
        return size.columns, size.lines

    def connectionMade(self) -> None:
        if os.isatty(self.fd):
            import termios
            import tty

            self._saved_mode = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        # Alternate screen, cleared.
        self.transport.write(f"{CSI}?1049h{CSI}2J".encode())

    def dataReceived(self, data: bytes) -> None:
        if self._esc_timer is not None and self._esc_timer.active():
            self._esc_timer.cancel()
        self._esc_timer = None
        for key in self._parser.feed(data):
            self.on_key(key)
        if self._parser.pending:
            self._esc_timer = self.reactor.callLater(ESC_DELAY, self._flush)

    def _flush(self) -> None:
        self._esc_timer = None
        for key in self._parser.flush():
            self.on_key(key)

    def draw(self, view: View, full: bool = False) -> None:
        if self._restored:
            return
        previous = () if full else self._previous
        prefix = f"{CSI}0m{CSI}2J" if full else ""
        self.transport.write((prefix + encode_view(view, previous)).encode("utf-8"))
        self._previous = view.lines

    def restore(self) -> None:
        if self._restored:
            return
        self._restored = True
        if self._esc_timer is not None and self._esc_timer.active():
            self._esc_timer.cancel()
        self.transport.write(f"{CSI}0m{CSI}?25h{CSI}?1049l".encode())
        if self._saved_mode is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved_mode)
            self._saved_mode = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.lost.called:
            self.lost.callback(None)
        self.on_close()
