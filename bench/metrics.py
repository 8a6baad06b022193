"""
The server's Prometheus metrics over a measurement window: scrape
C{/metrics} before and after, keep the difference of the histograms and
counters that explain the results (commit and push latency, batch sizes, SQL
stages, messages and errors).
"""

from __future__ import annotations

import http.client
import json
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

HISTOGRAMS = (
    "imserver_send_to_commit_seconds",
    "imserver_send_to_push_seconds",
    "imserver_batch_size",
    "imserver_sql_seconds",
    "imserver_gc_pause_seconds",
    "imserver_reactor_lag_seconds",
)
#: Gauges read at the window's end, not differenced: the longest since start
#: (the largest over the nodes, not their sum).
MAX_GAUGES = (
    "imserver_gc_pause_longest_seconds",
    "imserver_gc_pause_longest_cpu_seconds",
    "imserver_reactor_lag_longest_seconds",
)
#: Histograms whose largest observation in the window is reported too (as the
#: bound of its bucket): the longest-since-start gauge covers start-up as well.
WINDOW_MAX = ("imserver_reactor_lag_seconds", "imserver_gc_pause_seconds")
COUNTERS = (
    "imserver_messages_total",
    "imserver_errors_total",
    "imserver_auths_total",
    "imserver_cluster_pushes_total",
)


def scrape(http_port: int | None, timeout: float = 3.0) -> Samples | None:
    if not http_port:
        return None
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{http_port}/metrics", timeout=timeout
        ) as response:
            text = response.read().decode()
    except OSError:
        return None
    return _parse(text)


def _scrape_on(conn: http.client.HTTPConnection) -> Samples:
    """/metrics on an open (kept-alive) connection."""
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    return _parse(response.read().decode())


def _parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Scraper:
    """
    /metrics of every server process, by node.

    Nodes have a port each. Workers share one port, and the kernel hands each
    new connection to any of them, so for workers the scraper opens
    connections until C{/healthz} has named every node (node ids are
    distinct), and reads C{/metrics} on that same kept-alive connection, so
    each snapshot is known to be that node's.
    """

    def __init__(self, ports: list[int], workers: int = 1, timeout: float = 3.0) -> None:
        self.ports = [p for p in ports if p]
        self.workers = workers
        self.timeout = timeout

    def scrape(self) -> dict[str, Samples]:
        """Samples per node (C{"node<id>"}, or C{"server"} for a single process);
        the unreachable left out."""
        if self.workers > 1 and self.ports:
            return self._by_node(self.ports[0])
        out: dict[str, Samples] = {}
        for i, port in enumerate(self.ports):
            samples = scrape(port, self.timeout)
            if samples is not None:
                out[f"node{i + 1}" if len(self.ports) > 1 else "server"] = samples
        return out

    def _by_node(self, port: int) -> dict[str, Samples]:
        out: dict[str, Samples] = {}
        for _ in range(20 * self.workers):
            if len(out) >= self.workers:
                break
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
            try:
                conn.request("GET", "/healthz")
                node = json.loads(conn.getresponse().read()).get("node")
                key = f"node{node}"
                if node is not None and key not in out:
                    out[key] = _scrape_on(conn)
            except (OSError, ValueError, http.client.HTTPException):
                pass
            finally:
                conn.close()
        return out


def window_all(
    before: dict[str, Samples], after: dict[str, Samples]
) -> tuple[dict[str, Any] | None, list[str]]:
    """L{window} of the sum over the nodes read at both edges, and those nodes."""
    nodes = sorted(set(before) & set(after))
    if not nodes:
        return None, []
    total0: Samples = {}
    total1: Samples = {}
    for node in nodes:
        for total, samples in ((total0, before[node]), (total1, after[node])):
            for key, value in samples.items():
                if key[0] in MAX_GAUGES:
                    total[key] = max(total.get(key, 0.0), value)
                else:
                    total[key] = total.get(key, 0.0) + value
    return window(total0, total1), nodes


def _top_bound(buckets: list[tuple[float, float]]) -> float | None:
    """
    The upper bound of the highest bucket with an observation in the window
    (cumulative counts: the first that holds them all; inf past the last bound).
    """
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if count >= total:
            return bound
    return None


def _quantile(buckets: list[tuple[float, float]], q: float, interpolate: bool) -> float | None:
    """
    The q-th observation: interpolated inside its bucket (latencies), or the
    bucket's upper bound (batch sizes, which are integers: "at most").
    """
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            if not interpolate:
                return bound
            span = count - prev_count
            frac = (rank - prev_count) / span if span else 1.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


def window(before: Samples | None, after: Samples | None) -> dict[str, Any] | None:
    """Histograms (count, mean, p50, p99) and counters accumulated between two scrapes."""
    if before is None or after is None:
        return None
    diff = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out: dict[str, Any] = {}
    for name in HISTOGRAMS:
        series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        for (sample, labels), value in diff.items():
            if not sample.startswith(name):
                continue
            rest = tuple((k, v) for k, v in labels if k != "le")
            entry = series.setdefault(rest, {"buckets": []})
            if sample == name + "_bucket":
                entry["buckets"].append((float(dict(labels)["le"]), value))
            elif sample == name + "_count":
                entry["count"] = value
            elif sample == name + "_sum":
                entry["sum"] = value
        for labels, entry in sorted(series.items()):
            count = entry.get("count", 0.0)
            if not count:
                continue
            buckets = sorted(entry["buckets"])
            key = _series_key(name, labels)
            seconds = name.endswith("_seconds")
            scale = 1000.0 if seconds else 1.0
            p50, p99 = _quantile(buckets, 0.5, seconds), _quantile(buckets, 0.99, seconds)
            unit = "_ms" if seconds else "_at_most"
            out[key] = {
                "count": int(count),
                ("mean_ms" if seconds else "mean"): round(entry.get("sum", 0.0) / count * scale, 3),
                "p50" + unit: None if p50 is None else round(p50 * scale, 3),
                "p99" + unit: None if p99 is None else round(p99 * scale, 3),
            }
            if name in WINDOW_MAX:
                top = _top_bound(buckets)
                finite = top is not None and top != float("inf")
                out[key]["max_at_most_ms"] = round(top * scale, 3) if finite else None
    for name in MAX_GAUGES:
        for (sample, labels), value in sorted(after.items()):
            if sample == name:
                out[_series_key(name, labels).replace("_seconds", "_ms", 1)] = round(
                    value * 1000, 3
                )
    for name in COUNTERS:
        for (sample, labels), value in sorted(diff.items()):
            if sample == name and value:
                key = _series_key(name, labels)
                out[key] = int(value)
    return out


def _series_key(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    """C{name{k=v,...}} as the results show a series (C{name} alone without labels)."""
    return name + ("{" + ",".join(f"{k}={v}" for k, v in labels) + "}" if labels else "")
