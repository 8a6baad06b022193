"""
The content filter: case-insensitive multi-pattern matching (Aho-Corasick,
pyahocorasick) over every string of a message body.

C{reject} refuses a message that contains a listed word or phrase
(C{content_blocked}); C{mask} replaces each match with C{*}, one per
character, in what is stored and delivered. Map keys are not filtered, only
string values (at any depth).
"""

from __future__ import annotations

from typing import Any

import ahocorasick

from imserver.errors import ErrorCode, ImError


def _fold(text: str) -> str:
    """Lower-case without changing the length, so match offsets stay valid."""
    if text.isascii():
        return text.lower()
    return "".join(c if len(low := c.lower()) != 1 else low for c in text)


class ContentFilter:
    def __init__(self, words: list[str], action: str = "reject") -> None:
        if action not in ("reject", "mask"):
            raise ValueError("action must be reject or mask")
        self.action = action
        self._automaton: Any = None
        patterns = {_fold(w.strip()) for w in words if w.strip()}
        if patterns:
            automaton = ahocorasick.Automaton()
            for pattern in patterns:
                automaton.add_word(pattern, len(pattern))
            automaton.make_automaton()
            self._automaton = automaton

    @classmethod
    def from_file(cls, path: str | None, action: str) -> ContentFilter:
        if path is None:
            return cls([], action)
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if not line.lstrip().startswith("#")]
        return cls(lines, action)

    @property
    def enabled(self) -> bool:
        return self._automaton is not None

    def apply(self, body: Any) -> Any:
        """
        Return the body to store (masked if so configured).

        @raise ImError: C{content_blocked} when rejecting.
        """
        if self._automaton is None:
            return body
        if type(body) is str:
            return self._text(body)
        if type(body) is dict:
            return {k: self.apply(v) for k, v in body.items()}
        if type(body) is list:
            return [self.apply(v) for v in body]
        return body

    def _text(self, text: str) -> str:
        assert self._automaton is not None
        spans = [(end - length + 1, end + 1) for end, length in self._automaton.iter(_fold(text))]
        if not spans:
            return text
        if self.action == "reject":
            raise ImError(ErrorCode.CONTENT_BLOCKED, "the message contains blocked content")
        chars = list(text)
        for start, stop in spans:
            chars[start:stop] = "*" * (stop - start)
        return "".join(chars)
