"""
Where a L{imserver.client.Client} keeps what must outlive the process: its
device name, its place in the user's stream (C{seq}) and the sends not
answered yet, so a restarted app resumes its catch-up and resends with the
same cids (stored once).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Protocol


class Store(Protocol):
    """
    C{load()} returns the state last saved (or None); C{save(state)} replaces
    it. The state is a JSON-able dict: C{{"device": str, "uid": int | None,
    "seq": int, "outbox": [{"cid", "to", "type", "body"}]}}.
    """

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


class MemoryStore:
    """The default: kept for the life of the process (one Client or several in turn)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        return json.loads(json.dumps(self.state)) if self.state is not None else None

    def save(self, state: dict[str, Any]) -> None:
        # A copy, so later changes by the client do not leak in unsaved.
        self.state = json.loads(json.dumps(state))


class JSONFileStore:
    """
    One JSON file, replaced atomically (a temporary file renamed over it),
    so a crash mid-save leaves the previous state, never half a file.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            return None
        return state if isinstance(state, dict) else None

    def save(self, state: dict[str, Any]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".imserver-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state, f)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
