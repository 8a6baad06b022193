"""
Garbage collector pauses, timed and tuned (issue 13: no stall).

L{GcWatch} times every collection through C{gc.callbacks} (start -> stop,
per generation) into lock-free L{imserver.metrics.Buckets} and keeps the
longest pause, so that /metrics shows whether the collector stalls the
reactor. L{tune} makes full collections rarer and shorter: the objects of
start-up are frozen (never walked again) and the thresholds are raised.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from imserver.metrics import Buckets

GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)

#: gc thresholds set by L{tune}: gen0 every 1,000 net allocations instead of
#: 700 (young collections stay well under a millisecond; 10,000 made gen1
#: collections of ~50 ms), gen1 after 10 young ones as CPython's default, and
#: gen2 after 100 gen1 ones instead of 10. A full collection also waits until
#: the objects surviving since the last one are 25 % of the long-lived ones
#: (CPython's own rule), so it comes with growth, not with steady load.
THRESHOLDS = (1_000, 10, 100)


class GcWatch(Collector):
    """
    Times collections. The callback runs in whichever thread triggered the
    collection while it holds the GIL; collections do not nest, so one start
    time suffices. Observations are plain additions (no lock): a scrape may
    read a histogram mid-update, off by one observation at most.
    """

    def __init__(
        self,
        timer: Callable[[], float] = time.perf_counter,
        cpu_timer: Callable[[], float] = time.thread_time,
    ) -> None:
        self._timer = timer
        self._cpu_timer = cpu_timer
        self._started = 0.0
        self._cpu_started = 0.0
        self._generation = -1
        self.pauses = {g: Buckets(GC_BUCKETS) for g in (0, 1, 2)}
        self.longest = {0: 0.0, 1: 0.0, 2: 0.0}
        # The same in CPU time of the collecting thread: a wall-clock pause far
        # above it was the process waiting for a core, not the collector working.
        self.longest_cpu = {0: 0.0, 1: 0.0, 2: 0.0}
        self.collected = 0
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            gc.callbacks.remove(self._callback)
            self.installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._generation = info["generation"]
            self._started = self._timer()
            self._cpu_started = self._cpu_timer()
            return
        generation = self._generation
        if generation < 0:
            return  # installed during a collection
        self._generation = -1
        pause = self._timer() - self._started
        cpu = self._cpu_timer() - self._cpu_started
        self.pauses[generation].observe(pause)
        if pause > self.longest[generation]:
            self.longest[generation] = pause
        if cpu > self.longest_cpu[generation]:
            self.longest_cpu[generation] = cpu
        self.collected += info.get("collected", 0)

    @property
    def longest_pause(self) -> float:
        """The longest collection since start, any generation (seconds)."""
        return max(self.longest.values())

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "imserver_gc_pause_seconds",
            "Garbage collections by generation: how long each stopped the process.",
            labels=["generation"],
        )
        for generation, buckets in self.pauses.items():
            family.add_metric([str(generation)], buckets.cumulative(), buckets.total)
        yield family
        longest = GaugeMetricFamily(
            "imserver_gc_pause_longest_seconds",
            "The longest garbage collection since start, by generation.",
            labels=["generation"],
        )
        for generation, seconds in self.longest.items():
            longest.add_metric([str(generation)], seconds)
        yield longest
        longest_cpu = GaugeMetricFamily(
            "imserver_gc_pause_longest_cpu_seconds",
            "The most CPU time one garbage collection took since start, by generation"
            " (well below the wall-clock pause: the process was waiting for a core).",
            labels=["generation"],
        )
        for generation, seconds in self.longest_cpu.items():
            longest_cpu.add_metric([str(generation)], seconds)
        yield longest_cpu
        yield GaugeMetricFamily(
            "imserver_gc_frozen_objects",
            "Objects in the permanent generation (gc.freeze at start-up): never walked.",
            gc.get_freeze_count(),
        )
        yield CounterMetricFamily(
            "imserver_gc_collected_objects",
            "Unreachable objects the collector freed (reference cycles).",
            self.collected,
        )


def tune(thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
    """Raise the collector's thresholds (at start-up, before the listeners)."""
    gc.set_threshold(*thresholds)


def freeze() -> int:
    """
    Move every object alive now to the permanent generation, once the server
    is up: modules, config, services and their caches are then never walked
    by a collection again. Collect first so that garbage is not frozen.
    Returns the number of objects frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
