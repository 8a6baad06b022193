"""CPU seconds and RSS of a process (all its threads) from /proc."""

from __future__ import annotations

import os
from collections.abc import Mapping

import attrs

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@attrs.frozen
class Sample:
    cpu_s: float  # utime + stime
    rss_kb: int  # VmRSS
    sys_s: float = 0.0  # stime alone (system calls, page faults, fsync...)


def sample(pid: int) -> Sample | None:
    """None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    rss = 0
    for line in status.splitlines():
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1])
            break
    return Sample((utime + stime) / CLOCK_TICKS, rss, stime / CLOCK_TICKS)


def sample_all(pids: Mapping[str, int]) -> dict[str, Sample | None]:
    return {name: sample(pid) for name, pid in pids.items()}


def delta(
    before: Mapping[str, Sample | None], after: Mapping[str, Sample | None], seconds: float
) -> dict[str, dict[str, float]]:
    """Per process: CPU seconds used, cores busy on average, RSS before and after (MiB)."""
    out: dict[str, dict[str, float]] = {}
    for name, b in before.items():
        a = after.get(name)
        if a is None or b is None:
            continue
        cpu = a.cpu_s - b.cpu_s
        out[name] = {
            "cpu_s": round(cpu, 3),
            "sys_s": round(a.sys_s - b.sys_s, 3),
            "cores": round(cpu / seconds, 3) if seconds > 0 else 0.0,
            "rss_before_mb": round(b.rss_kb / 1024, 1),
            "rss_after_mb": round(a.rss_kb / 1024, 1),
        }
    return out


def open_files(pids: Mapping[str, int]) -> dict[str, int | None]:
    """Descriptors each process holds (C{/proc/PID/fd}; None: gone or not readable):
    a server's own (listeners, SQL, Redis, logs) beside its clients' (issue 13)."""
    out: dict[str, int | None] = {}
    for name, pid in pids.items():
        try:
            out[name] = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            out[name] = None
    return out
