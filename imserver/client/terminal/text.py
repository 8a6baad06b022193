"""
Terminal text: what a string looks like in cells.

Bodies and nicknames come from other users, so everything shown goes through
L{clean} first: a control character in a message must never reach the
terminal as an escape sequence.
"""

from __future__ import annotations

import unicodedata


def clean(text: str) -> str:
    """One line of untrusted text, printable only (tabs become spaces)."""
    out = []
    for ch in text:
        if ch == "\t":
            out.append(" ")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append("\N{REPLACEMENT CHARACTER}" if ord(ch) >= 0x80 else "?")
    return "".join(out)


def char_cells(ch: str) -> int:
    """Cells one character takes: wide East Asian characters 2, combining marks 0."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def cells(text: str) -> int:
    return sum(char_cells(ch) for ch in text)


def cut(text: str, width: int) -> str:
    """The longest prefix of C{text} that fits in C{width} cells."""
    used = 0
    for i, ch in enumerate(text):
        used += char_cells(ch)
        if used > width:
            return text[:i]
    return text


def fit(text: str, width: int) -> str:
    """C{text} cut or padded with spaces to exactly C{width} cells."""
    text = cut(text, width)
    return text + " " * (width - cells(text))


def tail(text: str, width: int) -> str:
    """The longest suffix of C{text} that fits in C{width} cells (an input line's end)."""
    used = 0
    for i in range(len(text) - 1, -1, -1):
        used += char_cells(text[i])
        if used > width:
            return text[i + 1 :]
    return text


def wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap by cells; words longer than a line are split."""
    width = max(1, width)
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if cells(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while cells(word) > width:
            head = cut(word, width) or word[0]
            lines.append(head)
            word = word[len(head) :]
        line = word
    lines.append(line)
    return lines
