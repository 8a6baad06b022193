"""
The chaos soak (bench/chaos.py, bench/chaosload.py).

L{JudgeTests} feed the checker made-up client records and SQL rows, so that
each kind of violation is shown to be caught (and a clean run to pass).
L{NetemTests} checks the namespaces and forwarder of C{--netem} (as root).
L{SoakTests} runs the CI version, ``python -m bench chaos --seconds 60``, on
its own MariaDB and Redis, as CI does: every fault of the CI set, and exit
status 0 only if nothing was lost, duplicated, reordered or mismatched.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from bench import chaos
from bench.chaos import Conv, Row, Sql, judge
from tests.harness import need

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, R, SID = 1000, 1001, 77
SEC = 10**9


def sender(n: int) -> dict[str, Any]:
    """A sender whose n sends were each answered ok on their one attempt."""
    return {
        "uid": S,
        "to": R,
        "first_ns": [i * SEC for i in range(n)],
        "ok_ns": [i * SEC + SEC // 100 for i in range(n)],
        "msg_id": [100 + i for i in range(n)],
        "dup": [0] * n,
        "attempts": [1] * n,
        "store_epoch": [1] * n,
        "store_index": list(range(1, n + 1)),
        "spurious_dup": [],
        "id_mismatch": [],
        "rejected": [],
        "error_times": [],
        "recalled": [],
        "recall_unresolved": [],
        "errors": {},
        "reconnects": 0,
        "op_times": [],
    }


def recipient(n: int, acked: list[int], read_ok: int = 0) -> dict[str, Any]:
    """A recipient connected throughout that got every message pushed."""
    return {
        "uid": R,
        "from": S,
        "epochs": [[-SEC, 0]],
        "received": [[100 + i, i, 1, i * SEC + SEC // 50, 1] for i in range(n)],
        "dups": [],
        "acked": acked,
        "read_ok": read_ok,
        "hints": 0,
        "errors": {},
        "reconnects": 0,
        "op_times": [],
    }


def sql_for(n: int, pending: set[int], read_up_to: int = 0) -> Sql:
    sql = Sql()
    sql.rows = [Row(100 + i, SID, S, R, f"{i:08x}", 0, i) for i in range(n)]
    sql.pending[R] = set(pending)
    unread = sum(1 for i in range(n) if 100 + i > read_up_to)
    sql.conv[(R, SID)] = Conv(S, n, n - unread, read_up_to, 100 + n - 1)
    return sql


class JudgeTests(TestCase):
    def clean(self, n: int = 10) -> tuple[dict[str, Any], dict[str, Any], Sql]:
        acked = [100 + i for i in range(n) if i % 5]
        s, r = sender(n), recipient(n, acked, read_ok=104)
        pending = {100 + i for i in range(n) if i % 5 == 0}
        sql = sql_for(n, pending, read_up_to=104)
        r["final_sync"] = sorted(pending)
        unread = sum(1 for i in range(n) if 100 + i > 104)
        r["unread"] = {"total": unread, "sessions": [{"session_id": SID, "count": unread}]}
        r["history"] = s["history"] = sorted((100 + i for i in range(n)), reverse=True)
        return s, r, sql

    def kinds(self, s: dict[str, Any], r: dict[str, Any], sql: Sql) -> dict[str, int]:
        return dict(judge([s], [r], sql)[1].counts)

    def test_clean(self) -> None:
        s, r, sql = self.clean()
        figures, v, _ = judge([s], [r], sql)
        self.assertEqual(dict(v.counts), {})
        self.assertEqual(figures["ok"], 10)
        self.assertEqual(figures["pending_at_end"], 2)

    def test_lost(self) -> None:
        s, r, sql = self.clean()
        sql.rows = [row for row in sql.rows if row.id != 103]
        self.assertIn("lost", self.kinds(s, r, sql))

    def test_msg_id_mismatch(self) -> None:
        s, r, sql = self.clean()
        s["msg_id"][3] = 999
        self.assertIn("mismatch:msg_id", self.kinds(s, r, sql))

    def test_misreported_dup(self) -> None:
        s, r, sql = self.clean()
        s["spurious_dup"] = [4]
        self.assertEqual(self.kinds(s, r, sql), {"misreported_dup": 1})

    def test_duplicated(self) -> None:
        s, r, sql = self.clean()
        r["dups"] = [[3, 103, 555]]
        self.assertEqual(self.kinds(s, r, sql)["duplicated"], 1)

    def test_reordered_on_one_connection(self) -> None:
        s, r, sql = self.clean()
        # seq 3 was sent before seq 4 on the same connection but stored after it.
        s["store_index"][3], s["store_index"][4] = 5, 4
        s["first_ns"][4] = s["first_ns"][3]
        self.assertEqual(self.kinds(s, r, sql), {"reordered": 1})

    def test_reordered_after_an_ok(self) -> None:
        s, r, sql = self.clean()
        # seq 6 was first sent after seq 5's ok yet has a lower id.
        sql.rows[6] = Row(99, SID, S, R, f"{6:08x}", 0, 6)
        s["msg_id"][6] = 99
        self.assertIn("reordered", self.kinds(s, r, sql))

    def test_unanswered_is_unresolved(self) -> None:
        s, r, sql = self.clean()
        s["msg_id"][9] = s["ok_ns"][9] = 0
        self.assertIn("unresolved", self.kinds(s, r, sql))

    def test_pending_lost_and_acked_still_pending(self) -> None:
        s, r, sql = self.clean()
        sql.pending[R] = {105, 101}  # 100 vanished; 101 was acked
        r["final_sync"] = [101, 105]
        kinds = self.kinds(s, r, sql)
        self.assertEqual(kinds["pending:lost"], 1)
        self.assertEqual(kinds["pending:acked_still_pending"], 1)

    def test_sync_disagrees_with_sql(self) -> None:
        s, r, sql = self.clean()
        r["final_sync"] = [100]
        self.assertEqual(self.kinds(s, r, sql), {"mismatch:sync": 1})

    def test_unread(self) -> None:
        s, r, sql = self.clean()
        r["unread"] = {"total": 9, "sessions": [{"session_id": SID, "count": 9}]}
        self.assertEqual(self.kinds(s, r, sql), {"mismatch:unread": 2})
        s, r, sql = self.clean()
        sql.conv[(R, SID)] = Conv(S, 10, 0, 104, 109)
        self.assertEqual(self.kinds(s, r, sql), {"mismatch:unread_counter": 1})

    def test_read_lost(self) -> None:
        s, r, sql = self.clean()
        r["read_ok"] = 107
        self.assertIn("read_lost", self.kinds(s, r, sql))

    def test_history(self) -> None:
        s, r, sql = self.clean()
        r["history"] = r["history"][1:]
        self.assertEqual(self.kinds(s, r, sql), {"mismatch:history": 1})

    def test_push_missed_only_while_connected(self) -> None:
        s, r, sql = self.clean()
        r["received"] = [x for x in r["received"] if x[0] != 102]
        self.assertEqual(self.kinds(s, r, sql), {"push_missed": 1})
        # Had the recipient been offline, a missing push is no violation
        # (sync delivers it, and the final sync is checked against SQL).
        r["epochs"] = [[-SEC, SEC], [20 * SEC, 0]]
        self.assertEqual(self.kinds(s, r, sql), {})

    def test_recall(self) -> None:
        s, r, sql = self.clean()
        s["recalled"] = [2]
        kinds = self.kinds(s, r, sql)
        self.assertEqual(kinds["recall_lost"], 1)

    def test_schedule(self) -> None:
        plan = chaos.schedule(chaos.CI_FAULTS, 60, 8)
        self.assertEqual({k for _, k in plan}, set(chaos.CI_FAULTS))
        self.assertTrue(all(t <= 54 for t, _ in plan))


class SoakTests(TestCase):
    """The CI soak: 60 s of load and the CI faults on 1 node."""

    timeout = 600

    def test_soak_60s(self) -> None:
        need("mariadbd")
        need("redis-server")
        out = tempfile.mkdtemp(prefix="imserver-chaos-")
        self.addCleanup(shutil.rmtree, out, True)
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench",
                "chaos",
                "--seconds",
                "60",
                "--results-dir",
                out,
                "--quiet",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=540)
        except subprocess.TimeoutExpired:
            # SIGTERM: the tool stops every process it started, then exits.
            proc.terminate()
            stdout, stderr = proc.communicate(timeout=60)
            self.fail(f"the soak took more than 540 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
        report = f"stdout:\n{stdout[-6000:]}\nstderr:\n{stderr[-3000:]}"
        files = glob.glob(os.path.join(out, "chaos-*.json"))
        self.assertEqual(len(files), 1, report)
        with open(files[0]) as f:
            result = json.load(f)
        figures = result["figures"]
        for line in ("chaos soak: 60 s", "sent ", "faults ", "send p50/p99/max ms"):
            self.assertIn(line, stdout, report)
        self.assertEqual(set(result["faults_by_kind"]), set(chaos.CI_FAULTS), report)
        self.assertGreater(figures["ok"], 1000, report)
        self.assertGreater(figures["reconnects"], 0, report)
        self.assertEqual(result["violations"], {}, report)
        self.assertEqual(proc.returncode, 0, report)


class NetemTests(TestCase):
    """bench/netem.py: the namespaces, the forwarder, the delay, the clean-up (root only)."""

    timeout = 60

    def test_forward_delay_cleanup(self) -> None:
        from bench import netem
        from tests.harness import RedisServer

        why = netem.available()
        if why:
            raise SkipTest(why)
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        n = netem.Netem()
        self.addCleanup(n.cleanup)
        n.setup()
        [port] = n.forward([redis.port])

        def ping() -> tuple[bytes, float]:
            t = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(100), time.monotonic() - t

        self.assertEqual(ping()[0], b"+PONG\r\n")
        n.shape("delay 100 0")
        reply, took = ping()
        self.assertEqual(reply, b"+PONG\r\n")
        self.assertGreater(took, 0.18)  # 100 ms each way
        n.shape(None)
        self.assertLess(ping()[1], 0.15)
        redis.kill()
        self.assertEqual(ping()[0], b"")  # accepted, then closed: the backend is down
        redis.start()
        self.assertEqual(ping()[0], b"+PONG\r\n")
        names = (n.ns_a, n.ns_b)
        n.cleanup()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for name in names:
            self.assertNotIn(name, listed)
