"""Garbage collector pauses in /metrics, and the start-up tuning (issue 13)."""

from __future__ import annotations

import gc
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from imserver.gcwatch import THRESHOLDS, GcWatch, tune
from imserver.metrics import Metrics
from tests.harness import ServerProcess


class FakeTimer:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class GcWatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.timer = FakeTimer()
        self.cpu = FakeTimer()
        self.watch = GcWatch(self.timer, self.cpu)

    def collection(self, generation: int, seconds: float, collected: int = 0) -> None:
        self.watch._callback("start", {"generation": generation})
        self.timer.now += seconds
        self.cpu.now += seconds / 2
        self.watch._callback("stop", {"generation": generation, "collected": collected})

    def test_pauses_by_generation_and_the_longest(self) -> None:
        # Binary fractions: exact in floats.
        self.collection(0, 2**-11)
        self.collection(2, 2**-5, collected=5)
        self.collection(2, 2**-6)
        self.assertEqual(self.watch.longest, {0: 2**-11, 1: 0.0, 2: 2**-5})
        self.assertEqual(self.watch.longest_pause, 2**-5)
        self.assertEqual(self.watch.longest_cpu, {0: 2**-12, 1: 0.0, 2: 2**-6})
        self.assertEqual(self.watch.collected, 5)
        metrics = Metrics()
        metrics.register(self.watch)
        text = metrics.render().decode()
        self.assertIn('imserver_gc_pause_seconds_count{generation="2"} 2.0', text)
        self.assertIn('imserver_gc_pause_seconds_bucket{generation="2",le="0.02"} 1.0', text)
        self.assertIn('imserver_gc_pause_seconds_bucket{generation="0",le="0.0005"} 1.0', text)
        self.assertIn('imserver_gc_pause_longest_seconds{generation="2"} 0.03125', text)
        self.assertIn('imserver_gc_pause_longest_cpu_seconds{generation="2"} 0.015625', text)
        self.assertIn("imserver_gc_frozen_objects", text)
        self.assertIn("imserver_gc_collected_objects_total 5.0", text)

    def test_a_stop_without_its_start_is_ignored(self) -> None:
        """Installed while a collection ran: its stop alone times nothing."""
        self.watch._callback("stop", {"generation": 2, "collected": 0})
        self.assertEqual(self.watch.longest_pause, 0.0)
        self.assertEqual(self.watch.pauses[2].counts[-1], 0)

    def test_install_times_real_collections_and_uninstall_stops(self) -> None:
        watch = GcWatch()
        watch.install()
        watch.install()  # once only
        self.addCleanup(watch.uninstall)
        self.assertEqual(gc.callbacks.count(watch._callback), 1)
        gc.collect()
        self.assertEqual(sum(watch.pauses[2].counts), 1)
        self.assertGreater(watch.longest[2], 0.0)
        watch.uninstall()
        gc.collect()
        self.assertEqual(sum(watch.pauses[2].counts), 1)
        self.assertNotIn(watch._callback, gc.callbacks)


class TuneTests(SynchronousTestCase):
    def test_thresholds(self) -> None:
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        tune()
        self.assertEqual(gc.get_threshold(), THRESHOLDS)


class ServerProcessTests(SynchronousTestCase):
    """Under twistd the start-up objects are frozen and the pauses are in /metrics."""

    def test_twistd_freezes_and_reports(self) -> None:
        server = ServerProcess()
        self.addCleanup(server.cleanup)
        server.start()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = dict(
            line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("imserver_gc_")
        )
        self.assertGreater(float(samples["imserver_gc_frozen_objects"]), 10_000)
        self.assertIn('imserver_gc_pause_longest_seconds{generation="2"}', samples)
        self.assertIn('imserver_gc_pause_seconds_count{generation="0"}', samples)
