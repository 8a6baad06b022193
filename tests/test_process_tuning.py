"""What twistd's start-up sets for the whole process (IMServer with gc_tuning)."""

from __future__ import annotations

import gc
import sys

import attrs
from twisted.trial.unittest import TestCase

from imserver.config import Config, ConfigError, parse_config
from imserver.server import IMServer
from tests.support import reactor


class SwitchIntervalTests(TestCase):
    def setUp(self) -> None:
        interval, thresholds = sys.getswitchinterval(), gc.get_threshold()

        def restore() -> None:
            sys.setswitchinterval(interval)
            gc.set_threshold(*thresholds)

        self.addCleanup(restore)

    def test_default_is_cpython_s(self) -> None:
        self.assertEqual(Config.embedded().server.gil_switch_interval_ms, 5.0)
        self.assertEqual(
            parse_config({"server": {"gil_switch_interval_ms": 0.5}}).server.gil_switch_interval_ms,
            0.5,
        )
        self.assertRaises(ConfigError, parse_config, {"server": {"gil_switch_interval_ms": 0}})

    def test_set_by_the_process_tuning_only(self) -> None:
        base = Config.embedded()
        config = attrs.evolve(base, server=attrs.evolve(base.server, gil_switch_interval_ms=0.5))
        sys.setswitchinterval(0.005)
        IMServer(config, reactor)
        self.assertEqual(sys.getswitchinterval(), 0.005)  # tests do not tune the process
        IMServer(config, reactor, gc_tuning=True)
        self.assertAlmostEqual(sys.getswitchinterval(), 0.0005)
