"""
Smoke tests of the benchmark tool (bench/): each runs ``python -m bench``
for a second or two at a tiny load, as a user would, on the embedded stack,
and checks that the saved results are sane: no errors, every message
delivered exactly once and in order, positive rates, the relay ratio.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial.unittest import TestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchSmokeTests(TestCase):
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
        result, _ = self.bench("connect", "--clients", "20", "--stack", "embedded")
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

    def test_idle(self) -> None:
        result, _ = self.bench(
            *("idle", "--connections", "40", "--heartbeat", "1", "--measure", "2"),
            *("--baseline", "0.5", "--settle", "0.3", "--stack", "embedded"),
        )
        t = result["targets"]["imserver"]
        self.assertEqual(t["errors"], {})
        self.assertEqual(t["connections"], 40)
        self.assertIsNotNone(t["rss_kb_per_connection"])
        cpu = t["server_cpu"]
        # 40 connections pinging every second: about 40 pings/s, all answered.
        self.assertLess(abs(cpu["pings_per_s"] / 40 - 1), 0.3, cpu)
        self.assertLess(abs(cpu["pongs_per_s"] / cpu["pings_per_s"] - 1), 0.1, cpu)
        self.assertGreater(t["latency"]["ping_rtt"]["count"], 0)
