"""
High availability on the engines imserver already uses: Redis Sentinel
(the nodes follow a failover), and a MySQL/MariaDB primary restarted or
replaced at the same address (the pools reconnect). Real processes on free
loopback ports (tests/harness.py); see docs/scaling.md for the figures.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from imserver.client import IMClientProtocol
from imserver.client.protocol import RequestFailed
from imserver.config import (
    ConfigError,
    RedisSentinelTarget,
    RedisTarget,
    parse_config,
    redis_target,
)
from imserver.errors import Unavailable
from imserver.services.cluster import ClusterPresence
from imserver.services.registry import LocalRegistry
from imserver.storage.hot.bus import RedisBus
from imserver.storage.hot.connect import SwitchWatch, connect_pool
from imserver.storage.hot.connection import RedisConnection
from tests.harness import (
    MariaDBServer,
    RedisReplica,
    RedisSentinel,
    RedisServer,
    ServerProcess,
    fresh_prefix,
    redis_sentinel_url,
    shared_mariadb,
    wait_for,
)
from tests.support import ClientsMixin, eventually, reactor, sleep, within
from tests.test_pubsub_check import Link
from tests.test_recovery import all_pending

_uids = itertools.count(70_000)
KEY = "[storage].redis"


class SentinelUrlTests(SynchronousTestCase):
    def test_sentinel_url(self) -> None:
        target = redis_target(
            "redis+sentinel://:p%40ss@10.0.0.1,10.0.0.2:26380,[::1]:26381/mymaster/3"
            "?sentinel_password=s3",
            KEY,
        )
        self.assertEqual(
            target,
            RedisSentinelTarget(
                sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381)),
                service="mymaster",
                db=3,
                password="p@ss",
                sentinel_password="s3",
            ),
        )
        self.assertNotIn("p@ss", repr(target))
        self.assertNotIn("s3", repr(target))
        self.assertEqual(target.kind, "sentinel")

    def test_defaults(self) -> None:
        target = redis_target("redis+sentinel://s1/im", KEY)
        self.assertEqual(target, RedisSentinelTarget((("s1", 26379),), "im", 0))

    def test_plain_url_unchanged(self) -> None:
        self.assertEqual(redis_target("redis://:pw@c:6380/2", KEY), RedisTarget("c", 6380, 2, "pw"))

    def test_bad_urls(self) -> None:
        for url, expected in (
            ("redis+sentinel://s1", "service"),
            ("redis+sentinel://s1/", "service"),
            ("redis+sentinel:///im", "at least one sentinel"),
            ("redis+sentinel:s1/im", "redis+sentinel://"),
            ("redis+sentinel://s1:0/im", "out of range"),
            ("redis+sentinel://s1:99999/im", "out of range"),
            ("redis+sentinel://s1:port/im", "host[:port]"),
            ("redis+sentinel://s1,s1/im", "twice"),
            ("redis+sentinel://s1/im/x", "bad db"),
            ("redis+sentinel://s1/im/0/1", "bad db"),
            ("redis+sentinel://s1/my master", "service"),
            ("redis+sentinel://s1/im?password=x", "unknown option"),
            ("sentinel://s1/im", "redis+sentinel://"),
        ):
            with self.assertRaises(ConfigError, msg=url) as e:
                parse_config({"storage": {"redis": url}})
            self.assertIn(KEY, str(e.exception), url)
            self.assertIn(expected, str(e.exception), url)

    def test_workers_accept_sentinel(self) -> None:
        config = parse_config(
            {
                "server": {"workers": 2},
                "storage": {"sql": "mysql://im@db/im", "redis": "redis+sentinel://s1/im"},
            }
        )
        self.assertEqual(config.storage.redis.kind, "sentinel")  # type: ignore[union-attr]


class ServerWatchTests(TestCase):
    """A pool that reaches another Redis server (a restart from an old
    snapshot here, a failover in production) forgets the markers, windows and
    caches, and nothing else; a pool's first server is trusted."""

    timeout = 60

    async def test_forgets_the_hot_copy_when_the_server_changes(self) -> None:
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        prefix = fresh_prefix()
        kept = [f"{prefix}:{k}" for k in ("devices:1", "gone:1", "conv:1", "offline_msg:1:2")]
        forgotten = [f"{prefix}:{k}" for k in ("hot:1", "session_list:7", "msg:9", "user:1")]
        for key in (*kept, *forgotten, "other:hot:1"):
            redis.command("SET", key, "x")
        pool = connect_pool(
            reactor, redis_target(redis.url, KEY), prefix=prefix, poolsize=2, timeout=2
        )
        self.addCleanup(pool.disconnect)
        watch = pool._factory.watch
        await within(pool.ping())
        await eventually(lambda: watch.run_id is not None)
        self.assertEqual(int(await within(pool.execute_command("EXISTS", *forgotten))), 4)

        # The same data, another process (run_id): as after a failover.
        redis.command("SHUTDOWN", "SAVE")
        redis.proc.wait(10)  # type: ignore[union-attr]
        redis.start()
        await eventually(lambda: watch.forgotten == 4, timeout=15)
        self.assertEqual(watch.changes, 1)
        exists = pool.execute_command
        self.assertEqual(int(await within(exists("EXISTS", *forgotten))), 0)
        self.assertEqual(int(await within(exists("EXISTS", *kept, "other:hot:1"))), 5)
        self.assertEqual(len(await within(exists("KEYS", f"{prefix}:reset:*"))), 1)


@attrs.define
class Sent:
    start: float
    end: float
    code: str  # "ok" or the error code
    msg_id: int | None = None


class SendLoad:
    """Senders each with one send in flight, recording every outcome."""

    def __init__(self, pairs: list[tuple[IMClientProtocol, int]], tag: str) -> None:
        self.pairs = pairs
        self.tag = tag
        self.sent: dict[int, list[Sent]] = {}
        self.running = True
        self.done: Deferred[Any] | None = None

    def start(self) -> None:
        loops = [Deferred.fromCoroutine(self._loop(c, to)) for c, to in self.pairs]
        self.done = gatherResults(loops, consumeErrors=True)

    async def stop(self) -> None:
        self.running = False
        assert self.done is not None
        await within(self.done, 30)

    async def _loop(self, client: IMClientProtocol, to: int) -> None:
        records = self.sent.setdefault(to, [])
        for i in itertools.count():
            if not self.running:
                return
            start = reactor.seconds()
            try:
                reply = await within(
                    client.request("send", to=to, cid=f"{self.tag}{i}", body=f"m{i}"), 20
                )
                records.append(Sent(start, reactor.seconds(), "ok", reply["msg_id"]))
            except RequestFailed as e:
                records.append(Sent(start, reactor.seconds(), e.code))
                await sleep(0.05)  # as a client backing off

    def ok(self, to: int) -> list[int]:
        return [s.msg_id for s in self.sent[to] if s.code == "ok" and s.msg_id is not None]

    def report(self, t0: float, slow: float = 0.25) -> dict[str, Any]:
        """Refused and slow sends, in seconds after C{t0} (the fault)."""
        every = sorted(
            (s for records in self.sent.values() for s in records), key=lambda s: s.start
        )
        refused = [s for s in every if s.code != "ok"]
        slowed = [s for s in every if s.code == "ok" and s.end - s.start > slow]
        bad = refused + slowed
        return {
            "sends": len(every),
            "ok": len(every) - len(refused),
            "refused": len(refused),
            "codes": sorted({s.code for s in refused}),
            "slow": len(slowed),
            "max_latency": round(max(s.end - s.start for s in every), 2),
            "disturbed": (
                (round(min(s.start for s in bad) - t0, 2), round(max(s.end for s in bad) - t0, 2))
                if bad
                else None
            ),
        }


class HealthWatch:
    """Samples C{/healthz} of some nodes every 0.1 s; remembers when one was not ok."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.bad: list[float] = []
        #: When the last sample found each port ok (the sample's start).
        self.last_ok: dict[int, float] = {}
        self.samples = 0
        self.running = True
        self.done: Deferred[None] | None = None

    def start(self) -> None:
        self.done = Deferred.fromCoroutine(self._loop())

    async def stop(self) -> None:
        self.running = False
        assert self.done is not None
        await within(self.done)

    async def _loop(self) -> None:
        agent = Agent(reactor, connectTimeout=1)
        while self.running:
            for port in self.ports:
                now = reactor.seconds()
                try:
                    d = agent.request(b"GET", f"http://127.0.0.1:{port}/healthz".encode())
                    response = await within(d, 2)
                    body = json.loads(await within(readBody(response), 2))
                    ok = response.code == 200 and body.get("pubsub") == "ok"
                except Exception:
                    ok = False
                self.samples += 1
                if ok:
                    self.last_ok[port] = now
                else:
                    self.bad.append(now)
            await sleep(0.1)

    def ok_since(self, when: float) -> bool:
        """
        Every port answered ok in a sample started since C{when}, and none
        was bad. (Only "no bad sample since" was true too early: a sample
        recorded when it ends, after up to 2 s, left a stretch with no
        sample started at all, and the push sent then found the nodes
        still unsubscribed.)
        """
        return all(self.last_ok.get(port, when - 1) >= when for port in self.ports) and (
            not self.bad or self.bad[-1] < when
        )

    def down_after(self, t0: float) -> tuple[float, float] | None:
        after = [t - t0 for t in self.bad if t >= t0]
        return (round(after[0], 2), round(after[-1], 2)) if after else None


async def pushed_or_synced(client: IMClientProtocol, msg_id: int, seconds: float) -> str:
    """Wait until the message is pushed, or a sync push leads to it (C{push}/C{sync})."""
    deadline = reactor.seconds() + seconds
    while True:
        left = deadline - reactor.seconds()
        if left <= 0:
            raise AssertionError(f"message {msg_id} neither pushed nor synced in {seconds}s")
        push = await within(client.next_push(), left)
        if push.get("msg_id") == msg_id:
            return "push"
        if push.get("t") == "sync" and msg_id in await all_pending(client):
            return "sync"


def zcard(redis: RedisServer, key: str) -> int:
    return int(redis.command("ZCARD", key).strip().lstrip(b":"))


def sql_ids(db: MariaDBServer, database: str, query: str) -> list[int]:
    return [int(line) for line in db.sql(query, database).split()]


class SentinelFailoverTests(ClientsMixin, TestCase):
    """
    A master, a replica and three sentinels (down after 1 s); one imserver
    node (twistd) configured with the sentinels, under a send load; the
    master is SIGKILLed.
    """

    timeout = 120

    def setUp(self) -> None:
        self.master = RedisServer().start()
        self.replica = RedisReplica(self.master).start()
        self.sentinels = [RedisSentinel(self.master) for _ in range(3)]
        for process in (self.master, self.replica, *self.sentinels):
            self.addCleanup(process.cleanup)
        for sentinel in self.sentinels:
            sentinel.start()
        wait_for(self.replica.synced, 10, "the replica to sync")

        def known() -> bool:
            states = [s.master() for s in self.sentinels]
            return all(
                s.get("num-other-sentinels") == "2" and s.get("num-slaves") == "1" for s in states
            )

        wait_for(known, 20, "the sentinels to know each other and the replica", interval=0.1)
        self.mariadb = shared_mariadb()
        url = self.mariadb.fresh_database()
        self.database = url.rsplit("/", 1)[1]
        self.prefix = fresh_prefix()
        self.server = ServerProcess(
            {
                "storage": {
                    "sql": url,
                    "redis": redis_sentinel_url(self.sentinels),
                    "key_prefix": self.prefix,
                },
                "limits": {"send_per_second": 100000.0, "send_burst": 100000},
            }
        )
        self.addCleanup(self.server.cleanup)
        self.server.start()
        # A second node, to show the pub/sub bus follows the failover too.
        self.other = ServerProcess(
            {
                "server": {"node_id": 2},
                "storage": self.server.config["storage"],
                "auth": self.server.config["auth"],
            }
        )
        self.addCleanup(self.other.cleanup)
        self.other.start()

    async def test_failover_under_load_loses_nothing(self) -> None:
        server = self.server
        senders = [next(_uids) for _ in range(4)]
        recipients = [next(_uids) for _ in range(4)]
        victim_sender, victim = next(_uids), next(_uids)
        # Recipients with a hot copy (their sync loads it), then offline.
        for uid in (*recipients, victim):
            client = await self.client(server.endpoint, server.token(uid))
            self.assertEqual(await all_pending(client), [])
            await client.close()
        clients = [await self.client(server.endpoint, server.token(u)) for u in senders]

        # The victim's messages reach the master's copy, not the replica's:
        # what asynchronous replication may lose when the master dies.
        vclient = await self.client(server.endpoint, server.token(victim_sender))
        reader = await self.client(server.endpoint, server.token(victim))
        victim_ids = [
            (await within(vclient.request("send", to=victim, cid=f"v{i}", body="v")))["msg_id"]
            for i in range(5)
        ]
        victim_key = f"{self.prefix}:offline_msg:{victim}:{victim_sender}"
        await eventually(lambda: zcard(self.master, victim_key) == 5)
        await eventually(lambda: zcard(self.replica, victim_key) == 5)
        self.assertEqual(await all_pending(reader), victim_ids)
        await reader.close()
        self.replica.command("DEL", victim_key)

        # A user on the other node: pushes to them cross nodes by pub/sub.
        remote_sender, remote = next(_uids), next(_uids)
        remote_client = await self.client(self.other.endpoint, self.other.token(remote))
        rsender = await self.client(server.endpoint, server.token(remote_sender))
        await within(rsender.request("send", to=remote, cid="r0", body="before"))
        self.assertEqual((await within(remote_client.next_push()))["body"], "before")

        health = HealthWatch([server.http_port, self.other.http_port])
        health.start()
        load = SendLoad(list(zip(clients, recipients, strict=True)), "f")
        load.start()
        await sleep(1.0)
        old_master = self.master.port
        killed = reactor.seconds()
        self.master.kill()
        await eventually(
            lambda: all(s.master_port() == self.replica.port for s in self.sentinels), timeout=30
        )
        promoted = reactor.seconds() - killed
        # Sends go on until they have been fine for 2 s in a row.
        await eventually(lambda: self.calm(load, 2.0), timeout=30)
        await load.stop()
        await eventually(lambda: health.ok_since(reactor.seconds() - 0.5), timeout=15)
        await health.stop()
        figures = load.report(killed)
        print(
            f"\nsentinel failover: promoted after {promoted:.2f}s; /healthz not ok for "
            f"{health.down_after(killed)} s after the kill; sends: {figures}"
        )
        self.assertNotEqual(self.sentinels[0].master_port(), old_master)
        # Both nodes are subscribed again (/healthz "pubsub": "ok"): a
        # cross-node push reaches the remote user now; had it been published
        # while that node was not subscribed, a sync push would follow its
        # resubscription, and sync would find the message.
        while remote_client.pending_pushes:  # sync pushes of the failover
            self.assertEqual((await remote_client.next_push())["t"], "sync")
        sent = reactor.seconds()
        after = await within(rsender.request("send", to=remote, cid="r1", body="after"))
        how = await pushed_or_synced(remote_client, after["msg_id"], 5)
        checks = [n.log().count("pub/sub self-check of node") for n in (server, self.other)]
        print(
            f"the push after the failover arrived by {how} in {reactor.seconds() - sent:.2f}s; "
            f"self-check failures per node: {checks}"
        )

        # Every send answered ok is in SQL exactly once, pending for its recipient.
        for uid in recipients:
            acked = load.ok(uid)
            self.assertGreater(len(acked), 0)
            rows = sql_ids(
                self.mariadb,
                self.database,
                f"SELECT msgId FROM t_msg_record_list WHERE recipientUid = {uid} ORDER BY msgId",
            )
            self.assertEqual(len(rows), len(set(rows)))
            self.assertTrue(set(acked) <= set(rows), sorted(set(acked) - set(rows))[:5])
            self.assertEqual(len(rows), len(set(rows)))
        # The hot copy converges on SQL, the victim's included.
        for uid in (*recipients, victim):
            truth = sql_ids(
                self.mariadb,
                self.database,
                f"SELECT msgId FROM t_pending WHERE uid = {uid} ORDER BY msgId",
            )
            client = await self.client(server.endpoint, server.token(uid))

            async def converged(
                client: IMClientProtocol = client, truth: list[int] = truth
            ) -> bool:
                return await all_pending(client) == truth

            await eventually(converged, timeout=15)
            unread = await within(client.request("unread"))
            self.assertEqual(unread["total"], len(truth))
        self.assertEqual(
            sql_ids(
                self.mariadb, self.database, f"SELECT msgId FROM t_pending WHERE uid = {victim}"
            ),
            victim_ids,
        )
        log = server.log()
        self.assertIn("redis is another server now", log)

    @staticmethod
    def calm(load: SendLoad, seconds: float) -> bool:
        now = reactor.seconds()
        recent = [s for records in load.sent.values() for s in records if s.end > now - seconds]
        return bool(recent) and all(s.code == "ok" and s.end - s.start < 0.25 for s in recent)


class _Transport:
    def __init__(self, host: str, port: int) -> None:
        self.peer = attrs.make_class("Peer", ["host", "port"])(host, port)
        self.lost = False

    def getPeer(self) -> Any:
        return self.peer

    def loseConnection(self) -> None:
        self.lost = True


class SwitchWatchTests(SynchronousTestCase):
    def test_drops_connections_to_any_other_server_than_the_new_master(self) -> None:
        conns = [
            attrs.make_class("Conn", ["transport"])(_Transport(h, p))
            for h, p in (("10.0.0.1", 6379), ("10.0.0.2", 6379), ("10.0.0.2", 6380))
        ]
        factory = attrs.make_class("Factory", ["pool"])(conns)
        watch = SwitchWatch(reactor, RedisSentinelTarget((), "im", 0), factory, 1.0)
        for junk in ("", "other 10.0.0.1 6379 10.0.0.2 6379", "im 10.0.0.1 6379 10.0.0.2 x"):
            watch.switched(junk)
        self.assertEqual([c.transport.lost for c in conns], [False, False, False])
        watch.switched("im 10.0.0.1 6379 10.0.0.2 6379")
        self.assertEqual([c.transport.lost for c in conns], [True, False, True])
        self.assertEqual(watch.dropped, 2)


def numsub(redis: RedisServer, channel: str) -> int:
    return int(redis.command("PUBSUB", "NUMSUB", channel).rsplit(b":", 1)[1])


class SentinelSwitchTests(TestCase):
    """
    A failover with the old master alive (C{SENTINEL FAILOVER}, as for
    maintenance): the sentinels name the promoted replica at once, but the
    old master stays a master, with the nodes' connections, until they
    convert it to a replica (10 s later here): nodes must follow the
    switch, not wait for that.
    """

    timeout = 90

    async def test_nodes_follow_a_switch_of_a_live_master(self) -> None:
        master = RedisServer().start()
        replica = RedisReplica(master).start()
        sentinels = [RedisSentinel(master) for _ in range(3)]
        for process in (master, replica, *sentinels):
            self.addCleanup(process.cleanup)
        for sentinel in sentinels:
            sentinel.start()
        wait_for(replica.synced, 10, "the replica to sync")

        def known() -> bool:
            states = [s.master() for s in sentinels]
            return all(
                s.get("num-other-sentinels") == "2" and s.get("num-slaves") == "1" for s in states
            )

        wait_for(known, 20, "the sentinels to know each other and the replica", interval=0.1)
        prefix = fresh_prefix()
        target = redis_target(redis_sentinel_url(sentinels), KEY)
        nodes = []
        for node_id in (1, 2):
            connection = RedisConnection(reactor, target, prefix=prefix, timeout=2.0)
            await connection.start()
            self.addCleanup(lambda c=connection: Deferred.fromCoroutine(c.stop()))
            node = ClusterPresence(
                reactor, LocalRegistry(), RedisBus(connection, prefix), node_id, ttl_seconds=30
            )
            node.start()
            self.addCleanup(lambda n=node: Deferred.fromCoroutine(n.stop()))
            await eventually(lambda n=node: n.pubsub_state() == "ok")
            nodes.append(node)
        a, b = nodes
        bob = Link(next(_uids))
        await within(b.login(bob.uid, bob))
        channel = f"{prefix}:node:2"
        self.assertEqual(numsub(master, channel), 1)

        started = reactor.seconds()
        self.assertEqual(sentinels[0].command("SENTINEL", "FAILOVER", "mymaster"), b"+OK\r\n")
        await eventually(lambda: all(s.master_port() == replica.port for s in sentinels), 10)
        switched = reactor.seconds() - started
        # Subscribed on the new master, and the pools there too (its
        # presence restored there, a push from node 1 reaches bob).
        await eventually(lambda: numsub(replica, channel) == 1, timeout=3)
        moved = reactor.seconds() - started
        self.assertEqual(numsub(master, channel), 0)

        async def online() -> bool:
            try:
                return await a.online(bob.uid)
            except Unavailable:  # node 1's breaker, a moment after the drop
                return False

        await eventually(online, timeout=3)
        frame = {"t": "msg", "n": 1}
        a.push(bob.uid, frame)
        await eventually(lambda: frame in bob.pushes, timeout=3)
        print(f"\nswitch after {switched:.2f}s, nodes on the new master after {moved:.2f}s")


class MariaDBPrimaryTests(ClientsMixin, TestCase):
    """
    One imserver node (twistd) on a private mariadbd, under a send load; the
    primary is SIGKILLed and comes back at the same address: restarted on
    its data directory, or replaced by another server restored from a dump.
    Sends resume without restarting imserver, nothing answered ok is lost,
    and no send is answered C{internal} (only C{unavailable}).
    """

    timeout = 180

    def setUp(self) -> None:
        self.db = MariaDBServer().start()
        self.addCleanup(self.db.cleanup)
        self.db.sql("CREATE DATABASE im CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        self.server = ServerProcess(
            {
                "storage": {"sql": self.db.url("im")},
                "limits": {"send_per_second": 100000.0, "send_burst": 100000},
            }
        )
        self.addCleanup(self.server.cleanup)
        self.server.start()

    async def run_fault(self, fault: Any, tag: str) -> None:
        server = self.server
        senders = [next(_uids) for _ in range(4)]
        recipients = [next(_uids) for _ in range(4)]
        for uid in recipients:
            await (await self.client(server.endpoint, server.token(uid))).close()
        clients = [await self.client(server.endpoint, server.token(u)) for u in senders]
        load = SendLoad(list(zip(clients, recipients, strict=True)), tag)
        load.start()
        await sleep(1.0)
        started = reactor.seconds()
        await fault()
        back = reactor.seconds() - started
        try:
            await eventually(lambda: SentinelFailoverTests.calm(load, 2.0), timeout=60)
        except AssertionError:
            recent = [s for r in load.sent.values() for s in r][-8:]
            raise AssertionError(
                f"sends not back: {load.report(started)}, last: {recent}"
            ) from None
        await load.stop()
        figures = load.report(started)
        print(f"\nmariadb {tag}: the fault took {back:.2f}s; sends: {figures}")
        self.assertEqual(
            [c for c in figures["codes"] if c != "unavailable"], [], "only unavailable answers"
        )
        for uid in recipients:
            rows = sql_ids(
                self.db, "im", f"SELECT msgId FROM t_msg_record_list WHERE recipientUid = {uid}"
            )
            self.assertEqual(len(rows), len(set(rows)))
            acked = load.ok(uid)
            self.assertTrue(set(acked) <= set(rows), sorted(set(acked) - set(rows))[:5])
            client = await self.client(server.endpoint, server.token(uid))
            self.assertEqual(
                sorted(await all_pending(client)),
                sorted(sql_ids(self.db, "im", f"SELECT msgId FROM t_pending WHERE uid = {uid}")),
            )

    async def test_restarted_primary(self) -> None:
        async def restart() -> None:
            self.db.kill()
            await sleep(0.5)
            await deferToThread(self.db.start)

        await self.run_fault(restart, "restart")

    async def test_replaced_primary(self) -> None:
        async def replace() -> None:
            # Writes wait from now on (as a proxy holds them during a
            # switch-over), so the dump has everything answered ok.
            lock = subprocess.Popen(
                [
                    shutil.which("mariadb") or "mariadb",
                    "--no-defaults",
                    f"--socket={self.db.socket}",
                    "-uroot",
                    "-e",
                    "FLUSH TABLES WITH READ LOCK; SELECT SLEEP(120)",
                ],
                stdout=subprocess.DEVNULL,
            )
            self.addCleanup(lock.kill)
            await sleep(0.3)
            dump = os.path.join(self.db.dir, "im.sql")
            with open(dump, "w") as out:
                subprocess.run(
                    [
                        shutil.which("mariadb-dump") or "mariadb-dump",
                        "--no-defaults",
                        f"--socket={self.db.socket}",
                        "-uroot",
                        "--single-transaction",
                        "--databases",
                        "im",
                    ],
                    stdout=out,
                    check=True,
                )
            fresh = await deferToThread(lambda: MariaDBServer().start())
            self.addCleanup(fresh.cleanup)
            with open(dump) as f:
                subprocess.run(
                    [
                        shutil.which("mariadb") or "mariadb",
                        "--no-defaults",
                        f"--socket={fresh.socket}",
                        "-uroot",
                    ],
                    stdin=f,
                    check=True,
                )
            await deferToThread(fresh.stop)
            fresh.port = self.db.port
            self.db.kill()
            await deferToThread(fresh.start)
            self.db = fresh

        await self.run_fault(replace, "replace")
