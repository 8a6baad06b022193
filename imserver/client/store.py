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

from twisted.logger import Logger

log = Logger()


class Store(Protocol):
    """
    C{load()} returns the state last saved (or None); C{save(state)} replaces
    it. The state is a JSON-able dict: C{{"device": str, "uid": int | None,
    "seq": int, "outbox": [{"cid", "to", "type", "body"}]}}.
    """

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


#: A store may also have C{flush()}: the client calls it when it stops
#: (close, kick, failed), so a store that defers its writes writes the last
#: state then.


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
    One JSON file, replaced atomically (a temporary file, fsynced, renamed
    over it, the directory fsynced), so a crash mid-save leaves the previous
    state, never half a file.

    Saves are coalesced: C{save} keeps the latest state and writes it once
    per reactor turn (C{callLater(0)}), so a burst of sends is one write, not
    one per send; L{flush} writes at once (the client calls it when it stops).
    Without a reactor every C{save} writes at once. A file that cannot be read
    as a state is moved aside to C{<path>.corrupt} (logged) and the store
    starts empty.
    """

    def __init__(self, path: str, reactor: Any = None) -> None:
        self.path = path
        self._reactor = reactor
        self._pending: dict[str, Any] | None = None
        self._call: Any = None
        #: How many times the file was written (for tests and benchmarks).
        self.writes = 0

    def use_reactor(self, reactor: Any) -> None:
        """The client's reactor, unless one was given: saves are coalesced on it."""
        if self._reactor is None:
            self._reactor = reactor

    def load(self) -> dict[str, Any] | None:
        if self._pending is not None:
            return json.loads(json.dumps(self._pending))
        try:
            with open(self.path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as e:
            aside = self.path + ".corrupt"
            log.error(
                "the client state file {path} is corrupt ({error}): moved to {aside},"
                " starting empty",
                path=self.path,
                error=str(e),
                aside=aside,
            )
            os.replace(self.path, aside)
            return None
        return state if isinstance(state, dict) else None

    def save(self, state: dict[str, Any]) -> None:
        # Kept as given (the client builds a new dict for every save) and
        # encoded at the write: a copy here would cost O(outbox) per send.
        self._pending = state
        if self._reactor is None:
            self.flush()
        elif self._call is None:
            self._call = self._reactor.callLater(0, self._turn)

    def _turn(self) -> None:
        self._call = None
        try:
            self.flush()
        except Exception:
            log.failure("saving the client state to {path} failed", path=self.path)

    def flush(self) -> None:
        """Write the latest state now, if one is not written yet."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        state, self._pending = self._pending, None
        if state is None:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".imserver-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            self._pending = self._pending or state  # tried again at the next save or flush
            raise
        self.writes += 1
        _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (where directories can be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
