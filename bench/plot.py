"""
PNG plots of saved results (matplotlib, Agg backend).

* a sweep: delivered msg/s against offered load, send->push latency p50/p99
  against offered load, and server CPU per 1,000 messages, imserver beside the
  relay;
* a pairs run: latency percentiles and throughput, imserver beside the relay;
* a connect run: connect+auth latency percentiles.
"""

from __future__ import annotations

import json
import os
from typing import Any

COLORS = {"imserver": "tab:blue", "relay": "tab:orange"}
PCTS = ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_file(path: str) -> list[str]:
    with open(path) as f:
        result = json.load(f)
    return plot_result(result, os.path.splitext(path)[0])


def plot_result(result: dict[str, Any], base: str) -> list[str]:
    scenario = result["scenario"]
    if scenario == "sweep":
        return [_sweep(result, base + ".png")]
    if scenario == "pairs" and "targets" in result:  # not --devices 1,3: see its runs
        return [_pairs(result, base + ".png")]
    if scenario == "connect":
        return [_connect(result, base + ".png")]
    return []


def _title(result: dict[str, Any]) -> str:
    m = result["machine"]
    p = result["params"]
    return (
        f"{result['scenario']} ({p.get('stack')}), {p.get('pairs', '')} pairs, window "
        f"{p.get('window', '')}; {m['cores']} cores, Python {m['python']}, {result['started_at']}"
    )


def _sweep(result: dict[str, Any], out: str) -> str:
    plt = _pyplot()
    points = result["points"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.2))
    offered_all = [p["offered_msg_s"] for p in points]
    for name in ("imserver", "relay"):
        pts = [p for p in points if name in p]
        if not pts:
            continue
        x = [p["offered_msg_s"] for p in pts]
        color = COLORS[name]
        ax1.plot(
            x,
            [p[name]["throughput"]["delivered_msg_s"] for p in pts],
            "o-",
            color=color,
            label=name,
        )
        for pct, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            ax2.plot(
                x,
                [p[name]["latency"]["send_to_push"].get(pct) for p in pts],
                style,
                color=color,
                label=f"{name} {pct[:-3]}",
            )
        ax3.plot(
            x,
            [p[name]["cost"]["server"]["cpu_ms_per_1k_msgs"] for p in pts],
            "o-",
            color=color,
            label=name,
        )
    ax1.plot(offered_all, offered_all, ":", color="grey", label="offered")
    ax1.set(xlabel="offered load (msg/s)", ylabel="delivered (msg/s)", title="Throughput")
    ax2.set(
        xlabel="offered load (msg/s)",
        ylabel="send -> push latency (ms)",
        yscale="log",
        title="Latency (from the scheduled send time)",
    )
    ax3.set(
        xlabel="offered load (msg/s)",
        ylabel="server CPU-ms per 1,000 messages",
        title="Server cost",
    )
    ax3.set_ylim(bottom=0)
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pairs(result: dict[str, Any], out: str) -> str:
    plt = _pyplot()
    targets = result["targets"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    names = list(targets)
    width = 0.8 / max(1, 2 * len(names))
    labels = [p[:-3] for p in PCTS]
    i = 0
    for name in names:
        for kind, hatch in (("send_to_ok", ""), ("send_to_push", "//")):
            lat = targets[name]["latency"][kind]
            xs = [k + (i - len(names)) * width + width / 2 for k in range(len(PCTS))]
            ax1.bar(
                xs,
                [lat.get(p) or 0 for p in PCTS],
                width,
                color=COLORS.get(name),
                hatch=hatch,
                edgecolor="black",
                label=f"{name} {kind.replace('_', ' ')}",
            )
            i += 1
    ax1.set_xticks(range(len(PCTS)), labels)
    ax1.set(ylabel="ms", yscale="log", title="Latency percentiles")
    ax1.legend(fontsize=8)
    ax2.bar(
        names,
        [targets[n]["throughput"]["delivered_msg_s"] for n in names],
        color=[COLORS.get(n) for n in names],
    )
    ax2.set(ylabel="delivered msg/s", title="Throughput")
    for ax in (ax1, ax2):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(_title(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _connect(result: dict[str, Any], out: str) -> str:
    plt = _pyplot()
    targets = result["targets"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(targets)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        lat = targets[name]["latency"]["connect_auth"]
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(PCTS))]
        ax.bar(
            xs,
            [lat.get(p) or 0 for p in PCTS],
            width,
            color=COLORS.get(name),
            label=f"{name}: {targets[name]['auths_per_s']} auths/s",
        )
    ax.set_xticks(range(len(PCTS)), [p[:-3] for p in PCTS])
    ax.set(ylabel="connect + auth (ms)", title=f"{result['params']['clients']} clients at once")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
