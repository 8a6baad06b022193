"""
Latency histograms that merge across workers.

Workers keep raw samples (nanoseconds, an C{array('q')}: one append per
message) and turn them into a sparse log-linear histogram at the end: values
below 128 us are exact, above that 64 sub-buckets per power of two (relative
error under 1.6%). The parent adds the histograms up and reads percentiles.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

SUB_BITS = 6  # 64 sub-buckets per power of two
LINEAR = 1 << (SUB_BITS + 1)  # exact below 128 us

Histogram = dict[int, int]  # bucket index -> count


def bucket(us: int) -> int:
    if us < LINEAR:
        return max(us, 0)
    shift = us.bit_length() - SUB_BITS - 1
    return (shift << SUB_BITS) + (us >> shift)


def bucket_value(index: int) -> float:
    """The middle of a bucket, in microseconds."""
    if index < LINEAR:
        return float(index)
    shift = (index >> SUB_BITS) - 1
    low = (index - (shift << SUB_BITS)) << shift
    return low + ((1 << shift) - 1) / 2


def histogram(samples_ns: Iterable[int]) -> Histogram:
    counts: Counter[int] = Counter()
    for ns in samples_ns:
        counts[bucket(ns // 1000)] += 1
    return dict(counts)


def merge(histograms: Iterable[Mapping[Any, int]]) -> Histogram:
    """Add histograms up (keys may be strings, as after a JSON round trip)."""
    total: Counter[int] = Counter()
    for h in histograms:
        for k, n in h.items():
            total[int(k)] += n
    return dict(total)


PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999))


def summary(h: Mapping[int, int]) -> dict[str, Any]:
    """count, mean, p50/p90/p99/p99.9 and max, in milliseconds."""
    n = sum(h.values())
    out: dict[str, Any] = {"count": n}
    if not n:
        return out
    items = sorted(h.items())
    out["mean_ms"] = round(sum(bucket_value(k) * c for k, c in items) / n / 1000, 3)
    for name, q in PERCENTILES:
        rank = q * n
        running = 0
        for k, c in items:
            running += c
            if running >= rank:
                out[f"{name}_ms"] = round(bucket_value(k) / 1000, 3)
                break
    out["max_ms"] = round(bucket_value(items[-1][0]) / 1000, 3)
    return out
