"""``python -m bench <scenario> [options]``: see bench/README.md."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from bench import plot, runner, social, stages


def _server_options(
    p: argparse.ArgumentParser, target_default: str | None = None, transports: bool = False
) -> None:
    g = p.add_argument_group("server")
    g.add_argument(
        "--stack",
        choices=("embedded", "mysql-redis"),
        default="embedded",
        help="start an imserver of this kind (default: embedded)",
    )
    g.add_argument("--endpoint", help="drive a running server instead, e.g. tcp:127.0.0.1:7000")
    g.add_argument("--pid", type=int, help="the running server's pid (for /proc)")
    g.add_argument("--secret", help="the running server's [auth].secret (to mint tokens)")
    g.add_argument("--http-port", type=int, help="the running server's HTTP port (for /metrics)")
    g.add_argument(
        "--ws-url",
        help="the running server's WebSocket URL, e.g. ws://127.0.0.1:7001/v1/ws "
        "(for --transport ws)",
    )
    g.add_argument(
        "--extra-pid",
        action="append",
        metavar="NAME=PID",
        help="another process to measure (e.g. mariadb=1234); repeatable",
    )
    g.add_argument(
        "--nodes",
        type=int,
        default=1,
        metavar="N",
        help="mysql-redis: start N imserver nodes (node ids 1..N, one MariaDB + Redis, "
        "a port each); pairs cross nodes, other clients round-robin (default 1)",
    )
    g.add_argument(
        "--server-workers",
        type=int,
        default=1,
        metavar="N",
        help="mysql-redis: one imserver with [server] workers = N (one port shared with "
        "SO_REUSEPORT); exclusive with --nodes (default 1)",
    )
    g.add_argument(
        "--server-config",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="a setting of the imserver the tool starts, VALUE in TOML "
        "(e.g. server.gil_switch_interval_ms=1); repeatable",
    )
    g.add_argument(
        "--backlog",
        type=int,
        help="listen backlog of the servers the tool starts "
        "(default: imserver's 4096, the relay's 50)",
    )
    g.add_argument(
        "--transport",
        default="tcp",
        metavar="tcp|ws",
        help="how the load clients connect to imserver: raw TCP, or WebSocket (its "
        "[server] websocket listener; the relay speaks TCP only)"
        + (
            "; pairs: tcp,ws measures both on the same server, alternating (with --rounds)"
            if transports
            else ""
        )
        + " (default tcp)",
    )
    if target_default:
        g.add_argument(
            "--relay-nagle",
            action="store_true",
            help="keep Nagle's algorithm on the relay's connections "
            "(default: TCP_NODELAY, like imserver)",
        )
        g.add_argument(
            "--target",
            choices=("imserver", "relay", "both"),
            help=f"imserver, the baseline relay, or both (default: {target_default}; "
            "imserver with --transport ws)",
        )
        p.set_defaults(target_default=target_default)
    o = p.add_argument_group("output")
    o.add_argument("--results-dir", default=runner.RESULTS_DIR)
    o.add_argument("--quiet", action="store_true", help="no progress bar")


def _pairs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, default=50, help="sender/recipient pairs (default 50)")
    p.add_argument(
        "--window", type=int, default=10, help="messages in flight per sender (default 10)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (1)")
    p.add_argument("--pad", type=int, default=0, help="extra body characters per message (0)")
    p.add_argument("--workers", type=int, default=2, help="load worker processes (default 2)")
    p.add_argument(
        "--drain", type=float, default=15.0, help="max seconds to wait for stragglers (15)"
    )


def _sources_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sources",
        type=int,
        default=0,
        metavar="N",
        help="bind the load clients to N loopback source addresses 127.0.0.2 .. 127.0.0.N+1, "
        "round robin (each has its own ephemeral ports); default 0: one per 10,000 "
        "connections (idle: at least 2; connect: no bind up to 10,000)",
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description="imserver benchmarks")
    sub = ap.add_subparsers(dest="scenario", required=True)

    p = sub.add_parser("pairs", help="P pairs, closed loop (W in flight) or open loop (--rate)")
    _pairs_options(p)
    p.add_argument(
        "--rate",
        type=float,
        help="open loop: total offered msg/s (paced per sender; in flight still capped by W)",
    )
    p.add_argument(
        "--devices",
        default="1",
        metavar="N[,M...]",
        help="each sender and recipient online on N devices (default 1); several counts, "
        "e.g. 1,3: a run of each on the same server, compared",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --devices or --transport tcp,ws: measure each count (transport) this "
        "many times, alternating (default 1)",
    )
    _server_options(p, "both", transports=True)

    p = sub.add_parser(
        "social",
        help="pairs with typing, presence, read/delivered receipts and edits mixed in",
    )
    _pairs_options(p)
    p.add_argument("--rate", type=float, help="open loop: total offered msg/s (as for pairs)")
    p.add_argument("--no-typing", action="store_true", help="no typing before each message")
    p.add_argument(
        "--read-every", type=int, default=10, help="a read per this many messages received (10)"
    )
    p.add_argument(
        "--edit-every", type=int, default=50, help="edit every this-th message sent (50; 0: none)"
    )
    p.add_argument(
        "--watch-others",
        type=int,
        default=20,
        help="users each client watches besides its peer (20: the flappers first)",
    )
    p.add_argument("--flappers", type=int, default=10, help="extra users going on and offline (10)")
    p.add_argument(
        "--flap-seconds",
        type=float,
        default=4.0,
        help="each flapper's time online, then offline (4: above the server's 3 s coalescing)",
    )
    _server_options(p)
    p.set_defaults(target="imserver", relay_nagle=False)

    p = sub.add_parser(
        "cost", help="CPU per 1,000 events of each new push path (typing, presence, ...)"
    )
    p.add_argument(
        "--paths",
        default="typing,presence,delivered,edit",
        help="push paths, in order (default typing,presence,delivered,edit)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per path (10)")
    p.add_argument(
        "--presence-duration",
        type=float,
        default=20.0,
        help="measured seconds of the presence path (20: 6 transitions at 3.5 s)",
    )
    p.add_argument("--baseline", type=float, default=3.0, help="idle seconds before each path (3)")
    p.add_argument(
        "--settle", type=float, default=0.5, help="seconds measured after the last event (0.5)"
    )
    p.add_argument("--pairs", type=int, default=20, help="pairs for typing/delivered/edit (20)")
    p.add_argument("--typing-rate", type=float, default=1000.0, help="typing/s (1000)")
    p.add_argument("--edit-rate", type=float, default=300.0, help="edits/s (300)")
    p.add_argument("--delivered-rate", type=float, default=500.0, help="acks/s, one id each (500)")
    p.add_argument("--watchers", type=int, default=1000, help="watchers of the one user (1000)")
    p.add_argument(
        "--flap-seconds",
        type=float,
        default=3.5,
        help="the watched user's time online, then offline (3.5: above the 3 s coalescing)",
    )
    p.add_argument("--workers", type=int, default=2, help="load worker processes (2)")
    _server_options(p)

    p = sub.add_parser(
        "stages", help="pairs with py-spy on the server: CPU-us per message by stage"
    )
    _pairs_options(p)
    p.add_argument(
        "--rate-hz", type=int, default=250, help="py-spy samples per second (default 250)"
    )
    p.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every non-idle thread, not only the GIL holder (counts threads "
        "blocked on sockets as busy)",
    )
    _server_options(p)
    p.set_defaults(rate=None, devices="1", rounds=1)

    p = sub.add_parser("sweep", help="pairs open loop at several rates; plots")
    _pairs_options(p)
    p.set_defaults(duration=5.0)
    p.add_argument("--rates", required=True, help="offered msg/s, comma separated")
    _server_options(p, "both")

    p = sub.add_parser("offline", help="queue N messages for offline users, then drain them")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--messages", type=int, default=10000, help="total messages (default 10000)")
    p.add_argument("--window", type=int, default=10, help="sends in flight per sender")
    p.add_argument("--limit", type=int, default=500, help="sync page size (default 500)")
    p.add_argument("--pad", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    _server_options(p)

    p = sub.add_parser(
        "catchup", help="a device misses N messages, reconnects with since and pages catchup"
    )
    p.add_argument("--messages", type=int, default=10000, help="messages missed (default 10000)")
    p.add_argument("--senders", type=int, default=10, help="users sending them (default 10)")
    p.add_argument("--window", type=int, default=10, help="sends in flight per sender (10)")
    p.add_argument("--limit", type=int, default=500, help="catchup page size (default 500)")
    p.add_argument("--pad", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="load workers sending (default 1)")
    p.add_argument(
        "--settle", type=float, default=1.0, help="seconds between the last send and the return (1)"
    )
    _server_options(p)

    p = sub.add_parser("idle", help="C idle connections with heartbeats: RSS and CPU")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--heartbeat", type=float, default=5.0, help="ping period, seconds (5)")
    p.add_argument("--measure", type=float, help="heartbeat window (default max(3 periods, 10s))")
    p.add_argument("--baseline", type=float, default=3.0, help="idle server window before (3s)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds before reading RSS (2)")
    p.add_argument("--workers", type=int, default=2, help="at least C/5000 are used")
    p.add_argument(
        "--load-pairs",
        type=int,
        default=0,
        help="run P pairs (closed loop) beside the idle connections during the heartbeats",
    )
    p.add_argument("--load-window", type=int, default=1, help="in flight per pair (1)")
    p.add_argument("--load-duration", type=float, default=10.0, help="pairs seconds (10)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=25,
        help="connections being opened at a time per worker (25): a slower storm for "
        "many workers on few cores",
    )
    _sources_option(p)
    _server_options(p, "imserver")

    p = sub.add_parser("connect", help="C clients connect and authenticate at once")
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="connecting at a time per worker (default 0: all at once)",
    )
    p.add_argument("--workers", type=int, default=2)
    _sources_option(p)
    _server_options(p, "imserver")

    p = sub.add_parser(
        "chaos", help="mixed load on MariaDB + Redis while faults are injected; checks against SQL"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, default=1.0, help="load duration (default 1)")
    g.add_argument("--seconds", type=float, help="load duration in seconds (instead of --minutes)")
    p.add_argument("--nodes", type=int, default=1, help="imserver nodes (default 1)")
    p.add_argument("--pairs", type=int, default=20, help="sender/recipient pairs (default 20)")
    p.add_argument("--rate", type=float, default=10.0, help="msg/s per sender (default 10)")
    p.add_argument("--window", type=int, default=8, help="sends in flight per sender, at most (8)")
    p.add_argument("--burst", type=int, default=4, help="sends written at once (default 4)")
    p.add_argument("--workers", type=int, default=1, help="load worker processes (default 1)")
    p.add_argument(
        "--faults",
        help="comma-separated faults in schedule order (default: the CI set up to 90 s, "
        "all of them beyond; see bench/README.md)",
    )
    p.add_argument(
        "--every", type=float, help="seconds between fault starts (default 8 up to 2 min, else 15)"
    )
    p.add_argument(
        "--netem",
        action="store_true",
        help="node 1 reaches its backends through two network namespaces and tc netem "
        "(root; adds the netem_delay and netem_loss faults)",
    )
    p.add_argument(
        "--reconnect-every",
        type=float,
        default=60.0,
        help="each client drops its connection once per this many seconds on average "
        "(60; 0: never)",
    )
    p.add_argument("--storm", type=int, default=300, help="clients of a connect storm (300)")
    p.add_argument(
        "--settle", type=float, default=60.0, help="max seconds to answer what was left (60)"
    )
    p.add_argument(
        "--rss-growth-mb",
        type=float,
        default=150.0,
        help="a node whose RSS grows more than this is a violation (150)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--results-dir", default=runner.RESULTS_DIR)
    o.add_argument("--quiet", action="store_true", help="no progress line")

    p = sub.add_parser("plot", help="redraw the plots of saved results")
    p.add_argument("files", nargs="+")
    return ap


COMMANDS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "pairs": runner.cmd_pairs,
    "sweep": runner.cmd_sweep,
    "offline": runner.cmd_offline,
    "catchup": runner.cmd_catchup,
    "idle": runner.cmd_idle,
    "connect": runner.cmd_connect,
    "social": social.cmd_social,
    "cost": social.cmd_cost,
    "stages": stages.cmd_stages,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.scenario == "plot":
        for path in args.files:
            for png in plot.plot_file(path) or ["(nothing to plot for this scenario)"]:
                print(png)
        return 0
    if args.scenario == "chaos":
        from bench import chaos

        return chaos.cmd_chaos(args)
    try:
        runner.check_server_args(args)
        result = COMMANDS[args.scenario](args)
    except runner.BenchError as e:
        runner.log(f"\nbench failed: {e}")
        return 2
    path = runner.save(result, args.results_dir)
    summary = social.summary_lines if args.scenario in ("social", "cost") else runner.summary_lines
    if args.scenario == "stages":
        summary = stages.summary_lines
    for line in summary(result):
        print(line)
    print(f"results: {os.path.relpath(path)}")
    if args.scenario == "catchup" and not result["targets"]["imserver"]["verify"]["ok_exactly"]:
        runner.log("catchup: the device did not get exactly the messages sent, once each")
        sys.stdout.flush()
        return 1
    if args.scenario in ("sweep", "pairs"):
        try:
            for png in plot.plot_result(result, os.path.splitext(path)[0]):
                print(f"plot: {os.path.relpath(png)}")
        except ImportError as e:
            runner.log(f"no plot ({e})")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
