"""
Running SQL transactions off the reactor thread.

As in Synapse's C{storage/database.py}: callers write a plain function
C{_something_txn(txn, ...)} that runs in a pool thread, issues statements
through L{Txn} and returns plain data; C{await db.run("something",
_something_txn, ...)} runs it in one transaction on the pool's threads and
hands the result back on the reactor thread. Transaction functions never touch
Twisted objects, so nothing reaches a transport from a pool thread.

Each L{Database} owns its own L{adbapi.ConnectionPool} and therefore its own
thread pool: the real-time path and background work get separate pools, so
slow background SQL never starves sends.

Deadlocks and lock wait timeouts are retried (the transaction rolled back);
connection failures become L{Unavailable}. A transaction whose COMMIT was
interrupted has an unknown outcome: callers whose writes are not idempotent
must treat L{Unavailable} as "maybe committed".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import attrs
from twisted.enterprise import adbapi
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from imserver.errors import Unavailable
from imserver.storage.sql.engines import Engine

P = ParamSpec("P")
T = TypeVar("T")

MAX_RETRIES = 5
#: A pooled connection unused for longer than this is checked before use.
IDLE_CHECK_SECONDS = 1.0


ROWS = "rows"
COUNT = "count"


@attrs.frozen
class Statement:
    """
    One statement of a L{Txn.script}, with C{?} placeholders (the engine
    converts or renders it): what it returns is C{ROWS} or C{COUNT}.
    """

    sql: str
    args: tuple[Any, ...] = ()
    returns: str = COUNT


def marks(n: int) -> str:
    """C{?, ?, ?}: C{n} placeholders, for an C{IN (...)} list or a row of VALUES."""
    return ", ".join("?" * n)


def values(
    rows: Sequence[Sequence[Any]], template: str | None = None
) -> tuple[str, tuple[Any, ...]]:
    """
    C{(?, ?), (?, ?)} and the flattened arguments, for a multi-row VALUES;
    C{template} replaces C{(?, ?)} (when a column is an SQL expression).
    """
    one = template or f"({marks(len(rows[0]))})"
    return ", ".join([one] * len(rows)), tuple(v for row in rows for v in row)


class Txn:
    """
    The cursor a transaction function gets: C{?} placeholders, the engine at
    hand for dialect-specific SQL, and nothing else.
    """

    __slots__ = ("_cursor", "committed", "engine")

    def __init__(self, cursor: Any, engine: Engine) -> None:
        self._cursor = cursor
        self.engine = engine
        #: The transaction was committed by a L{script}.
        self.committed = False

    def script(self, statements: Sequence[Statement], *, commit: bool = False) -> list[Any]:
        """
        Run statements in order and return each one's rows or row count.
        On MySQL they travel as one multi-statement request, C{commit}
        included: one round trip, where running them one by one costs one
        each. If a statement fails, the ones after it do not run and the
        exception propagates (the transaction is still open).
        """
        results = self.engine.run_script(self._cursor, statements, commit)
        self.committed = commit
        return results

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; return the affected row count."""
        self._cursor.execute(self.engine.convert(sql), tuple(args))
        return int(self._cursor.rowcount)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one statement for many rows (one multi-row INSERT on MySQL)."""
        rows = [tuple(r) for r in rows]
        if not rows:
            return 0
        self._cursor.executemany(self.engine.convert(sql), rows)
        return int(self._cursor.rowcount)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(self.engine.convert(sql), tuple(args))
        return [tuple(row) for row in self._cursor.fetchall()]

    def query_one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self._cursor.execute(self.engine.convert(sql), tuple(args))
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def query_in(
        self,
        sql: str,
        values: Sequence[Any],
        args_before: Sequence[Any] = (),
        chunk: int = 500,
    ) -> list[tuple[Any, ...]]:
        """
        Run C{sql} with its C{IN (%s)} marker expanded to the values, in
        chunks so no statement grows without bound.
        """
        out: list[tuple[Any, ...]] = []
        for i in range(0, len(values), chunk):
            part = values[i : i + chunk]
            expanded = sql.replace("IN (%s)", f"IN ({marks(len(part))})")
            out.extend(self.query(expanded, (*args_before, *part)))
        return out


class Database:
    """
    One connection pool (and thread pool) on one database.

    @param reactor: provides C{IReactorCore}, C{IReactorThreads} and
        C{IReactorTime}.
    @param name: shows in thread names and logs (C{realtime}, C{background}).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        engine: Engine,
        *,
        name: str,
        max_connections: int | None = None,
    ) -> None:
        self._reactor = reactor
        self.engine = engine
        self.name = name
        size = max_connections or engine.max_connections
        self._pool = adbapi.ConnectionPool(
            engine.dbapi_name,
            cp_min=1,
            cp_max=size,
            cp_name=f"imserver-sql-{name}",
            cp_openfun=engine.on_connect,
            cp_reconnect=True,
            cp_noisy=False,
            cp_reactor=reactor,
            **engine.connect_args(),
        )
        self._closed = False
        self._last_used: dict[int, float] = {}
        #: Observes the stages of every transaction: (stage, seconds), stage
        #: being "wait" (for a pool thread), "run" (in the thread) or "return"
        #: (until the reactor takes the result). Wired to metrics.
        self.observe: Callable[[str, float], None] | None = None
        # Transaction counts and time, read by metrics.
        self.transactions = 0
        self.failures = 0

    async def run(
        self,
        desc: str,
        func: Callable[Concatenate[Txn, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """
        Run C{func(txn, *args, **kwargs)} in one transaction on a pool thread.

        @raise Unavailable: the database is unreachable or went away, or
            this pool is closed.
        """
        for attempt in range(MAX_RETRIES + 1):
            if self._closed:
                raise Unavailable(f"the {self.name} database pool is closed")
            stamps = [time.monotonic(), 0.0, 0.0]
            try:
                result: T = await deferToThreadPool(
                    self._reactor,
                    self._pool.threadpool,
                    self._timed,
                    stamps,
                    lambda txn: func(txn, *args, **kwargs),
                )
            except Exception as e:
                if self.engine.is_retryable(e) and attempt < MAX_RETRIES:
                    self.log.info(
                        "{db}: transaction {desc} hit {error}; retrying",
                        db=self.name,
                        desc=desc,
                        error=e,
                    )
                    await deferLater(self._reactor, 0.005 * 2**attempt, lambda: None)
                    continue
                self.failures += 1
                if self.engine.is_unavailable(e):
                    self.log.warn(
                        "{db}: {desc}: database unavailable: {error}",
                        db=self.name,
                        desc=desc,
                        error=e,
                    )
                    raise Unavailable("the database is unavailable") from e
                raise
            self.transactions += 1
            if self.observe is not None:
                queued, started, finished = stamps
                self.observe("wait", started - queued)
                self.observe("run", finished - started)
                self.observe("return", time.monotonic() - finished)
            return result
        raise AssertionError("unreachable")

    def _timed(self, stamps: list[float], func: Callable[[Txn], T]) -> T:
        # In a pool thread: when the transaction started and ended.
        stamps[1] = time.monotonic()
        try:
            return self._in_thread(func)
        finally:
            stamps[2] = time.monotonic()

    def _in_thread(self, func: Callable[[Txn], T]) -> T:
        # Runs in one of this pool's threads, on that thread's connection.
        pool = self._pool
        conn = pool.connect()
        reused = id(conn) in self._last_used
        now = time.monotonic()
        if now - self._last_used.get(id(conn), now) > IDLE_CHECK_SECONDS:
            # A connection idle for a while may be stale (the server restarted
            # meanwhile): check it first. A busy one skips the round trip.
            try:
                self.engine.check_connection(conn)
            except Exception:
                conn, reused = self._reconnect(conn), False
        try:
            return self._transaction(conn, func)
        except Exception as e:
            if not (reused and self.engine.is_unavailable(e)):
                raise
            # A reused connection was dead (the server restarted within the
            # idle check's window): once more on a fresh one. Safe even if the
            # first try committed: every write is idempotent (unique cids,
            # monotonic reads, set-like acks, recalls and outbox replays).
            return self._transaction(self._pool.connect(), func)

    def _reconnect(self, conn: Any) -> Any:
        """A fresh connection through the pool, so the per-connection set-up runs."""
        self._last_used.pop(id(conn), None)
        self._pool.disconnect(conn)
        return self._pool.connect()

    def _transaction(self, conn: Any, func: Callable[[Txn], T]) -> T:
        cursor = conn.cursor()
        try:
            self.engine.begin(cursor)
            txn = Txn(cursor, self.engine)
            result = func(txn)
            if not txn.committed:
                conn.commit()
            self._last_used[id(conn)] = time.monotonic()
            return result
        except BaseException as e:
            try:
                conn.rollback()
            except Exception:
                pass
            if self.engine.is_unavailable(e):
                # Dead: the next transaction of this thread gets a new one.
                self._last_used.pop(id(conn), None)
                self._pool.disconnect(conn)
            raise
        finally:
            try:
                cursor.close()
            except Exception:
                pass

    def close(self) -> None:
        """Close the connections and stop the threads (once; later calls do nothing)."""
        if not self._closed:
            self._closed = True
            self._pool.close()
