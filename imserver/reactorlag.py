"""
The reactor's lag, measured by one timer (issue 13: where the time goes).

L{ReactorLag} runs a C{LoopingCall} every 50 ms and records how late each
call fires (actual - scheduled) into a lock-free L{imserver.metrics.Buckets}
and a longest-lag gauge. A late timer means the reactor was busy (a long
callback, a garbage collection) or the process waited for a core: every
socket event queued behind it waited as long. It tells the server's own
queueing apart from the load generator's or the network's, at the cost of
20 calls a second.

The lag includes the poller's timeout granularity (epoll rounds up to the
millisecond), so an idle reactor shows up to ~1 ms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from imserver.metrics import Buckets

LAG_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

#: Seconds between two measurements: often enough to catch a 10 ms stall in
#: a 10 s bench window many times, rare enough to cost nothing (~20 us/s).
INTERVAL = 0.05


class ReactorLag(Collector):
    """
    Times the lateness of a periodic timer. The tick runs on the reactor
    thread, so observing needs no lock; a scrape (also on the reactor) reads
    a consistent histogram.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        self.lags = Buckets(LAG_BUCKETS)
        self.longest = 0.0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._start = 0.0
        self._due = 0.0

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self) -> None:
        if self._loop.running:
            return
        self._start = self.clock.seconds()
        self._due = self._start + self.interval
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("reactor lag timer stopped", f)
        )

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now = self.clock.seconds()
        lag = max(0.0, now - self._due)
        self.lags.observe(lag)
        if lag > self.longest:
            self.longest = lag
        # LoopingCall schedules the next call on its grid (start + k * interval),
        # skipping the points a long stall missed: the first one after now.
        steps = math.floor((now - self._start) / self.interval) + 1
        self._due = self._start + steps * self.interval

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "imserver_reactor_lag_seconds",
            "How late a 50 ms reactor timer fired: the reactor busy or the process"
            " waiting for a core (every socket event waited as long).",
        )
        family.add_metric([], self.lags.cumulative(), self.lags.total)
        yield family
        yield GaugeMetricFamily(
            "imserver_reactor_lag_longest_seconds",
            "The longest reactor lag since start.",
            self.longest,
        )
