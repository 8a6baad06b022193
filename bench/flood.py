"""
One client floods, the others should not notice (issue 9, defect 3).

A flooder pipelines N C{read} requests at once on one connection while
another pair of users sends one message at a time; the probe's send
latencies (during the flood, and before it as a baseline) and the server's
RSS (before, after the flood, after a second flood) are printed as JSON:

    python -m bench.flood [--reads 20000] [--stack embedded|mysql-redis]

The server is a throwaway C{twistd -n imserver} from tests/harness.py.
L{measure} is also what tests/test_e2e_limits.py runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater, react

from imserver.client import connect

_cids = itertools.count(1)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "n": len(ordered),
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def measure(
    reactor: Any,
    endpoint: str,
    token: Callable[[int], str],
    pid: int,
    *,
    reads: int = 20_000,
    uid_base: int = 900_000,
) -> dict[str, Any]:
    flooder = await connect(reactor, endpoint, token(uid_base + 1))
    peer = await connect(reactor, endpoint, token(uid_base + 2))
    sender = await connect(reactor, endpoint, token(uid_base + 3))
    receiver = await connect(reactor, endpoint, token(uid_base + 4))
    receiver.on_push = lambda frame: None
    peer.on_push = lambda frame: None
    first = await peer.request("send", to=uid_base + 1, cid=f"f{next(_cids)}", body="hi")
    session, msg_id = first["session_id"], first["msg_id"]

    async def probe(until: Callable[[], bool], at_least: int) -> list[float]:
        latencies: list[float] = []
        while until() or len(latencies) < at_least:
            started = time.monotonic()
            await sender.request("send", to=uid_base + 4, cid=f"p{next(_cids)}", body="probe")
            latencies.append(time.monotonic() - started)
            await deferLater(reactor, 0.06, lambda: None)  # under 20 sends/s
        return latencies

    async def flood() -> tuple[list[float], float, int]:
        done = False
        ds = [flooder.request("read", session_id=session, msg_id=msg_id) for _ in range(reads)]
        started = time.monotonic()
        everything: Deferred[Any] = DeferredList(ds, consumeErrors=True)

        def finished(results: Any) -> Any:
            nonlocal done
            done = True
            return results

        everything.addCallback(finished)
        latencies = await Deferred.fromCoroutine(probe(lambda: not done, 5))
        results = await everything
        failed = sum(1 for ok, _ in results if not ok)
        return latencies, time.monotonic() - started, failed

    baseline = await probe(lambda: False, 20)
    rss_before = rss_mb(pid)
    during, seconds, failed = await flood()
    rss_after = rss_mb(pid)
    during2, seconds2, failed2 = await flood()
    rss_after2 = rss_mb(pid)
    for client in (flooder, peer, sender, receiver):
        client.close()
    return {
        "reads": reads,
        "flood_seconds": round(seconds, 2),
        "flood_seconds_2": round(seconds2, 2),
        "reads_failed": failed + failed2,
        "probe_send_idle": _ms(baseline),
        "probe_send_during_flood": _ms(during),
        "probe_send_during_flood_2": _ms(during2),
        "rss_mb": {
            "before": round(rss_before, 1),
            "after_flood": round(rss_after, 1),
            "after_second_flood": round(rss_after2, 1),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=20_000)
    ap.add_argument("--stack", choices=("embedded", "mysql-redis"), default="embedded")
    args = ap.parse_args()
    from tests.harness import ServerProcess, fresh_prefix, shared_mariadb, shared_redis

    sections: dict[str, dict[str, Any]] = {}
    if args.stack == "mysql-redis":
        sections["storage"] = {
            "sql": shared_mariadb().fresh_database(),
            "redis": shared_redis().url,
            "key_prefix": fresh_prefix(),
        }
    server = ServerProcess(sections).start()
    assert server.proc is not None
    try:

        async def run(reactor: Any) -> None:
            result = await measure(
                reactor, server.endpoint, server.token, server.proc.pid, reads=args.reads
            )
            print(json.dumps({"stack": args.stack, **result}, indent=2))

        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
