"""The reactor's lag in /metrics (issue 13): how late a periodic timer fires."""

from __future__ import annotations

import time
import urllib.request

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imserver.metrics import Metrics
from imserver.reactorlag import LAG_BUCKETS, ReactorLag
from tests.harness import ServerProcess


class ReactorLagTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lag = ReactorLag(self.clock, interval=0.05)
        self.lag.start()
        self.addCleanup(self.lag.stop)

    def observed(self) -> int:
        return sum(self.lag.lags.counts)

    def test_on_time_is_no_lag(self) -> None:
        self.clock.pump([0.05] * 4)
        self.assertEqual(self.observed(), 4)
        self.assertEqual(self.lag.lags.counts[0], 4)  # all under the first bound
        self.assertAlmostEqual(self.lag.longest, 0.0)

    def test_a_late_call_is_its_lateness(self) -> None:
        """Due at 0.10, fired at 0.113: 13 ms late."""
        self.clock.advance(0.05)
        self.clock.advance(0.063)
        self.assertEqual(self.observed(), 2)
        self.assertAlmostEqual(self.lag.longest, 0.013)
        self.assertEqual(self.lag.lags.counts[LAG_BUCKETS.index(0.02)], 1)

    def test_a_stall_longer_than_the_interval(self) -> None:
        """
        Due at 0.05, fired at 0.55: 500 ms late (not its remainder modulo the
        interval); the next call is due on the grid (0.60) and on time.
        """
        self.clock.advance(0.55)
        self.assertAlmostEqual(self.lag.longest, 0.5)
        self.clock.advance(0.05)
        self.assertEqual(self.observed(), 2)
        self.assertAlmostEqual(self.lag.lags.total, 0.5)
        self.assertAlmostEqual(self.lag.longest, 0.5)

    def test_stop_cancels_the_timer(self) -> None:
        self.assertTrue(self.lag.running)
        self.lag.stop()
        self.lag.stop()
        self.assertFalse(self.lag.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.lag.start()  # and starts again, on a new grid
        self.clock.advance(0.05)
        self.assertEqual(self.observed(), 1)
        self.assertAlmostEqual(self.lag.longest, 0.0)

    def test_metrics(self) -> None:
        self.clock.advance(0.05)
        self.clock.advance(0.057)  # 7 ms late
        metrics = Metrics()
        metrics.register(self.lag)
        text = metrics.render().decode()
        self.assertIn("imserver_reactor_lag_seconds_count 2.0", text)
        self.assertIn('imserver_reactor_lag_seconds_bucket{le="0.0005"} 1.0', text)
        self.assertIn('imserver_reactor_lag_seconds_bucket{le="0.005"} 1.0', text)
        self.assertIn('imserver_reactor_lag_seconds_bucket{le="0.01"} 2.0', text)
        self.assertIn("imserver_reactor_lag_longest_seconds 0.00", text)


class ServerProcessTests(SynchronousTestCase):
    def test_the_server_reports_its_lag(self) -> None:
        server = ServerProcess()
        self.addCleanup(server.cleanup)
        server.start()
        time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = dict(
            line.rsplit(" ", 1)
            for line in text.splitlines()
            if line.startswith("imserver_reactor_lag_")
        )
        self.assertGreater(float(samples["imserver_reactor_lag_seconds_count"]), 3)
        self.assertIn("imserver_reactor_lag_longest_seconds", samples)
