"""
Issue 11's ops in the benchmark, parent side (the workers: L{bench.socialload}).

* C{python -m bench social}: the C{pairs} load with typing before each message,
  presence watches (and users going on and offline), read and delivered
  receipts and occasional edits mixed in; msg/s, latencies and pushes/s per
  push type.
* C{python -m bench cost}: each new push path alone (typing, presence with
  1,000 watchers of one user going on and offline, delivered, edit): CPU of the
  server, MariaDB and Redis per 1,000 events, net of the idle CPU of the same
  connections.

A feature the server does not have yet (its ops answer C{unknown_op}) is
skipped with a note in C{features}: both run at every stage of issue 11.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from bench import runner, stats
from bench.runner import (
    BenchError,
    Progress,
    Uids,
    Window,
    bar,
    base_result,
    costs,
    imserver_target,
    log,
    ns,
    pairs_params,
    run_pairs,
    split,
    stack_param,
    warnings,
    workers,
)
from bench.stacks import Target, is_server

MODULE = "bench.socialload"
#: The new ops' rate limits lifted (the send limit is lifted by bench/stacks.py).
SOCIAL_LIMITS = {
    "limits": {
        "typing_per_second": 1e6,
        "typing_burst": 1_000_000,
        "social_per_second": 1e6,
        "social_burst": 1_000_000,
    }
}
PUSH_TYPES = ("typing", "presence", "delivered", "read", "edit")
FEATURES = {
    # feature: (the op whose unknown_op means "not there", the push it makes)
    "typing": ("typing", "typing"),
    "presence": ("watch", "presence"),
    "delivered": (None, "delivered"),
    "read": ("read", "read"),
    "edit": ("edit", "edit"),
}


def merged_mix(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' L{bench.socialload.Mix} results added up."""
    out: dict[str, Any] = {
        k: {} for k in ("requests", "oks", "errors", "pushes_in_window", "pushes_total")
    }
    absent: dict[str, str] = {}
    for r in results:
        mix = r["mix"]
        for key in out:
            for name, n in mix[key].items():
                out[key][name] = out[key].get(name, 0) + n
        absent.update(mix["absent"])
    out["absent"] = absent
    return out


def features(mix: dict[str, Any], off: dict[str, str] | None = None) -> dict[str, str]:
    """Per feature: "on", "off" (by an option: C{off}), or why it was skipped or saw
    nothing."""
    out = {}
    for name, (op, push) in FEATURES.items():
        if off and name in off:
            out[name] = f"off ({off[name]})"
        elif op is not None and op in mix["absent"]:
            out[name] = f"skipped ({op}: {mix['absent'][op]})"
        elif name == "presence" and "set_profile" in mix["absent"]:
            out[name] = f"on, share not set (set_profile: {mix['absent']['set_profile']})"
        elif mix["requests"].get(op or "", 1) and not mix["pushes_total"].get(push):
            out[name] = f"no {push} pushes received (not on this server?)"
        else:
            out[name] = "on"
    return out


# -- social --------------------------------------------------------------------------------


def social_params(args: Any) -> dict[str, Any]:
    params = pairs_params(args)
    params.update(
        module=MODULE,
        typing=not args.no_typing,
        read_every=args.read_every,
        edit_every=args.edit_every,
        watch_others=args.watch_others,
        flappers=args.flappers,
        flap_seconds=args.flap_seconds,
    )
    return params


def cmd_social(args: Any) -> dict[str, Any]:
    params = social_params(args)
    result = base_result("social", args, params)
    uids = Uids()
    progress = Progress(not args.quiet)
    flapper_uids = uids.take(args.flappers)

    def extend(specs: list[dict[str, Any]]) -> None:
        pool = [u for s in specs for u in s["uids"]]
        mine = [flapper_uids[i :: len(specs)] for i in range(len(specs))]
        for spec, flappers in zip(specs, mine, strict=True):
            spec["scenario"] = "social"
            spec["social"] = {
                "typing": params["typing"],
                "read_every": params["read_every"],
                "edit_every": params["edit_every"],
                "watch_others": params["watch_others"],
                "flap_seconds": params["flap_seconds"],
                "flapper_uids": flapper_uids,
                "my_flappers": flappers,
                "pool_uids": pool,
            }

    off = {
        name: flag
        for name, flag, on in (
            ("typing", "--no-typing", params["typing"]),
            ("read", "--read-every 0", params["read_every"]),
            ("edit", "--edit-every 0", params["edit_every"]),
        )
        if not on
    }

    def extra(results: list[dict[str, Any]], win: dict[str, Any]) -> dict[str, Any]:
        mix = merged_mix(results)
        seconds = win["seconds"]
        pushes = mix["pushes_in_window"]
        return {
            "social": {
                "pushes_s": {
                    t: round(pushes.get(t, 0) / seconds, 1)
                    for t in sorted({*PUSH_TYPES, *pushes})
                    if t != "msg"
                },
                "features": features(mix, off),
                "flaps": sum(r["flaps"] for r in results),
                "flapper_errors": dict(
                    sum((Counter(r["flapper_errors"]) for r in results), Counter())
                ),
                "latency": {
                    "send_to_delivered": stats.summary(
                        stats.merge(r["lat_delivered"] for r in results)
                    ),
                    "edit_to_push": stats.summary(stats.merge(r["lat_edit"] for r in results)),
                },
                **mix,
            }
        }

    def run(target: Target) -> dict[str, Any]:
        return run_pairs(target, params, uids, progress, "social", extend, extra)

    args.target = "imserver"
    target = imserver_target(args, SOCIAL_LIMITS)
    try:
        result["targets"] = {"imserver": run(target)}
    finally:
        target.stop()
    return result


def line_social(t: dict[str, Any]) -> str:
    s = t["social"]
    pushes = ", ".join(f"{k} {v:.0f}" for k, v in s["pushes_s"].items())
    skipped = {k: v for k, v in s["features"].items() if v != "on" and not v.startswith("off")}
    lat, edit = s["latency"]["send_to_delivered"], s["latency"]["edit_to_push"]
    return (
        f"{runner.line_pairs(t)}\n  pushes/s: {pushes}; send->delivered p50 "
        f"{lat.get('p50_ms')} p99 {lat.get('p99_ms')} ms; edit->push p50 {edit.get('p50_ms')} "
        f"p99 {edit.get('p99_ms')} ms; social errors {sum(s['errors'].values())}"
        + (f"\n  not measured: {skipped}" if skipped else "")
    )


# -- cost ----------------------------------------------------------------------------------

PATHS = ("typing", "presence", "delivered", "edit")


def path_specs(path: str, args: Any, target: Target, uids: Uids) -> list[dict[str, Any]]:
    base = {"scenario": "cost", "path": path, "endpoints": target.client_endpoints}
    base["secret"] = target.secret
    specs = []
    if path == "presence":
        user = uids.take(1)[0]
        first = 0
        for i, k in enumerate(split(args.watchers, args.workers)):
            specs.append(
                {
                    **base,
                    "uids": uids.take(k),
                    "first": first,
                    "user": user,
                    "flapper": i == 0,
                    "flap_seconds": args.flap_seconds,
                    "concurrency": 50,
                }
            )
            first += k
        return specs
    rate = {"typing": args.typing_rate, "edit": args.edit_rate}.get(path, args.delivered_rate)
    first = 0
    for n in split(args.pairs, args.workers):
        share = rate * n / args.pairs
        specs.append(
            {
                **base,
                "uids": uids.take(2 * n),
                "first_pair": first,
                "rate": share,
                # Enough to edit each once, to ack one by one (20 % to spare).
                "messages": max(1, int(rate * args.duration * 1.2 / args.pairs) + 1),
            }
        )
        first += n
    return specs


#: The events each path's CPU is divided by: pushes of this type received.
EVENT_PUSH = {"typing": "typing", "presence": "presence", "delivered": "delivered", "edit": "edit"}


def run_path(
    path: str, args: Any, target: Target, uids: Uids, progress: Progress
) -> dict[str, Any]:
    specs = path_specs(path, args, target, uids)
    label = f"[cost {path}]"
    duration = args.presence_duration if path == "presence" else args.duration
    with workers(specs, MODULE) as pool:
        pool.wait("ready", 300, lambda: progress.show(f"{label} connecting and priming"))
        # The same connections doing nothing: their idle CPU, subtracted below.
        idle = Window(target, pool.pids, scrape=False)
        idle.begin()
        # Presence's window is CPU-light: a longer idle baseline (10 ms ticks).
        baseline = max(args.baseline, 6.0) if path == "presence" else args.baseline
        pool.sleep_until(time.monotonic() + baseline)
        idle_win = idle.end()
        t_start = time.monotonic() + 0.2
        t_end = t_start + duration
        t_count = t_end + args.settle
        pool.send(
            {"cmd": "start", "t_start": ns(t_start), "t_end": ns(t_end), "t_count": ns(t_count)}
        )
        win = Window(target, pool.pids)

        def show() -> None:
            el = time.monotonic() - t_start
            progress.show(
                f"{label} {bar(el / duration)} {el:5.1f}/{duration:.0f}s "
                f"issued {int(pool.total('issued'))} pushes {int(pool.total('pushes'))} "
                f"errors {int(pool.total('errors'))}"
            )

        pool.sleep_until(t_start, show)
        win.begin()
        pool.sleep_until(t_count, show)
        loaded = win.end()
        pool.wait("issued", 30, show)
        pool.send({"cmd": "stop"})
        results = pool.collect(60, show)
    progress.done()
    mix = merged_mix(results)
    pushes = mix["pushes_in_window"]
    events = pushes.get(EVENT_PUSH[path], 0)
    # Requests really sent (a skipped op sends none), or the watched user's transitions.
    op = {"typing": "typing", "edit": "edit", "delivered": "ack"}.get(path)
    issued = mix["requests"].get(op, 0) if op else sum(r["issued"] for r in results)
    cost = costs(loaded, events, "cpu_ms_per_1k_events")
    seconds = loaded["seconds"]
    net: dict[str, Any] = {}
    gross: dict[str, Any] = {}
    total = gross_total = 0.0
    for name in ("server", "mariadb", "redis"):
        if name == "server":
            busy = sum(p["cpu_s"] for n, p in loaded["procs"].items() if is_server(n))
            idle_cores = sum(p["cores"] for n, p in idle_win["procs"].items() if is_server(n))
        elif name in loaded["procs"]:
            busy = loaded["procs"][name]["cpu_s"]
            idle_cores = idle_win["procs"].get(name, {}).get("cores", 0.0)
        else:
            continue
        cpu = max(0.0, busy - idle_cores * seconds)
        total += cpu
        gross_total += busy
        net[name] = round(cpu * 1e6 / events, 3) if events else None
        gross[name] = round(busy * 1e6 / events, 3) if events else None
    net["total"] = round(total * 1e6 / events, 3) if events else None
    gross["total"] = round(gross_total * 1e6 / events, 3) if events else None
    # Per request (typing, edit, ack): the figure that exists without the push
    # (an ack before delivered receipts: the baseline of the delivered path).
    per_issued = round(total * 1e6 / issued, 3) if issued else None
    out: dict[str, Any] = {
        "path": path,
        "events": events,
        "event": f"{EVENT_PUSH[path]} pushes received",
        "issued": issued,
        "issued_what": "transitions of the watched user" if path == "presence" else "requests",
        "window_s": seconds,
        "events_s": round(events / seconds, 1) if seconds else None,
        "pushes_in_window": pushes,
        "net_cpu_ms_per_1k_events": net,
        # Without subtracting the idle CPU: an upper bound, and the figure to read
        # when the window's CPU is only a few 10 ms ticks above idle (presence).
        "gross_cpu_ms_per_1k_events": gross,
        "net_cpu_ms_per_1k_issued": per_issued,
        "idle_cores": {
            n.removeprefix("server:"): p["cores"]
            for n, p in idle_win["procs"].items()
            if not n.startswith("worker")
        },
        "cost": cost,
        "requests": mix["requests"],
        "oks": mix["oks"],
        "social_errors": mix["errors"],
        "absent": mix["absent"],
        "errors": dict(runner.merged_errors(results)),
        "warnings": warnings(loaded),
        "other_cores": loaded["other_cores"],
        "machine_busy_cores": loaded["machine_busy_cores"],
        "server_metrics": loaded["metrics"],
    }
    if path == "presence":
        out["watchers"] = args.watchers
        out["pushes_per_transition"] = round(events / issued, 1) if issued else None
        out["net_cpu_ms_per_transition"] = round(total * 1e3 / issued, 3) if issued else None
        out["gross_cpu_ms_per_transition"] = (
            round(gross_total * 1e3 / issued, 3) if issued else None
        )
    if out["absent"]:
        out["note"] = "skipped: " + "; ".join(f"{k} {v}" for k, v in out["absent"].items())
    elif not events:
        out["note"] = f"no {EVENT_PUSH[path]} pushes: the feature is not on this server?"
    return out


def cmd_cost(args: Any) -> dict[str, Any]:
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        raise BenchError(f"--paths: unknown {bad} (known: {', '.join(PATHS)})")
    params = {
        "paths": paths,
        "duration": args.duration,
        "presence_duration": args.presence_duration,
        "baseline_s": args.baseline,
        "settle_s": args.settle,
        "pairs": args.pairs,
        "typing_rate": args.typing_rate,
        "edit_rate": args.edit_rate,
        "delivered_rate": args.delivered_rate,
        "watchers": args.watchers,
        "flap_seconds": args.flap_seconds,
        "workers": args.workers,
        "stack": stack_param(args),
    }
    result = base_result("cost", args, params)
    uids = Uids()
    progress = Progress(not args.quiet)
    target = imserver_target(args, SOCIAL_LIMITS)
    out: dict[str, Any] = {}
    try:
        for path in paths:
            out[path] = run_path(path, args, target, uids, progress)
            log(f"  {line_cost(out[path])}")
        out["target"] = target.describe()
    finally:
        target.stop()
    result["targets"] = {"imserver": out}
    return result


def line_cost(p: dict[str, Any]) -> str:
    if p.get("note") and not p["events"]:
        per = p.get("net_cpu_ms_per_1k_issued")
        issued = f" ({p['issued']} {p['issued_what']}: {per} CPU-ms per 1k)" if per else ""
        return f"{p['path']}: {p['note']}{issued}"
    net, gross = p["net_cpu_ms_per_1k_events"], p["gross_cpu_ms_per_1k_events"]
    parts = ", ".join(f"{k} {v}" for k, v in net.items() if k != "total")
    extra = ""
    if p["path"] == "presence":
        extra = (
            f"; {p['issued']} transitions x {p['watchers']} watchers, "
            f"{p['pushes_per_transition']} pushes and {p['net_cpu_ms_per_transition']} CPU-ms "
            f"(gross {p['gross_cpu_ms_per_transition']}) per transition"
        )
    return (
        f"{p['path']}: {p['events']} {p['event']} in {p['window_s']} s ({p['events_s']}/s); "
        f"CPU-ms per 1k events (net of idle) {net['total']} = {parts} (gross "
        f"{gross['total']}){extra}; "
        f"errors {sum(p['errors'].values()) + sum(p['social_errors'].values())}"
    )


def summary_lines(result: dict[str, Any]) -> list[str]:
    t = result["targets"]["imserver"]
    lines = []
    if result["scenario"] == "social":
        lines.append(f"imserver{runner.tag(t)}: {line_social(t)}")
    else:
        for path in result["params"]["paths"]:
            lines.append(line_cost(t[path]))
    for w in (
        [*t.get("warnings", [])]
        if result["scenario"] == "social"
        else [w for p in result["params"]["paths"] for w in t[p]["warnings"]]
    ):
        lines.insert(0, f"warning: {w}")
    return lines
