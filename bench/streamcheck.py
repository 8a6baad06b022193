"""
The check of a device's catch-up (``bench catchup``): what its C{catchup}
pages held against what the senders were told was sent.

Pure logic (no reactor), so tests can feed it made-up pages. A page is the
reply C{{"events": [...], "seq": S, "more": bool}}; a C{msg} event is the msg
push frame plus its C{seq} in the user's stream, its body C{{"q": n, ...}}
numbered per sender from 0 (L{bench.wire.send_builder}).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any


class StreamCheck:
    """Every message once, in order per sender; the stream's seqs strictly
    increasing over the pages, and each page's position not behind its events."""

    def __init__(self, expected: Mapping[int, int]) -> None:
        #: sender uid -> messages it had answered ok (q = 0 .. count - 1)
        self.expected = dict(expected)
        self.seen: dict[int, bytearray] = {uid: bytearray(n) for uid, n in expected.items()}
        self.max_q: dict[int, int] = {}
        self.pages = 0
        self.page_sizes: list[int] = []  # events per page (a server may cut pages by size)
        self.events = 0
        self.msg_events = 0
        self.unique = 0
        self.duplicates = 0
        self.reorders = 0
        self.unexpected = 0  # a message from another sender, or a q never sent
        self.seq_errors = 0  # a seq not above the previous one, or a page behind its events
        self.malformed = 0
        self.other: Counter[str] = Counter()  # events of other kinds (read, recall)
        self.last_seq = 0
        self.position: int | None = None  # the last page's seq
        self.more = True

    def page(self, reply: Mapping[str, Any]) -> bool:
        """One page; returns its C{more}."""
        self.pages += 1
        events = reply.get("events")
        if not isinstance(events, list):
            self.malformed += 1
            events = []
        self.page_sizes.append(len(events))
        self.feed(events)
        seq = reply.get("seq")
        if not isinstance(seq, int) or seq < self.last_seq:
            self.seq_errors += 1
        else:
            self.position = self.last_seq = seq
        self.more = bool(reply.get("more"))
        return self.more

    def feed(self, events: Iterable[Any]) -> None:
        for ev in events:
            self.events += 1
            if not isinstance(ev, dict):
                self.malformed += 1
                continue
            seq = ev.get("seq")
            if not isinstance(seq, int) or seq <= self.last_seq:
                self.seq_errors += 1
            else:
                self.last_seq = seq
            kind = ev.get("t")
            if kind != "msg":
                self.other[str(kind)] += 1
                continue
            self.msg_events += 1
            body = ev.get("body")
            q = body.get("q") if isinstance(body, dict) else None
            seen = self.seen.get(ev.get("from"))  # type: ignore[arg-type]
            if seen is None or not isinstance(q, int) or not 0 <= q < len(seen):
                self.unexpected += 1
                continue
            if seen[q]:
                self.duplicates += 1
                continue
            seen[q] = 1
            self.unique += 1
            sender = ev["from"]
            if q < self.max_q.get(sender, -1):
                self.reorders += 1
            else:
                self.max_q[sender] = q

    @property
    def missing(self) -> int:
        return sum(len(s) - sum(s) for s in self.seen.values())

    def result(self) -> dict[str, Any]:
        expected = sum(self.expected.values())
        out: dict[str, Any] = {
            "expected": expected,
            "pages": self.pages,
            "page_sizes": self.page_sizes,
            "events": self.events,
            "msg_events": self.msg_events,
            "unique": self.unique,
            "duplicates": self.duplicates,
            "reorders": self.reorders,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "seq_errors": self.seq_errors,
            "malformed": self.malformed,
            "other_events": dict(self.other),
            "position": self.position,
            "finished": not self.more,
        }
        out["exactly_once_in_order"] = (
            not self.more
            and self.msg_events == self.unique == expected
            and self.duplicates == self.reorders == self.unexpected == 0
            and self.seq_errors == self.malformed == 0
        )
        return out
