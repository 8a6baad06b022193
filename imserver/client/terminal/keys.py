"""
Keyboard input: the bytes a terminal sends in raw mode, as keys.

A key is a one-character string for text, or a name for the rest:
C{"enter"}, C{"backspace"}, C{"delete"}, C{"tab"}, C{"esc"}, C{"up"},
C{"down"}, C{"left"}, C{"right"}, C{"home"}, C{"end"}, C{"pgup"},
C{"pgdn"}, C{"ctrl-a"} ... C{"ctrl-z"}. Escape sequences this does not know
are dropped, not typed.
"""

from __future__ import annotations

import codecs

ESC = "\x1b"

_CSI_FINAL = {"A": "up", "B": "down", "C": "right", "D": "left", "H": "home", "F": "end"}
_CSI_TILDE = {
    "1": "home",
    "2": "insert",
    "3": "delete",
    "4": "end",
    "5": "pgup",
    "6": "pgdn",
    "7": "home",
    "8": "end",
}
_CONTROL = {"\r": "enter", "\n": "enter", "\t": "tab", "\x7f": "backspace", "\x08": "backspace"}


class KeyParser:
    """
    Incremental: a sequence split between two reads is completed by the
    next. A lone ESC cannot be told from the start of a sequence until more
    bytes come, so it waits in L{pending} until the caller's timer calls
    L{flush}.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[str]:
        self._buffer += self._decoder.decode(data)
        keys: list[str] = []
        while self._buffer:
            used = self._one(self._buffer, keys)
            if used == 0:
                break
            self._buffer = self._buffer[used:]
        return keys

    def flush(self) -> list[str]:
        """What is left as keys: an incomplete sequence counts as a lone ESC."""
        rest, self._buffer = self._buffer, ""
        return ["esc"] if rest else []

    def _one(self, buf: str, keys: list[str]) -> int:
        """Parse one key at the start of C{buf}: the characters used (0: need more)."""
        ch = buf[0]
        if ch != ESC:
            if ch in _CONTROL:
                if ch == "\r" and buf[1:2] == "\n":
                    keys.append("enter")
                    return 2
                keys.append(_CONTROL[ch])
            elif "\x01" <= ch <= "\x1a":
                keys.append("ctrl-" + chr(ord(ch) + 0x60))
            elif ch.isprintable() or ch == " ":
                keys.append(ch)
            return 1
        if len(buf) == 1:
            return 0
        kind = buf[1]
        if kind == "O":  # SS3: ESC O A (application cursor keys)
            if len(buf) < 3:
                return 0
            name = _CSI_FINAL.get(buf[2])
            if name:
                keys.append(name)
            return 3
        if kind != "[":
            keys.append("esc")
            return 1
        for i in range(2, len(buf)):
            if "\x40" <= buf[i] <= "\x7e":
                params, final = buf[2:i], buf[i]
                name = _CSI_TILDE.get(params.split(";")[0]) if final == "~" else None
                name = name or (_CSI_FINAL.get(final) if final != "~" else None)
                if name:
                    keys.append(name)
                return i + 1
            if not ("\x20" <= buf[i] <= "\x3f"):
                return i  # broken sequence: drop what came before this character
        return 0
