"""The lock-free histograms behind /metrics."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imserver.metrics import Buckets, Metrics


class BucketsTests(SynchronousTestCase):
    def test_le_semantics_and_sum(self) -> None:
        b = Buckets((1.0, 2.0))
        for value in (0.5, 1.0, 1.5, 2.0, 3.0):
            b.observe(value)
        self.assertEqual(b.cumulative(), [("1.0", 2.0), ("2.0", 4.0), ("+Inf", 5.0)])
        self.assertEqual(b.total, 8.0)

    def test_exported_families(self) -> None:
        m = Metrics()
        m.observe("send_to_push", 0.004)
        m.observe("no_such_latency", 1.0)  # ignored
        m.batch("commit")(7)
        m.sql("realtime")("run", 0.02)
        text = m.render().decode()
        self.assertIn('imserver_send_to_push_seconds_bucket{le="0.005"} 1.0', text)
        self.assertIn('imserver_batch_size_bucket{le="10",queue="commit"} 1.0', text)
        self.assertIn('imserver_sql_seconds_count{pool="realtime",stage="run"} 1.0', text)
