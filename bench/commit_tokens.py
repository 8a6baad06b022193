"""
What commit tokens cost a group commit (issue 9, defect 2): a micro benchmark.

    python -m bench.commit_tokens [--engine mysql|sqlite] [--size 50] [--batches 200]

Commits send batches (``commit_messages_txn``, as the send path does, without
the hot store) through two pools on one database, one writing commit tokens
and one not, batch by batch in alternating order so that drift of a busy
machine hits both alike; prints the median time per batch of each and the difference. MySQL
runs on a throwaway mariadbd (tests/harness.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

from twisted.internet import task

from imserver.config import SqliteTarget, parse_config
from imserver.services.ids import IdGenerator
from imserver.storage.model import Committed, NewMessage, Outbox, pack_body
from imserver.storage.sql import queries as q
from imserver.storage.sql.database import Database
from imserver.storage.sql.engines import Engine, create_engine
from imserver.storage.sql.migrate import migrate


async def _rounds(reactor: Any, engines: list[Engine], args: argparse.Namespace) -> None:
    with_tokens = Database(reactor, engines[0], name="tokens", commit_tokens=True)
    without = Database(reactor, engines[1], name="plain", commit_tokens=False)
    await migrate(with_tokens, 0)
    ids = IdGenerator(1, reactor)
    pairs = [(1_000 + 2 * i, 1_001 + 2 * i) for i in range(args.size)]
    sessions: dict[tuple[int, int], int] = {}
    body = pack_body("x" * 64)
    serial = 0

    async def batch(db: Database) -> float:
        nonlocal serial
        msgs = []
        for a, b in pairs:
            serial += 1
            msg_id = ids.next_id()
            sid = sessions.get((a, b))
            msgs.append(NewMessage(msg_id, a, b, f"c{serial}", "text", body, 0, sid, ids.next_id()))
        now_ms = int(time.time() * 1000)
        outbox = Outbox(ids.next_id(), 1, "send", created_at=now_ms)
        started = time.perf_counter()
        outcomes = await db.run(
            "send", q.commit_messages_txn, msgs, [], now_ms, outbox, None, 0.0, ()
        )
        elapsed = time.perf_counter() - started
        for (a, b), outcome in zip(pairs, outcomes, strict=True):
            assert isinstance(outcome, Committed)
            sessions[(a, b)] = outcome.message.session_id
        return elapsed

    times: dict[str, list[float]] = {"tokens": [], "plain": []}
    for db in (with_tokens, without):  # warm up: sessions, connections, caches
        for _ in range(20):
            await batch(db)
    for i in range(args.batches):
        # Batch by batch, in alternating order: a busy machine's drift hits
        # both pools alike.
        order = [(with_tokens, "tokens"), (without, "plain")]
        if i % 2:
            order.reverse()
        for db, name in order:
            times[name].append(await batch(db))
    with_tokens.close()
    without.close()
    tok = statistics.median(times["tokens"]) * 1e6
    plain = statistics.median(times["plain"]) * 1e6
    n = len(times["tokens"])
    print(f"engine {args.engine}, {args.size} messages per batch, {n} batches each way")
    print(f"  median per batch without tokens: {plain:9.0f} us")
    print(f"  median per batch with tokens:    {tok:9.0f} us")
    print(f"  difference: {tok - plain:+.0f} us per batch ({(tok - plain) / plain:+.1%})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.commit_tokens", description=__doc__)
    p.add_argument("--engine", choices=("mysql", "sqlite"), default="mysql")
    p.add_argument("--size", type=int, default=50, help="messages per batch")
    p.add_argument("--batches", type=int, default=600, help="batches per pool")
    args = p.parse_args(argv)
    server = None
    if args.engine == "mysql":
        from tests.harness import MariaDBServer

        server = MariaDBServer().start()
        url = server.fresh_database()
        target = parse_config({"storage": {"sql": url}}).storage.sql
        engines = [create_engine(target), create_engine(target)]
    else:
        path = os.path.join(tempfile.mkdtemp(), "bench.db")
        engines = [create_engine(SqliteTarget(path)), create_engine(SqliteTarget(path))]
    try:
        task.react(lambda reactor: _as_deferred(_rounds(reactor, engines, args)))
    finally:
        if server is not None:
            server.cleanup()


def _as_deferred(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)


if __name__ == "__main__":
    main()
