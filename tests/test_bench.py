"""
Smoke tests of the benchmark tool (bench/): each runs ``python -m bench``
for a second or two at a tiny load, as a user would, on the embedded stack
(and on mysql-redis with several nodes or workers), and checks that the
saved results are sane: no errors, every message delivered exactly once and
in order, positive rates, the relay ratio, the cost of every server process.
Also the tool's own logic that needs no server (the catch-up checker, the
order of the ``--devices`` runs and their comparison).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial.unittest import TestCase

from bench.__main__ import parser
from bench.runner import (
    BenchError,
    check_transport_args,
    compare_devices,
    device_order,
    parse_devices,
    parse_transports,
    source_addresses,
    with_settings,
)
from bench.streamcheck import StreamCheck
from tests.harness import need

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchTestCase(TestCase):
    """Runs the tool and checks its results (no tests of its own)."""

    timeout = 120

    def bench(self, *argv: str) -> tuple[dict[str, Any], str]:
        """Run the tool; return its one result file (parsed) and the directory."""
        out = tempfile.mkdtemp(prefix="imserver-bench-")
        self.addCleanup(shutil.rmtree, out, True)
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(
            [sys.executable, "-m", "bench", *argv, "--results-dir", out, "--quiet"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=100,
        )
        self.assertEqual(
            proc.returncode, 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
        files = glob.glob(os.path.join(out, "*.json"))
        self.assertEqual(len(files), 1, files)
        with open(files[0]) as f:
            result = json.load(f)
        self.assertIn("results:", proc.stdout)
        return result, out

    def assertMachine(self, result: dict[str, Any]) -> None:
        machine = result["machine"]
        self.assertGreaterEqual(machine["cores"], 1)
        self.assertTrue(machine["python"])
        self.assertGreater(machine["calibration"]["msgpack_roundtrip_us"], 0)

    def assertPairs(self, t: dict[str, Any], offered: float | None = None) -> None:
        self.assertEqual(t["errors"], {})
        v = t["verify"]
        self.assertTrue(v["exactly_once_in_order"], v)
        self.assertGreater(v["expected"], 0)
        self.assertEqual(v["delivered_unique"], v["expected"])
        self.assertEqual(v["delivered"], v["expected"])
        self.assertEqual(v["duplicates"] + v["missing"] + v["reorders"] + v["unexpected"], 0)
        self.assertEqual(v["acks_ok"], v["acks_sent"])
        self.assertGreater(v["acks_sent"], 0)
        rate = t["throughput"]["delivered_msg_s"]
        self.assertGreater(rate, 0)
        if offered is not None:
            self.assertLess(abs(rate / offered - 1), 0.25, (rate, offered))
        for kind in ("send_to_ok", "send_to_push"):
            lat = t["latency"][kind]
            self.assertGreater(lat["count"], 0)
            self.assertGreater(lat["p99_ms"], 0)
            self.assertLessEqual(lat["p50_ms"], lat["p99_ms"])
            self.assertLess(lat["p99_ms"], 5000)
        server = t["cost"]["server"]
        self.assertGreaterEqual(server["cpu_s"], 0)
        self.assertIsNotNone(server["cpu_ms_per_1k_msgs"])
        self.assertGreater(server["rss_after_mb"], 0)
        self.assertIn("workers", t["cost"])


class BenchSmokeTests(BenchTestCase):
    def test_pairs_imserver_and_relay(self) -> None:
        """Closed loop, 2 pairs, window 2, against an embedded imserver and the relay."""
        result, out = self.bench(
            *("pairs", "--pairs", "2", "--window", "2", "--duration", "2"),
            *("--warmup", "0.3", "--stack", "embedded", "--target", "both"),
        )
        self.assertMachine(result)
        self.assertEqual(result["params"]["mode"], "closed")
        self.assertEqual(set(result["targets"]), {"imserver", "relay"})
        for t in result["targets"].values():
            self.assertPairs(t)
        imserver = result["targets"]["imserver"]
        self.assertEqual(imserver["target"]["stack"], "embedded")
        # The server's own metrics were read around the window.
        self.assertGreater(imserver["server_metrics"]["imserver_messages_total{stage=sent}"], 0)
        ratio = result["ratio_to_relay"]
        self.assertGreater(ratio["throughput"], 0)
        self.assertIsNotNone(ratio["server_cpu_per_msg"])
        self.assertTrue(glob.glob(os.path.join(out, "pairs-*.png")))

    def test_pairs_open_loop_relay(self) -> None:
        """Open loop: the offered rate is what gets delivered when nothing saturates."""
        result, _ = self.bench(
            *("pairs", "--pairs", "4", "--window", "4", "--rate", "200"),
            *("--duration", "1.5", "--warmup", "0.3", "--target", "relay"),
        )
        self.assertEqual(result["params"]["mode"], "open")
        t = result["targets"]["relay"]
        self.assertPairs(t, offered=200)
        self.assertEqual(t["throughput"]["backlog_at_end"], 0)

    def test_connect(self) -> None:
        result, _ = self.bench(
            "connect", "--clients", "20", "--stack", "embedded", "--sources", "3"
        )
        # Bound to 3 loopback source addresses (issue 13), round robin.
        self.assertEqual(result["params"]["sources"], ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
        t = result["targets"]["imserver"]
        self.assertEqual(t["errors"], {})
        self.assertEqual(t["ok"], 20)
        self.assertGreater(t["auths_per_s"], 0)
        lat = t["latency"]["connect_auth"]
        self.assertEqual(lat["count"], 20)
        self.assertLessEqual(lat["p50_ms"], lat["p99_ms"])
        self.assertGreater(t["server_metrics"]["imserver_auths_total{result=ok}"], 0)

    def test_offline(self) -> None:
        result, _ = self.bench(
            "offline", "--pairs", "5", "--messages", "50", "--limit", "7", "--stack", "embedded"
        )
        t = result["targets"]["imserver"]
        self.assertEqual(t["errors"], {})
        v = t["verify"]
        self.assertTrue(v["exactly_once_in_order"], v)
        self.assertEqual((v["expected"], v["ok"], v["unique"], v["drained"]), (50, 50, 50, 50))
        self.assertGreater(t["queue"]["msg_s"], 0)
        self.assertGreater(t["drain"]["drained_msg_s"], 0)

    def test_pairs_devices(self) -> None:
        """--devices 1,3: one run of each on the same servers; with 3 devices every
        message is pushed to the recipient's 3 and the sender's 2 other devices."""
        result, out = self.bench(
            *("pairs", "--pairs", "2", "--window", "2", "--duration", "1.5", "--warmup", "0.3"),
            *("--stack", "embedded", "--target", "both", "--devices", "1,3"),
        )
        self.assertEqual(result["params"]["order"], [1, 3])
        self.assertEqual([r["devices"] for r in result["runs"]], [1, 3])
        for run in result["runs"]:
            self.assertEqual(set(run["targets"]), {"imserver", "relay"})
            for t in run["targets"].values():
                self.assertPairs(t)
                th, v = t["throughput"], t["verify"]
                pushes = 2 * run["devices"] - 1
                self.assertEqual(th["devices"], run["devices"])
                self.assertEqual(v["expected"], pushes * v["expected_msgs"])
                self.assertGreaterEqual(th["delivered_pushes_s"], th["delivered_msg_s"])
                self.assertLess(abs(th["pushes_per_msg"] - pushes), 0.3, th)
            self.assertIn("ratio_to_relay", run)
        imserver = result["devices_comparison"]["imserver"]
        self.assertGreater(imserver["3"]["messages_ratio_to_first"], 0)
        self.assertIn("meets_bar", imserver["3"])
        self.assertFalse(glob.glob(os.path.join(out, "*.png")))  # runs: no single-run plot

    def test_pairs_over_websocket(self) -> None:
        """--transport ws: the load clients on the WebSocket listener, the same checks."""
        result, _ = self.bench(
            *("pairs", "--pairs", "2", "--window", "2", "--duration", "1.5"),
            *("--warmup", "0.3", "--stack", "embedded", "--transport", "ws"),
        )
        self.assertEqual(result["params"]["transport"], "ws")
        self.assertEqual(set(result["targets"]), {"imserver"})  # the relay speaks TCP only
        t = result["targets"]["imserver"]
        self.assertPairs(t)
        self.assertEqual(t["target"]["transport"], "ws")
        self.assertTrue(t["target"]["ws_urls"][0].startswith("ws://127.0.0.1:"))
        self.assertEqual(t["connections_by_transport"], {"ws": 4})

    def test_pairs_tcp_and_websocket_alternating(self) -> None:
        """--transport tcp,ws: both on one server, alternating, compared."""
        result, _ = self.bench(
            *("pairs", "--pairs", "2", "--window", "2", "--duration", "1", "--warmup", "0.2"),
            *("--stack", "embedded", "--transport", "tcp,ws", "--rounds", "2"),
        )
        self.assertEqual(result["params"]["transport_order"], ["tcp", "ws", "tcp", "ws"])
        self.assertEqual([r["transport"] for r in result["runs"]], ["tcp", "ws", "tcp", "ws"])
        servers = set()
        for run in result["runs"]:
            t = run["targets"]["imserver"]
            self.assertPairs(t)
            self.assertEqual(t["connections_by_transport"], {run["transport"]: 4})
            servers.add(t["target"]["pids"]["server"])
        self.assertEqual(len(servers), 1)  # the same server for every run
        c = result["transports_comparison"]["imserver"]
        self.assertEqual((c["tcp"]["runs"], c["ws"]["runs"]), (2, 2))
        self.assertGreater(c["ws"]["messages_ratio_to_first"], 0)
        self.assertGreater(c["ws"]["server_cpu_ratio_to_first"], 0)

    def test_connect_over_websocket(self) -> None:
        result, _ = self.bench(
            "connect", "--clients", "20", "--stack", "embedded", "--transport", "ws"
        )
        t = result["targets"]["imserver"]
        self.assertEqual((t["errors"], t["ok"]), ({}, 20))
        self.assertEqual(t["target"]["transport"], "ws")

    def test_catchup(self) -> None:
        """A device misses 300 messages from 3 senders and catches up in pages of 50."""
        result, _ = self.bench(
            *("catchup", "--messages", "300", "--senders", "3", "--limit", "50"),
            *("--settle", "0.2", "--stack", "embedded"),
        )
        t = result["targets"]["imserver"]
        self.assertEqual(t["errors"], {})
        v = t["verify"]
        self.assertTrue(v["ok_exactly"], v)
        self.assertEqual((v["ok"], v["msg_events"], v["unique"], v["missing"]), (300, 300, 300, 0))
        self.assertEqual(v["pushes_during_catchup"], 0)
        c = t["catchup"]
        self.assertGreaterEqual(c["pages"], 6)
        self.assertGreater(c["events_s"], 0)
        self.assertGreaterEqual(c["server_cpu_s"], 0)
        self.assertGreater(t["queue"]["msg_s"], 0)
        self.assertFalse(t["first_auth"].get("reset"))
        self.assertEqual(v["position"], 300)  # a fresh user: one seq per message received

    def test_idle(self) -> None:
        result, _ = self.bench(
            *("idle", "--connections", "40", "--heartbeat", "1", "--measure", "2"),
            *("--baseline", "0.5", "--settle", "0.3", "--stack", "embedded"),
        )
        self.assertEqual(result["params"]["sources"], ["127.0.0.2", "127.0.0.3"])  # at least 2
        t = result["targets"]["imserver"]
        self.assertEqual(t["errors"], {})
        self.assertEqual(t["connections"], 40)
        self.assertEqual(t["connections_open_at_rss"], 40)
        self.assertIsNotNone(t["rss_kb_per_connection"])
        # Its descriptors: its own before connecting, + one per connection after.
        [fds] = t["server_open_files"].values()
        self.assertGreaterEqual(fds["after"] - fds["before"], 40, fds)
        cpu = t["server_cpu"]
        # 40 connections pinging every second: about 40 pings/s, all answered.
        self.assertLess(abs(cpu["pings_per_s"] / 40 - 1), 0.3, cpu)
        self.assertLess(abs(cpu["pongs_per_s"] / cpu["pings_per_s"] - 1), 0.1, cpu)
        self.assertGreater(t["latency"]["ping_rtt"]["count"], 0)
        self.assertIsNone(t["load_pairs"])
        # The server's gc pauses, from /metrics (issue 13).
        self.assertIsNotNone(t["gc_longest_pause_ms"])
        self.assertIsNotNone(t["gc_longest_pause_cpu_ms"])
        self.assertIn("gc_window_pause_at_most_ms", t)
        self.assertIn("worker_lag", t["latency"])

    def test_idle_with_pairs_beside(self) -> None:
        """Issue 13: pairs run beside the idle connections while the pings are timed."""
        result, _ = self.bench(
            *("idle", "--connections", "20", "--heartbeat", "1", "--measure", "2"),
            *("--baseline", "0.5", "--settle", "0.3", "--stack", "embedded"),
            *("--load-pairs", "2", "--load-duration", "1"),
        )
        t = result["targets"]["imserver"]
        self.assertEqual(t["errors"], {})
        beside = t["load_pairs"]
        self.assertEqual(beside["pairs"], 2)
        self.assertEqual(beside["errors"], {})
        self.assertTrue(beside["exactly_once_in_order"], beside)
        self.assertGreater(beside["delivered_msg_s"], 0)
        self.assertGreater(t["latency"]["ping_rtt"]["count"], 0)


class BenchSocialSmokeTests(BenchTestCase):
    """Issue 11's ops in the bench (bench/social.py): the pairs load with them mixed
    in, and the cost of each push path. Features the server does not have yet are
    skipped with a note (C{features}, C{absent}): the runs pass at every stage."""

    def test_social(self) -> None:
        """4 pairs with typing, watches, 3 flapping users, reads and edits."""
        result, _ = self.bench(
            *("social", "--pairs", "4", "--window", "2", "--duration", "3", "--warmup", "0.5"),
            # Flaps every 1.3 s: an odd number of changes in each 3 s of the server's
            # coalescing (an even number may end where it began and push nothing).
            *("--flappers", "3", "--flap-seconds", "1.3", "--edit-every", "5"),
            *("--read-every", "5", "--stack", "embedded"),
        )
        self.assertMachine(result)
        self.assertEqual(result["scenario"], "social")
        t = result["targets"]["imserver"]
        # The messages: as in pairs, every one exactly once, in order, acked.
        self.assertPairs(t)
        s = t["social"]
        self.assertEqual(s["errors"], {})  # no error answer to any mixed-in op
        self.assertEqual(set(s["features"]), {"typing", "presence", "delivered", "read", "edit"})
        self.assertEqual(s["features"]["read"], "on")  # read receipts exist since v1
        self.assertGreater(s["pushes_s"]["read"], 0)
        self.assertGreater(s["requests"]["read"], 0)
        self.assertGreater(s["flaps"], 0)
        for feature, op in (("typing", "typing"), ("presence", "watch"), ("edit", "edit")):
            if s["features"][feature] == "on":
                # Landed: its requests answered ok and its pushes arrived.
                self.assertGreater(s["oks"][op], 0, feature)
                self.assertGreater(s["pushes_s"][feature], 0, feature)
            else:
                self.assertIn(op, s["absent"], feature)
        if s["features"]["delivered"] == "on":
            self.assertGreater(s["latency"]["send_to_delivered"]["count"], 0)

    def test_cost(self) -> None:
        """Each push path for a second on tiny loads (40 watchers of one user)."""
        result, _ = self.bench(
            *("cost", "--duration", "1.5", "--presence-duration", "3", "--baseline", "0.3"),
            *("--pairs", "4"),
            *("--typing-rate", "100", "--edit-rate", "50", "--delivered-rate", "100"),
            *("--watchers", "40", "--flap-seconds", "1.3", "--stack", "embedded"),
        )
        t = result["targets"]["imserver"]
        self.assertEqual(result["params"]["paths"], ["typing", "presence", "delivered", "edit"])
        for path in result["params"]["paths"]:
            p = t[path]
            self.assertEqual(p["errors"], {}, path)
            self.assertEqual(p["social_errors"], {}, path)
            if p["absent"]:
                self.assertIn("skipped", p["note"])
                continue
            self.assertGreater(p["issued"], 0, path)
            self.assertIn("server", p["cost"])
            if p["events"]:
                net = p["net_cpu_ms_per_1k_events"]
                self.assertIsNotNone(net["total"], path)
                self.assertGreaterEqual(net["total"], net["server"])
        if not t["presence"]["absent"]:
            # 40 watchers, the user flapping every 1.3 s (coalesced to one push per 3 s).
            self.assertGreater(t["presence"]["events"], 0)
            self.assertLessEqual(t["presence"]["pushes_per_transition"], 40)


class BenchClusterSmokeTests(BenchTestCase):
    """mysql-redis with several server processes: every one is measured."""

    def setUp(self) -> None:
        need("mariadbd")
        need("redis-server")

    def pairs(self, *argv: str) -> dict[str, Any]:
        result, _ = self.bench(
            *("pairs", "--pairs", "8", "--window", "2", "--duration", "1.5"),
            *("--warmup", "0.3", "--stack", "mysql-redis", "--target", "imserver", *argv),
        )
        t: dict[str, Any] = result["targets"]["imserver"]
        self.assertPairs(t)
        return t

    def assertSummed(self, t: dict[str, Any], names: set[str]) -> None:
        """cost.server is the sum of every server process, listed in server_processes."""
        server, each = t["cost"]["server"], t["cost"]["server_processes"]
        self.assertEqual(set(each), names)
        self.assertEqual(server["processes"], len(names))
        self.assertGreater(server["processes"], 1)
        for key in ("cpu_s", "rss_after_mb"):
            self.assertAlmostEqual(server[key], sum(p[key] for p in each.values()), delta=0.3)
        self.assertGreater(server["cpu_s"], 0)
        self.assertGreater(server["cpu_ms_per_1k_msgs"], 0)
        self.assertIn("mariadb", t["cost"])
        self.assertIn("redis", t["cost"])

    def test_pairs_two_nodes(self) -> None:
        """Two nodes, each sender on the other node than its recipient: all pushes cross."""
        t = self.pairs("--nodes", "2")
        self.assertEqual(t["placement"], "cross-node")
        self.assertEqual((t["target"]["nodes"], len(t["target"]["endpoints"])), (2, 2))
        self.assertSummed(t, {"node1", "node2"})
        for node in t["cost"]["server_processes"].values():
            self.assertGreater(node["cpu_s"], 0)  # both serve senders and recipients
        # The /metrics of both nodes, added up: every message went over pub/sub,
        # and so did the delivered receipts its ack sent back (one per ack call
        # and session, at most one per message).
        self.assertIn("2 nodes", t["server_metrics_scope"])
        metrics = t["server_metrics"]
        sent = metrics["imserver_messages_total{stage=sent}"]
        crossed = metrics["imserver_cluster_pushes_total{way=sent}"]
        self.assertGreater(sent, 0)
        self.assertGreater(crossed, 0.8 * sent, (crossed, sent))
        self.assertLess(crossed, 2.2 * sent, (crossed, sent))

    def test_pairs_two_server_workers(self) -> None:
        """One config with workers = 2: the supervisor and both workers are measured."""
        t = self.pairs("--server-workers", "2")
        self.assertEqual((t["target"]["server_workers"], len(t["target"]["endpoints"])), (2, 1))
        self.assertSummed(t, {"supervisor", "worker0", "worker1"})
        self.assertIn("2 workers", t["server_metrics_scope"])
        self.assertGreater(t["server_metrics"]["imserver_messages_total{stage=sent}"], 0)

    def test_refused_without_mysql_redis(self) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "bench", "pairs", "--nodes", "2", "--quiet"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(proc.returncode, 2)
        self.assertIn("--nodes needs --stack mysql-redis", proc.stderr)


class BenchLogicTests(TestCase):
    """The tool's own logic, on made-up data."""

    def msg(self, seq: int, sender: int, q: int) -> dict[str, Any]:
        return {"t": "msg", "seq": seq, "from": sender, "msg_id": seq, "body": {"q": q, "s": 0}}

    def test_stream_check_clean(self) -> None:
        check = StreamCheck({7: 2, 8: 1})
        more = check.page(
            {"events": [self.msg(3, 7, 0), self.msg(5, 8, 0)], "seq": 5, "more": True}
        )
        self.assertTrue(more)
        # Events of other kinds are counted apart; the position may pass over seqs.
        page = {"events": [self.msg(9, 7, 1), {"t": "read", "seq": 10}], "seq": 12, "more": False}
        self.assertFalse(check.page(page))
        r = check.result()
        self.assertTrue(r["exactly_once_in_order"], r)
        self.assertEqual((r["msg_events"], r["unique"], r["pages"], r["position"]), (3, 3, 2, 12))
        self.assertEqual(r["other_events"], {"read": 1})
        self.assertEqual(r["page_sizes"], [2, 2])

    def test_stream_check_catches(self) -> None:
        """Each fault is counted and makes the check fail."""
        cases = {
            "duplicates": [self.msg(1, 7, 0), self.msg(2, 7, 0), self.msg(3, 7, 1)],
            "reorders": [self.msg(1, 7, 1), self.msg(2, 7, 0)],
            "unexpected": [self.msg(1, 7, 0), self.msg(2, 7, 1), self.msg(3, 9, 0)],
            "seq_errors": [self.msg(2, 7, 0), self.msg(2, 7, 1)],
            "missing": [self.msg(1, 7, 0)],
            "malformed": [self.msg(1, 7, 0), self.msg(2, 7, 1), "junk"],
        }
        for name, events in cases.items():
            check = StreamCheck({7: 2})
            check.page({"events": events, "seq": 9, "more": False})
            r = check.result()
            self.assertGreater(r[name], 0, name)
            self.assertFalse(r["exactly_once_in_order"], name)
        # A page behind its own events, and a catch-up that never finished.
        check = StreamCheck({7: 1})
        check.page({"events": [self.msg(4, 7, 0)], "seq": 3, "more": False})
        self.assertEqual(check.result()["seq_errors"], 1)
        check = StreamCheck({7: 1})
        check.page({"events": [self.msg(4, 7, 0)], "seq": 4, "more": True})
        self.assertFalse(check.result()["exactly_once_in_order"])

    def test_devices_options(self) -> None:
        self.assertEqual(parse_devices(None), [1])
        self.assertEqual(parse_devices("1,3"), [1, 3])
        for bad in ("x", "0", "1,,2000", ","):
            self.assertRaises(BenchError, parse_devices, bad)
        # The counts alternate, round after round.
        self.assertEqual(
            [d for _, d in device_order([1, 3], 2)], [1, 3, 1, 3], device_order([1, 3], 2)
        )

    def test_connection_memory(self) -> None:
        """bench.connmem (issue 13): idle connections share the wheel's one timer
        and cost 6 tracked objects each (11 with a DelayedCall each)."""
        from bench import connmem

        m = connmem.measure(200)
        self.assertEqual(m["delayed_calls"], 1)
        self.assertLessEqual(m["tracked_objects_per_connection"], 6.5)
        self.assertLess(m["bytes_per_connection"], 1500)

    def test_source_addresses(self) -> None:
        """Issue 13: the load clients' loopback source addresses, one per 10,000
        connections unless --sources says; none needing more than their ports."""
        self.assertIsNone(source_addresses(2000, 0))  # connect: no bind for one range
        self.assertEqual(source_addresses(2000, 0, minimum=2), ["127.0.0.2", "127.0.0.3"])
        self.assertEqual(len(source_addresses(19000, 0) or []), 2)
        auto = source_addresses(100000, None) or []
        self.assertEqual((len(auto), auto[0], auto[-1]), (10, "127.0.0.2", "127.0.0.11"))
        self.assertEqual(source_addresses(100000, 12)[-1], "127.0.0.13")  # type: ignore[index]
        self.assertEqual(source_addresses(10, 1), ["127.0.0.2"])
        # 100,000 on 2 addresses: 50,000 each, over one address's ~28,000 ports.
        with self.assertRaises(BenchError) as e:
            source_addresses(100000, 2)
        self.assertIn("ephemeral ports", str(e.exception))
        for bad in (-1, 255):
            self.assertRaises(BenchError, source_addresses, 10, bad)
        a = parser().parse_args(["idle", "--connections", "100000", "--sources", "12"])
        self.assertEqual(a.sources, 12)
        self.assertEqual(parser().parse_args(["connect"]).sources, 0)
        # idle: connecting per worker at a time (25), lower for a slower storm.
        self.assertEqual(parser().parse_args(["idle"]).concurrency, 25)
        self.assertEqual(parser().parse_args(["idle", "--concurrency", "5"]).concurrency, 5)

    def test_transport_options(self) -> None:
        self.assertEqual(parse_transports(None), ["tcp"])
        self.assertEqual(parse_transports("tcp,ws"), ["tcp", "ws"])
        for bad in ("udp", "ws,ws", ","):
            self.assertRaises(BenchError, parse_transports, bad)

        def args(*argv: str) -> argparse.Namespace:
            return parser().parse_args(["pairs", *argv])

        a = args("--transport", "ws")
        check_transport_args(a)
        self.assertEqual(a.target, "imserver")  # not the relay, which speaks TCP only
        a = args()
        check_transport_args(a)
        self.assertEqual(a.target, "both")
        for argv in (
            ["--transport", "ws", "--target", "both"],
            ["--transport", "tcp,ws", "--devices", "1,3"],
            ["--transport", "ws", "--endpoint", "tcp:127.0.0.1:7000"],
        ):
            self.assertRaises(BenchError, check_transport_args, args(*argv))
        a = parser().parse_args(["connect", "--transport", "tcp,ws"])
        self.assertRaises(BenchError, check_transport_args, a)

    def test_compare_devices(self) -> None:
        def run(devices: int, msgs: float) -> dict[str, Any]:
            t = {
                "throughput": {"delivered_msg_s": msgs, "delivered_pushes_s": msgs * 5},
                "latency": {"send_to_push": {"p99_ms": 9.0}, "send_to_ok": {"p99_ms": 4.0}},
                "cost": {
                    "server": {"cores": 0.9, "cpu_ms_per_1k_msgs": 90.0},
                    "workers": {"cores": 0.5, "per_worker_cores": [0.2, 0.3]},
                },
                "machine_busy_cores": 1.5,
                "other_cores": 0.5 if msgs == 1200 else 0.0,
                "verify": {"exactly_once_in_order": True},
            }
            return {"devices": devices, "targets": {"imserver": t}}

        runs = [run(1, 1000), run(3, 700), run(1, 1200), run(3, 500)]
        c = compare_devices(runs, [1, 3])["imserver"]
        self.assertEqual((c["1"]["messages_s"], c["3"]["messages_s"]), (1100, 600))
        self.assertEqual(c["3"]["messages_s_each"], [700, 500])
        self.assertEqual(c["3"]["messages_ratio_to_first"], round(600 / 1100, 3))
        self.assertFalse(c["3"]["meets_bar"])
        self.assertEqual(c["3"]["workers_max_core"], 0.3)
        # Without the run another session disturbed (other_cores 0.5):
        self.assertEqual((c["1"]["quiet"]["runs"], c["1"]["quiet"]["messages_s"]), (1, 1000))
        self.assertEqual(c["3"]["quiet"]["messages_ratio_to_first"], 0.6)


class BenchGcMetricsTests(TestCase):
    """Issue 13: the servers' longest gc pause is the largest over nodes, not their sum."""

    def test_longest_pause_is_a_max_over_nodes(self) -> None:
        from bench import metrics
        from bench.runner import gc_longest_pause_ms

        def node(longest: float, cpu: float) -> metrics.Samples:
            return {
                ("imserver_gc_pause_longest_seconds", (("generation", "2"),)): longest,
                ("imserver_gc_pause_longest_cpu_seconds", (("generation", "2"),)): cpu,
            }

        before = {"node1": node(0.001, 0.001), "node2": node(0.002, 0.001)}
        after = {"node1": node(0.004, 0.003), "node2": node(0.012, 0.005)}
        out, nodes = metrics.window_all(before, after)
        self.assertEqual(nodes, ["node1", "node2"])
        assert out is not None
        self.assertEqual(out["imserver_gc_pause_longest_ms{generation=2}"], 12.0)
        self.assertEqual(out["imserver_gc_pause_longest_cpu_ms{generation=2}"], 5.0)
        self.assertEqual(gc_longest_pause_ms(out), 12.0)
        self.assertEqual(gc_longest_pause_ms(out, cpu=True), 5.0)
        self.assertIsNone(gc_longest_pause_ms(None))


class BenchReactorLagTests(TestCase):
    """Issue 13: the server's reactor lag over the window: p99 and its largest bucket."""

    def test_window_p99_and_max(self) -> None:
        from bench import metrics
        from bench.runner import lag_text, reactor_lag

        def lag(counts: dict[str, float], longest: float) -> metrics.Samples:
            samples: metrics.Samples = {
                ("imserver_reactor_lag_seconds_bucket", (("le", le),)): n
                for le, n in counts.items()
            }
            samples[("imserver_reactor_lag_seconds_count", ())] = counts["+Inf"]
            samples[("imserver_reactor_lag_seconds_sum", ())] = 0.0
            samples[("imserver_reactor_lag_longest_seconds", ())] = longest
            return samples

        # Start-up had a 0.3 s lag; the window has 200 calls, the largest <= 20 ms.
        before = lag({"0.001": 90, "0.005": 99, "0.02": 99, "0.5": 100, "+Inf": 100}, 0.3)
        after = lag({"0.001": 270, "0.005": 297, "0.02": 300, "0.5": 300, "+Inf": 300}, 0.3)
        out = metrics.window(before, after)
        assert out is not None
        entry = out["imserver_reactor_lag_seconds"]
        self.assertEqual(entry["count"], 200)
        self.assertEqual(entry["max_at_most_ms"], 20.0)
        summary = reactor_lag(out)
        assert summary is not None
        self.assertEqual(summary["longest_since_start_ms"], 300.0)
        self.assertEqual(summary["max_at_most_ms"], 20.0)
        self.assertGreater(summary["p99_ms"], 1.0)
        self.assertLessEqual(summary["p99_ms"], 5.0)
        self.assertIn("max <= 20.0 ms", lag_text({"reactor_lag": summary}))
        self.assertIsNone(reactor_lag(None))
        self.assertEqual(lag_text({"reactor_lag": None}), "")
        # A longest since start below the bucket's bound is the tighter bound.
        out["imserver_reactor_lag_longest_ms"] = 12.5
        self.assertEqual(reactor_lag(out)["max_at_most_ms"], 12.5)  # type: ignore[index]
        # ... and bounds the quantiles interpolated inside its bucket.
        out["imserver_reactor_lag_longest_ms"] = 3.0
        self.assertEqual(reactor_lag(out)["p99_ms"], 3.0)  # type: ignore[index]


class _FakeWorker:
    """What a scenario calls on its worker process: records the events."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)


class _Sink:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class IdleTimingTests(TestCase):
    """The idle scenario times only the measured window (issue 13)."""

    def test_pings_before_the_first_mark_are_not_timed(self) -> None:
        """
        Regression: the heartbeats start with the connect storm, and their round
        trips then (hundreds of ms while thousands of auths queue) were counted
        as the idle server's ping p99.
        """
        from bench.worker import Idle

        spec = {"endpoint": "tcp:127.0.0.1:1", "secret": "s" * 32, "uids": [1], "heartbeat": 1.0}
        idle = Idle(_FakeWorker(), spec)  # type: ignore[arg-type]
        conn = idle.conns[0]
        conn.open = True
        conn.transport = _Sink()
        conn.ping()
        idle.command({"cmd": "mark"})  # the window starts while that ping is out
        conn.on_frame({"t": "ok", "id": 2})
        self.assertEqual(len(idle.rtt), 0)
        conn.ping()
        conn.on_frame({"t": "ok", "id": 2})
        self.assertEqual(len(idle.rtt), 1)
        self.assertEqual(idle.pongs, 2)

    def test_worker_lag_only_in_the_window(self) -> None:
        from bench.worker import Idle

        spec = {"endpoint": "tcp:127.0.0.1:1", "secret": "s" * 32, "uids": [1], "heartbeat": 1.0}
        idle = Idle(_FakeWorker(), spec)  # type: ignore[arg-type]
        idle.tick()
        idle.tick()
        self.assertEqual(len(idle.tick_lag), 0)
        idle.command({"cmd": "mark"})
        idle.tick()
        idle.tick()
        self.assertEqual(len(idle.tick_lag), 2)

    def test_skipped_ticks_still_ping(self) -> None:
        """Regression: a late reactor skipped LoopingCall ticks, and with them
        whole heartbeat slots (idle connections then timed out on a busy machine)."""
        from bench.worker import Idle

        spec = {
            "endpoint": "tcp:127.0.0.1:1",
            "secret": "s" * 32,
            "uids": [1, 2, 3],
            "heartbeat": 0.06,
        }
        idle = Idle(_FakeWorker(), spec)  # type: ignore[arg-type]
        for i, conn in enumerate(idle.conns):
            conn.open = True
            conn.transport = _Sink()
            idle.slotted(conn, i)
        idle.tick(3)  # three ticks due at once: every slot
        self.assertEqual([len(c.transport.written) for c in idle.conns], [1, 1, 1])
        idle.tick(10)  # more than a whole period late: each once, not more
        self.assertEqual([len(c.transport.written) for c in idle.conns], [2, 2, 2])

    def test_gc_window_pause_is_the_largest_bucket_bound(self) -> None:
        from bench.runner import gc_window_pause_ms

        metrics = {
            "imserver_gc_pause_seconds{generation=0}": {"count": 9, "max_at_most_ms": 2.5},
            "imserver_gc_pause_seconds{generation=1}": {"count": 2, "max_at_most_ms": 10.0},
            "imserver_gc_pause_longest_ms{generation=1}": 42.0,  # since start: not the window
        }
        self.assertEqual(gc_window_pause_ms(metrics), 10.0)
        self.assertIsNone(gc_window_pause_ms({}))
        self.assertIsNone(gc_window_pause_ms(None))


class ServerConfigOptionTests(TestCase):
    """C{--server-config SECTION.KEY=VALUE}: merged into the started server's config."""

    def test_values_are_toml_and_merge_into_the_sections(self) -> None:
        self.assertEqual(
            with_settings(
                {"limits": {"send_burst": 5}},
                ["server.gil_switch_interval_ms=0.5", "limits.send_burst=9", "server.x=a word"],
            ),
            {"limits": {"send_burst": 9}, "server": {"gil_switch_interval_ms": 0.5, "x": "a word"}},
        )
        self.assertEqual(
            with_settings(None, ['storage.key_prefix="p"']), {"storage": {"key_prefix": "p"}}
        )
        self.assertIsNone(with_settings(None, []))

    def test_malformed(self) -> None:
        for bad in ("server", "server=1", ".x=1", "server.=1"):
            with self.subTest(bad=bad):
                self.assertRaises(BenchError, with_settings, None, [bad])

    def test_parsed_by_the_cli(self) -> None:
        args = parser().parse_args(
            ["pairs", "--server-config", "server.a=1", "--server-config", "server.b=2"]
        )
        self.assertEqual(args.server_config, ["server.a=1", "server.b=2"])
