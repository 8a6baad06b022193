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

The hot batches (the transactions named in C{lanes}: by default C{send} and
C{ack}, one Batcher each, one batch in flight each) skip the thread pool:
each name has its own L{CommitThread}, one thread with one connection fed by
a C{queue.SimpleQueue}, its results handed back with C{callFromThread}. No
pool dispatch or worker hand-over per batch, a connection always warm, and
the next batch is picked up by a thread that is already waiting for it.
Everything else (the retries, the lost-COMMIT logic below) is the same code
on either kind of thread: a transaction runs on its thread's own connection.

Deadlocks and lock wait timeouts are retried (the transaction rolled back);
connection failures become L{Unavailable}.

A connection can fail after the server committed but before its reply came
back: a rerun would then see its own writes (a send answered C{dup: true} to
its first try, a recall or read with nothing left to do, an outbox row
written twice). So the outcome is asked of the database instead. Every
write transaction inserts a random commit token into C{t_commit} inside
itself, in the same request as its COMMIT on MySQL (no round trip added).
When the connection fails while a COMMIT may be on its way, the pool thread
reconnects and inserts the same token itself, as a fence: if the old session
still runs on the server (it has not noticed the lost client yet), the insert
waits for its row lock, so the answer is final either way:

* duplicate key: the transaction committed. If the function had finished (the
  COMMIT was the database's own), its result is returned. If the COMMIT was
  part of a L{Txn.script}, the script's replies are lost: it raises
  L{CommitConfirmed} and the function computes its result from what is
  committed, on a fresh read transaction;
* inserted: it did not commit, and now never can (its own insert of the
  token would fail); the function is run again, once, on the fresh
  connection (as is a transaction whose connection failed before any COMMIT
  was sent).

Only when the database cannot be asked (it is down) is the outcome unknown:
then L{CommitUnknown}, an L{Unavailable}, and the caller must treat it as
"maybe committed" (the send path makes its users suspect; the outbox row, if
committed, gets the follow-up replayed). Tokens older than
L{TOKEN_KEEP_SECONDS} are deleted by a small transaction every
L{PRUNE_SECONDS}.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from queue import SimpleQueue
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.errors import Unavailable
from imserver.storage.sql.engines import Engine

P = ParamSpec("P")
T = TypeVar("T")

MAX_RETRIES = 5
#: A pooled connection unused for longer than this is checked before use.
IDLE_CHECK_SECONDS = 1.0


#: Commit tokens are kept this long (outcomes are asked within seconds; the
#: margin covers clock skew between the nodes that prune).
TOKEN_KEEP_SECONDS = 600
#: How often a pool that wrote tokens deletes the old ones.
PRUNE_SECONDS = 10.0

ROWS = "rows"
COUNT = "count"

#: The transactions that get a commit thread of their own by default: the
#: send and ack batches (see L{CommitThread}).
HOT_LANES = ("send", "ack")
#: How long L{CommitThread.stop} waits for the queued batches to finish.
STOP_SECONDS = 30.0


class CommitConfirmed(Exception):
    """
    Raised by L{Txn.script} with C{commit=True} when the connection failed
    while the script ran but its commit token shows it committed: its
    replies (row counts, SELECT results) are lost. The transaction function
    catches it and computes its result from the committed state: the C{txn}
    runs a fresh read transaction on a new connection by then.
    """


class CommitUnknown(Unavailable):
    """The connection failed during a COMMIT and the database could not be
    asked whether it happened: maybe committed."""

    def __init__(self) -> None:
        super().__init__("the database is unavailable (the request may have been done)")


class _RolledBack(Exception):
    """The transaction surely did not commit: it may run again."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


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

    __slots__ = (
        "_db",
        "committed",
        "confirmed",
        "conn",
        "cursor",
        "engine",
        "token",
        "tokens",
        "wrote",
    )

    def __init__(self, db: Database | None, conn: Any, cursor: Any, engine: Engine) -> None:
        self._db = db
        self.conn = conn
        self.cursor = cursor
        self.engine = engine
        #: The transaction was committed by a L{script}.
        self.committed = False
        #: Its commit's reply was lost and the database said it committed:
        #: whatever fails from now on, it must never run again.
        self.confirmed = False
        #: Something was written (a statement that is not a query): the
        #: commit records a token.
        self.wrote = False
        #: Whether this transaction's commit records its token (off for
        #: schema migrations: DDL commits on its own on MySQL, and t_commit
        #: may not exist yet).
        self.tokens = db is not None and db.commit_tokens
        #: (at, token): this transaction's row in t_commit.
        self.token = (int(time.time()), int.from_bytes(os.urandom(8), "big") >> 1)

    def token_statement(self) -> Statement | None:
        """The INSERT of this transaction's commit token, if it needs one."""
        if not (self.tokens and self.wrote):
            return None
        assert self._db is not None
        self._db.tokens_written = True
        return Statement("INSERT INTO t_commit (at, token) VALUES (?, ?)", self.token)

    def script(self, statements: Sequence[Statement], *, commit: bool = False) -> list[Any]:
        """
        Run statements in order and return each one's rows or row count.
        On MySQL they travel as one multi-statement request, C{commit}
        included: one round trip, where running them one by one costs one
        each. If a statement fails, the ones after it do not run and the
        exception propagates (the transaction is still open).

        @raise CommitConfirmed: with C{commit}, the connection failed but the
            transaction committed (see the module docstring).
        """
        if any(s.returns == COUNT for s in statements):
            self.wrote = True
        token = self.token_statement() if commit else None
        try:
            results = self.engine.run_script(self.cursor, statements, commit, token)
        except Exception as e:
            if not (commit and self._db is not None and self.engine.is_unavailable(e)):
                raise
            if token is None:
                # Nothing written: as good as rolled back.
                self._db._drop(self.conn)
                raise _RolledBack(e) from e
            self._db._settle(self, e)
            raise CommitConfirmed() from e
        self.committed = commit
        return results

    def resume(self, conn: Any, cursor: Any) -> None:
        """Go on, read-only, on a fresh connection (after a confirmed commit)."""
        self.conn = conn
        self.cursor = cursor
        self.committed = False
        self.confirmed = True
        self.wrote = False

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; return the affected row count."""
        self.wrote = True
        self.cursor.execute(self.engine.convert(sql), tuple(args))
        return int(self.cursor.rowcount)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one statement for many rows (one multi-row INSERT on MySQL)."""
        rows = [tuple(r) for r in rows]
        if not rows:
            return 0
        self.wrote = True
        self.cursor.executemany(self.engine.convert(sql), rows)
        return int(self.cursor.rowcount)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.cursor.execute(self.engine.convert(sql), tuple(args))
        return [tuple(row) for row in self.cursor.fetchall()]

    def query_one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self.cursor.execute(self.engine.convert(sql), tuple(args))
        row = self.cursor.fetchone()
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


class _Thread(Protocol):
    """What L{CommitThread} needs of a thread (a L{threading.Thread})."""

    def start(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


#: Makes the thread of a L{CommitThread}: C{factory(target, name)}. Tests
#: inject one that does not start a thread and run C{target} themselves.
ThreadFactory = Callable[[Callable[[], None], str], _Thread]


def _daemon_thread(target: Callable[[], None], name: str) -> _Thread:
    # A daemon: a process whose Database was never closed still exits.
    return threading.Thread(target=target, name=name, daemon=True)


_STOP = object()


class CommitThread:
    """
    One thread running jobs one after another, in the order submitted, fed
    by a C{queue.SimpleQueue}; each job's result (or exception) goes back to
    the reactor with C{callFromThread}, which fires the L{Deferred} that
    L{submit} returned.

    Why not the thread pool: a pool dispatch per batch (its worker lookup,
    a context copy, a C{Deferred} chain on the way back) and a thread that
    may not hold a warm connection. Here the thread waits on the queue, so a
    batch submitted while the previous one still runs is started by the
    thread itself the moment that one ends, without a reactor turn between.

    Started on the first L{submit} (a L{Database} whose lane is never used
    costs nothing). L{stop} drains: the jobs already queued still run and
    their results are delivered; C{on_exit} then runs in the thread (to close
    its connection).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        name: str,
        *,
        thread_factory: ThreadFactory = _daemon_thread,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self.name = name
        self._factory = thread_factory
        self._on_exit = on_exit
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._thread: _Thread | None = None
        self.stopped = False
        #: Jobs submitted and not yet delivered back (read by tests).
        self.pending = 0

    def submit(self, job: Callable[[], T]) -> Deferred[T]:
        """Run C{job()} in the thread after the jobs before it; fires on the reactor."""
        if self.stopped:
            raise Unavailable(f"the {self.name} commit thread is stopped")
        if self._thread is None:
            self._thread = self._factory(self._loop, self.name)
            self._thread.start()
        d: Deferred[T] = Deferred()
        self.pending += 1
        self._queue.put((job, d))
        return d

    def _loop(self) -> None:
        # The thread: jobs until the stop marker, then the exit hook.
        queue = self._queue
        call = self._reactor.callFromThread
        while True:
            item = queue.get()
            if item is _STOP:
                break
            job, d = item
            try:
                result = job()
            except BaseException:
                call(self._deliver, d, Failure())
            else:
                call(self._deliver, d, result)
            del item, job, d
            result = None
        if self._on_exit is not None:
            try:
                self._on_exit()
            except Exception as e:
                self.log.warn("{name}: clean-up failed: {error}", name=self.name, error=e)

    def _deliver(self, d: Deferred[Any], outcome: Any) -> None:
        # On the reactor.
        self.pending -= 1
        if isinstance(outcome, Failure):
            d.errback(outcome)
        else:
            d.callback(outcome)

    def stop(self, timeout: float = STOP_SECONDS) -> bool:
        """
        Refuse new jobs, let the queued ones run, and wait (blocking, as the
        thread pool's own stop does) until the thread has ended. False if it
        still runs after C{timeout} (a job stuck on a dead network): it is a
        daemon thread and ends with the process.
        """
        if self.stopped:
            return True
        self.stopped = True
        if self._thread is None:
            return True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.log.warn(
                "{name}: still busy after {timeout} s at stop; left running",
                name=self.name,
                timeout=timeout,
            )
            return False
        return True


class Database:
    """
    One connection pool (and thread pool) on one database.

    @param reactor: provides C{IReactorCore}, C{IReactorThreads} and
        C{IReactorTime}.
    @param name: shows in thread names and logs (C{realtime}, C{background}).
    @param lanes: the transaction names (C{desc}) that run on a commit
        thread of their own, one per name (see L{CommitThread}); every other
        transaction runs on the pool's threads. Default: L{HOT_LANES} on an
        engine that may have several connections, none on the embedded one
        (SQLite: one writer connection; two more would wait on its file lock
        in the busy handler's sleeps, hundreds of ms under a read flood).
    @param thread_factory: makes the commit threads (tests inject their own).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        engine: Engine,
        *,
        name: str,
        max_connections: int | None = None,
        commit_tokens: bool = True,
        lanes: Sequence[str] | None = None,
        thread_factory: ThreadFactory = _daemon_thread,
    ) -> None:
        self._reactor = reactor
        self.engine = engine
        self.name = name
        #: Record commit tokens (off only to measure what they cost).
        self.commit_tokens = commit_tokens
        self._pruned_at = reactor.seconds()
        self._pruning = False
        self.tokens_written = False
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
        if lanes is None:
            lanes = HOT_LANES if engine.max_connections > 1 else ()
        self.lanes = {
            desc: CommitThread(
                reactor,
                f"imserver-sql-{name}-{desc}",
                thread_factory=thread_factory,
                on_exit=self._drop_own_connection,
            )
            for desc in lanes
        }
        #: Observes the stages of every transaction: (stage, seconds), stage
        #: being "wait" (for a pool thread), "run" (in the thread) or "return"
        #: (until the reactor takes the result). Wired to metrics.
        self.observe: Callable[[str, float], None] | None = None
        # Transaction counts and time, read by metrics.
        self.transactions = 0
        self.failures = 0
        #: Lost COMMIT replies, by what the token said: read by metrics and tests.
        self.lost_commits = {"committed": 0, "rolled_back": 0, "unknown": 0}

    async def run(
        self,
        desc: str,
        func: Callable[Concatenate[Txn, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """
        Run C{func(txn, *args, **kwargs)} in one transaction on a pool thread
        (or on C{desc}'s commit thread, if it has one).

        @raise Unavailable: the database is unreachable or went away, or
            this pool is closed.
        """
        lane = self.lanes.get(desc)

        def call(txn: Txn) -> T:
            return func(txn, *args, **kwargs)

        for attempt in range(MAX_RETRIES + 1):
            if self._closed:
                raise Unavailable(f"the {self.name} database pool is closed")
            stamps = [time.monotonic(), 0.0, 0.0]
            try:
                if lane is not None:
                    result: T = await lane.submit(partial(self._timed, stamps, call))
                else:
                    result = await deferToThreadPool(
                        self._reactor, self._pool.threadpool, self._timed, stamps, call
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
            self._maybe_prune()
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
        now = time.monotonic()
        if now - self._last_used.get(id(conn), now) > IDLE_CHECK_SECONDS:
            # A connection idle for a while may be stale (the server restarted
            # meanwhile): check it first. A busy one skips the round trip.
            try:
                self.engine.check_connection(conn)
            except Exception:
                conn = self._reconnect(conn)
        try:
            return self._transaction(conn, func)
        except _RolledBack:
            # The connection failed, and the transaction surely did not commit
            # (it failed before a COMMIT was sent, or its token is absent):
            # once more, on a fresh connection.
            pass
        try:
            return self._transaction(self._pool.connect(), func)
        except _RolledBack as e:
            raise e.error from None

    def _reconnect(self, conn: Any) -> Any:
        """A fresh connection through the pool, so the per-connection set-up runs."""
        self._drop(conn)
        return self._pool.connect()

    def _drop(self, conn: Any) -> None:
        """Forget a dead connection: the thread's next connect() opens a new one."""
        self._last_used.pop(id(conn), None)
        try:
            self._pool.disconnect(conn)
        except Exception:
            pass

    async def warm(self) -> None:
        """
        Open each commit thread's connection now (at start-up). Opened on the
        first batch instead, it would need a descriptor then: a process out of
        descriptors (a connection flood) could not send at all, while the
        pool's connections, opened already, still served everything else.
        """
        for lane in self.lanes.values():
            await lane.submit(self._pool.connect)

    def _drop_own_connection(self) -> None:
        """In a commit thread that ends: close its connection."""
        conn = self._pool.connections.get(self._pool.threadID())
        if conn is not None:
            self._drop(conn)

    def _transaction(self, conn: Any, func: Callable[[Txn], T]) -> T:
        txn = Txn(self, conn, conn.cursor(), self.engine)
        try:
            self.engine.begin(txn.cursor)
            result = func(txn)
            if not txn.committed:
                self._commit(txn)
            self._last_used[id(txn.conn)] = time.monotonic()
            return result
        except CommitConfirmed:
            txn.conn.rollback()
            raise RuntimeError("a transaction function let CommitConfirmed through") from None
        except BaseException as e:
            try:
                txn.conn.rollback()
            except Exception:
                pass
            if txn.confirmed and not isinstance(e, CommitUnknown):
                # It committed, and what it read afterwards failed (its new
                # connection was lost too, say): it must not run again (a send
                # would find its own message and answer dup: true to its first
                # try), and its result is lost. Maybe done, as far as the
                # caller can tell.
                self._drop(txn.conn)
                self.log.warn(
                    "{db}: committed, but its result could not be read: {error}",
                    db=self.name,
                    error=e,
                )
                raise CommitUnknown() from e
            if self.engine.is_unavailable(e):
                # Dead: the next transaction of this thread gets a new one,
                # and nothing of this one was committed (commit failures are
                # settled in _commit and Txn.script).
                self._drop(txn.conn)
                raise _RolledBack(e) from e
            raise
        finally:
            try:
                txn.cursor.close()
            except Exception:
                pass

    def _commit(self, txn: Txn) -> None:
        token = txn.token_statement()
        try:
            self.engine.commit(txn.cursor, token)
        except Exception as e:
            if not self.engine.is_unavailable(e):
                raise
            if token is None:
                # Nothing was written: the result stands, whatever became of
                # the COMMIT.
                self._drop(txn.conn)
                return
            # Returns only if it committed; then the result stands.
            self._settle(txn, e, resume=False)

    def _settle(self, txn: Txn, error: BaseException, resume: bool = True) -> None:
        """
        The connection failed while C{txn}'s COMMIT may have been on its way:
        ask the database. Returns if the transaction committed: C{txn} then
        goes on (C{resume}: in a read transaction) on a fresh connection.
        Raises L{_RolledBack} if it did not, L{CommitUnknown} if nobody can
        tell.
        """
        self._drop(txn.conn)
        conn = None
        try:
            conn = self._pool.connect()
            cursor = conn.cursor()
            self.engine.begin(cursor)
            try:
                # The fence: insert the token ourselves. If the old transaction
                # still runs (the server has not noticed the lost client yet),
                # this waits for its row lock. A duplicate means it committed;
                # success means it did not, and now never can (its own insert
                # of the token would fail).
                cursor.execute(
                    self.engine.convert("INSERT INTO t_commit (at, token) VALUES (?, ?)"),
                    txn.token,
                )
                conn.commit()
                committed = False
            except Exception as e:
                if not self.engine.is_duplicate(e):
                    raise
                conn.rollback()
                committed = True
        except Exception as e:
            self.lost_commits["unknown"] += 1
            self.log.warn(
                "{db}: connection lost during a commit ({error}); its outcome is unknown:"
                " {check_error}",
                db=self.name,
                error=error,
                check_error=e,
            )
            if conn is not None:
                self._drop(conn)
            raise CommitUnknown() from error
        self.lost_commits["committed" if committed else "rolled_back"] += 1
        self.log.info(
            "{db}: connection lost during a commit ({error}); the database says it {outcome}",
            db=self.name,
            error=error,
            outcome="committed" if committed else "rolled back",
        )
        if not committed:
            cursor.close()
            raise _RolledBack(error)
        txn.resume(conn, cursor)
        if resume:
            try:
                self.engine.begin(cursor)
            except Exception as e:
                if not self.engine.is_unavailable(e):
                    raise
                self._drop(conn)
                raise CommitUnknown() from e

    def _maybe_prune(self) -> None:
        """Now and then, delete the commit tokens nobody will ask about."""
        now = self._reactor.seconds()
        if (
            not self.tokens_written
            or self._pruning
            or self._closed
            or now - self._pruned_at < PRUNE_SECONDS
        ):
            return
        self._pruned_at = now
        self._pruning = True

        def done(result: object) -> None:
            self._pruning = False

        d = Deferred.fromCoroutine(
            self.run(
                "prune_commit_tokens", _prune_tokens_txn, int(time.time()) - TOKEN_KEEP_SECONDS
            )
        )
        d.addErrback(
            lambda f: self.log.warn(
                "{db}: old commit tokens not deleted: {error}", db=self.name, error=f.value
            )
        )
        d.addBoth(done)

    def close(self) -> None:
        """
        Close the connections and stop the threads (once; later calls do
        nothing). The commit threads stop first, after the batches already
        queued on them (their results are delivered on the reactor).
        """
        if not self._closed:
            self._closed = True
            for lane in self.lanes.values():
                lane.stop()
            self._pool.close()


def _prune_tokens_txn(txn: Txn, before: int) -> int:
    txn.tokens = False
    return txn.execute("DELETE FROM t_commit WHERE at < ?", (before,))
