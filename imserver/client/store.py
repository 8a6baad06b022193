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
import threading
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

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

    C{save} keeps the state and encodes it at the end of the reactor turn
    (C{callLater(0)}, on the reactor: a snapshot from then on; the client
    gives a new dict at every save), once per turn however many saves it
    had. The file is written in a thread of the reactor's pool, so an fsync
    never blocks the reactor. At most one write is in flight: states encoded
    meanwhile only replace the one to write, and the latest is written as
    soon as that write ends. L{flush} writes the latest state synchronously
    (after the write in flight, if any): the client calls it when it stops.
    Without a reactor able to run threads (none given, or a test clock)
    every C{save} writes at once.

    A file that cannot be read as a state is moved aside to
    C{<path>.corrupt} (logged) and the store starts empty.

    @param run_in_thread: C{(f, *args) -> Deferred} running C{f} off the
        reactor thread; by default C{deferToThreadPool} on the reactor's pool.
    """

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        *,
        run_in_thread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self.path = path
        self._reactor: Any = None
        self._run_in_thread = run_in_thread
        #: The state saved this turn, not encoded yet; the latest encoded
        #: one and its version (one per save).
        self._pending: dict[str, Any] | None = None
        self._call: Any = None
        self._version = 0
        self._latest: str | None = None
        self._latest_version = 0
        #: The newest version known written (reactor side: the thread's and flush's).
        self._written = 0
        #: The version on disk (read and written under the lock, by any thread).
        self._on_disk = 0
        self._lock = threading.Lock()
        self._writing: Deferred[Any] | None = None
        #: How many times the file was written (for tests and benchmarks).
        self.writes = 0
        if reactor is not None:
            self.use_reactor(reactor)

    def use_reactor(self, reactor: Any) -> None:
        """The client's reactor, unless one was given: the file is written in its threads."""
        if self._reactor is not None:
            return
        self._reactor = reactor
        if self._run_in_thread is None and IReactorThreads.providedBy(reactor):

            def run_in_thread(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
                return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

            self._run_in_thread = run_in_thread

    def load(self) -> dict[str, Any] | None:
        self._encode()
        if self._latest is not None:
            state = json.loads(self._latest)
            return state if isinstance(state, dict) else None
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
        self._pending = state
        self._version += 1
        if self._run_in_thread is None:
            self.flush()
        elif self._call is None:
            self._call = self._reactor.callLater(0, self._turn)

    def _encode(self) -> None:
        if self._pending is not None:
            self._latest, self._pending = json.dumps(self._pending), None
            self._latest_version = self._version

    def _turn(self) -> None:
        self._call = None
        try:
            self._encode()
        except Exception:
            self._pending = None  # not JSON-able: the next save says it again
            log.failure("encoding the client state for {path} failed", path=self.path)
            return
        if self._writing is None:
            self._write_in_thread()

    def _write_in_thread(self) -> None:
        assert self._run_in_thread is not None and self._latest is not None
        version = self._latest_version
        d = self._run_in_thread(self._write, self._latest, version)
        self._writing = d

        def done(_: object) -> None:
            self._writing = None
            self._written = max(self._written, version)
            if self._latest_version > self._written:
                self._write_in_thread()  # encoded meanwhile: the latest state now

        def failed(f: Failure) -> None:
            self._writing = None
            # Not retried at once (a full disk would spin): the next save or flush writes.
            log.failure("saving the client state to {path} failed", f, path=self.path)

        d.addCallbacks(done, failed)

    def flush(self) -> None:
        """Write the latest state now, synchronously, if it is not on disk yet."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._encode()
        if self._latest is not None and self._latest_version > self._written:
            self._write(self._latest, self._latest_version)
            self._written = self._latest_version

    def _write(self, data: str, version: int) -> None:
        """Write C{data} unless a newer version is on disk already (any thread)."""
        with self._lock:
            if version <= self._on_disk:
                return
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".imserver-", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            self._on_disk = version
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
