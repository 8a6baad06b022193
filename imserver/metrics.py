"""
Prometheus metrics (GET /metrics).

Counters live where the work happens, as plain integers on the components
(the gateway, the chat service, the store, the batchers, the notifier): no
cost per event beyond an increment. L{ServerCollector} reads them when
Prometheus scrapes. Latencies and batch sizes are histograms, observed as
they happen through L{Metrics.observe} and L{Metrics.batch}.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from imserver.server import IMServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


class Buckets:
    """
    A histogram for one thread (the reactor's): observing is a C{bisect}
    and two additions, no lock (prometheus_client's Histogram takes a lock
    per observation, which shows up on the per-message path).
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


class Histograms(Collector):
    """Named families of L{Buckets}, one per label values."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], bounds: tuple[float, ...]):
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, bounds
        self._children: dict[tuple[str, ...], Buckets] = {}

    def child(self, *values: str) -> Buckets:
        return self._children.setdefault(values, Buckets(self.bounds))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        for values, buckets in sorted(self._children.items()):
            family.add_metric(list(values), buckets.cumulative(), buckets.total)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._latency = {
            name: self._histograms(f"imserver_{name}_seconds", doc, (), LATENCY_BUCKETS).child()
            for name, doc in (
                ("send_to_commit", "From a send request to its durable commit."),
                ("send_to_push", "From a send request to the push to its recipient."),
            )
        }
        self._sql = self._histograms(
            "imserver_sql_seconds",
            "SQL transactions by stage: waiting for a pool thread, running in it, "
            "waiting for the reactor to take the result.",
            ("pool", "stage"),
            LATENCY_BUCKETS,
        )
        self._batches = self._histograms(
            "imserver_batch_size",
            "Items per batch (SQL group commits, acks, logins, fan-outs, outbox deletes).",
            ("queue",),
            BATCH_BUCKETS,
        )

    def _histograms(
        self, name: str, doc: str, labels: tuple[str, ...], bounds: tuple[float, ...]
    ) -> Histograms:
        histograms = Histograms(name, doc, labels, bounds)
        self.registry.register(histograms)
        return histograms

    def observe(self, name: str, seconds: float) -> None:
        buckets = self._latency.get(name)
        if buckets is not None:
            buckets.observe(seconds)

    def sql(self, pool: str) -> Any:
        """A L{imserver.storage.sql.database.Database} C{observe} hook."""
        stages = {
            stage: self._sql.child(pool, stage).observe for stage in ("wait", "run", "return")
        }
        return lambda stage, seconds: stages[stage](seconds)

    def batch(self, queue: str) -> Any:
        """An C{on_batch} callback for a L{imserver.batching.Batcher}."""
        return self._batches.child(queue).observe

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data


def _counter(name: str, doc: str, value: float, **labels: str) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class DeviceCollector(Collector):
    """The device service's counters (L{imserver.chat.devices.DeviceService})."""

    def __init__(self, devices: Any) -> None:
        self.devices = devices

    def collect(self) -> Iterator[Metric]:
        d = self.devices
        yield _counter("imserver_catchup_pages", "Catch-up pages answered.", d.catchups)
        yield _counter(
            "imserver_catchup_events", "Stream events sent in catch-up pages.", d.caught_up_events
        )
        yield _counter(
            "imserver_auth_revoked",
            "Logins refused: a token older than its device's revocation.",
            d.refused_revoked,
        )


class BlockCollector(Collector):
    """The block cache's counters (L{imserver.chat.blocks.BlockService})."""

    def __init__(self, blocks: Any) -> None:
        self.blocks = blocks

    def collect(self) -> Iterator[Metric]:
        b = self.blocks
        yield GaugeMetricFamily(
            "imserver_block_cache_users", "Users whose blocks this node holds.", b.cached_users
        )
        yield _counter("imserver_block_loads", "Block loads from SQL: misses, refreshes.", b.loaded)
        yield _counter(
            "imserver_sends_blocked", "Sends refused (forbidden): the pair is blocked.", b.refused
        )


class PresenceCollector(Collector):
    """
    Presence and typing counters (L{imserver.chat.presence.PresenceService};
    with a cluster, L{imserver.services.cluster.ClusterPresence}'s too).
    """

    def __init__(self, service: Any, cluster: Any = None) -> None:
        self.service = service
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        p = self.service
        yield _counter("imserver_presence_pushes", "Presence pushes to watchers.", p.pushes)
        yield _counter(
            "imserver_presence_coalesced",
            "Presence changes held back by the coalescing window.",
            p.coalesced,
        )
        yield _counter("imserver_typing_pushes", "Typing indications pushed.", p.typing_pushes)
        yield _counter(
            "imserver_presence_verified",
            "Watched users' state asked again after transitions disagreed.",
            p.verified,
        )
        yield GaugeMetricFamily(
            "imserver_presence_watched_users", "Users watched from this node.", p.watched_users()
        )
        yield GaugeMetricFamily(
            "imserver_presence_watch_entries",
            "(connection, watched user) pairs on this node.",
            p.watch_entries(),
        )
        if self.cluster is not None:
            yield _counter(
                "imserver_presence_transitions",
                "User-level presence transitions seen here (each broadcast once).",
                self.cluster.transitions,
            )
            yield _counter(
                "imserver_presence_device_calls",
                "Redis calls asking users' online devices (many users per call).",
                self.cluster.devices_calls,
            )


class ServerCollector(Collector):
    """Reads the counters of one node's components at scrape time."""

    def __init__(self, server: IMServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        gateway, chat, store = s.gateway, s.chat, s.store

        yield GaugeMetricFamily(
            "imserver_connections", "Open client connections.", len(gateway.connections)
        )
        yield GaugeMetricFamily(
            "imserver_online_users", "Users logged in on this node.", len(s.registry)
        )
        auths = CounterMetricFamily(
            "imserver_auths", "Authentications by result.", labels=["result"]
        )
        for result, n in gateway.auths.items():
            auths.add_metric([result], n)
        yield auths
        errors = CounterMetricFamily("imserver_errors", "Error replies by code.", labels=["code"])
        for code, n in sorted(gateway.errors.items()):
            errors.add_metric([str(code)], n)
        yield errors
        yield _counter(
            "imserver_connections_dropped_slow",
            "Connections dropped for not reading (backpressure).",
            gateway.overflowed,
        )
        oversized = CounterMetricFamily(
            "imserver_frames_oversized",
            "Frames over max_frame_bytes not written: replies (answered internal instead)"
            " and pushes (dropped).",
            labels=["kind"],
        )
        for kind, n in gateway.oversized.items():
            oversized.add_metric([kind], n)
        yield oversized
        yield _counter(
            "imserver_connections_closed_idle",
            "Connections closed for silence.",
            gateway.idle_closed,
        )
        yield GaugeMetricFamily(
            "imserver_connections_unauthenticated",
            "Open client connections that have not authenticated yet.",
            gateway.unauthenticated,
        )
        refused = CounterMetricFamily(
            "imserver_connections_refused",
            "Connections refused at accept, by cap: unauthenticated total or per_address,"
            " or descriptors (the process's descriptor budget).",
            labels=["cap"],
        )
        for cap, n in gateway.refused.items():
            refused.add_metric([cap], n)
        yield refused
        yield _counter(
            "imserver_connections_throttled",
            "Times a connection stopped being read: requests in flight at the cap, or auth.",
            gateway.throttled,
        )
        yield _counter(
            "imserver_connections_dropped_inbox",
            "Connections dropped for sending on while they were not being read.",
            gateway.inbox_overflowed,
        )
        yield GaugeMetricFamily(
            "imserver_requests_fair_queue",
            "Requests waiting in the fair queue in front of the business layer.",
            gateway.scheduler.depth,
        )

        messages = CounterMetricFamily("imserver_messages", "Messages by stage.", labels=["stage"])
        for stage, n in (
            ("sent", chat.sent),
            ("duplicate", chat.duplicates),
            ("delivered", chat.pushed),
            ("acked", chat.acked),
        ):
            messages.add_metric([stage], n)
        yield messages

        depth = GaugeMetricFamily("imserver_queue_depth", "Items waiting.", labels=["queue"])
        for name, n in (
            ("realtime", chat.fanouts.depth),
            ("commit", store.sends.depth),
            ("ack", store.acks.depth),
            ("login", store.logins.depth),
            ("outbox", store.outbox_backlog),
            ("retry", store.retries.depth),
        ):
            depth.add_metric([name], n)
        yield depth

        notifier = s.notifier
        retries = CounterMetricFamily("imserver_retries", "Retried steps.", labels=["queue"])
        retries.add_metric(["repair"], store.retries.retries)
        retries.add_metric(["notify"], notifier.retries if notifier else 0)
        yield retries
        dead = CounterMetricFamily("imserver_dead_letters", "Work given up on.", labels=["queue"])
        dead.add_metric(["repair"], store.retries.dead_letters)
        dead.add_metric(["notify"], notifier.dead if notifier else 0)
        yield dead
        if notifier is not None:
            notes = CounterMetricFamily(
                "imserver_notifications", "Offline notifications by result.", labels=["result"]
            )
            for result, n in (
                ("sent", notifier.sent),
                ("skipped", notifier.skipped),
                ("failed", notifier.failures),
            ):
                notes.add_metric([result], n)
            yield notes

        yield _counter("imserver_outbox_replayed", "Outbox rows replayed.", chat.replayed)
        edits = chat.edits
        yield _counter("imserver_edits", "Edits that changed a message's body.", edits.edited)
        yield _counter("imserver_hides", "Hides and clears that hid something.", edits.hidden)
        yield _counter(
            "imserver_hides_checked",
            "SQL checks of whether a user hides messages (node cache misses).",
            store.edits.hides_checked,
        )
        yield _counter(
            "imserver_hot_fallbacks",
            "Reads answered from SQL instead of the hot store.",
            store.hot_fallbacks,
        )
        yield _counter("imserver_hot_loads", "Users' hot copies (re)loaded from SQL.", store.loads)
        yield GaugeMetricFamily(
            "imserver_hot_suspect_users",
            "Users served from SQL until their hot copy is repaired.",
            len(store.suspect_users),
        )
        yield GaugeMetricFamily(
            "imserver_hot_parked_repairs",
            "Users and sessions whose repair exhausted its retries (retried every 30 s).",
            store.parked_repairs,
        )
        sql = CounterMetricFamily(
            "imserver_sql_transactions", "SQL transactions.", labels=["pool", "result"]
        )
        for db in (s.db, s.background):
            sql.add_metric([db.name, "ok"], db.transactions)
            sql.add_metric([db.name, "failed"], db.failures)
        yield sql
        lost = CounterMetricFamily(
            "imserver_sql_lost_commits",
            "Connections lost during a COMMIT, by what the commit token said.",
            labels=["pool", "outcome"],
        )
        for db in (s.db, s.background):
            for outcome, n in db.lost_commits.items():
                lost.add_metric([db.name, outcome], n)
        yield lost
        failures = getattr(store.hot, "failures", 0)
        yield _counter("imserver_redis_failures", "Failed Redis calls.", failures)
        redis = s.redis
        if redis is not None:
            yield GaugeMetricFamily(
                "imserver_redis_circuit_open",
                "1 while Redis calls fail fast (circuit open or half-open).",
                0 if redis.breaker.state == "closed" else 1,
            )
            yield _counter(
                "imserver_redis_circuit_opened",
                "Times Redis was found unreachable.",
                redis.breaker.opened,
            )
            yield _counter(
                "imserver_redis_rejected",
                "Redis calls failed fast (circuit open, or too many in flight).",
                redis.breaker.rejected + redis.too_busy,
            )
            yield GaugeMetricFamily(
                "imserver_redis_in_flight", "Redis calls in flight.", redis.in_flight
            )
        cluster = s.cluster
        if cluster is not None:
            yield GaugeMetricFamily(
                "imserver_pubsub_subscribed",
                "1 while this node listens on its pub/sub channel.",
                1 if cluster.pubsub_state() == "ok" else 0,
            )
            routed = CounterMetricFamily(
                "imserver_cluster_pushes", "Pushes between nodes.", labels=["way"]
            )
            routed.add_metric(["sent"], cluster.routed)
            routed.add_metric(["received"], cluster.received)
            routed.add_metric(["lost"], cluster.route_failures)
            yield routed
            yield _counter(
                "imserver_cluster_kicks",
                "Connections kicked by a login on another node.",
                cluster.kicked_remotely,
            )
            yield _counter(
                "imserver_cluster_kicks_unconfirmed",
                "Kicks and join notices a login waited for in vain (2 s: their node down).",
                cluster.kicks_unconfirmed,
            )
            yield _counter(
                "imserver_pubsub_self_check_failures",
                "Times this node found it did not hear its own channel (subscriber re-created).",
                cluster.pubsub_failures,
            )
            yield _counter(
                "imserver_cluster_data_losses",
                "Times Redis was found to have lost its data (presences restored).",
                cluster.data_losses,
            )
            yield _counter(
                "imserver_cluster_sync_pushes",
                "Sync pushes to users who may have missed pushes.",
                cluster.sync_pushes,
            )
            yield _counter(
                "imserver_cluster_profiles",
                "Changed profiles received from the cluster (this node's included).",
                cluster.profiles_received,
            )
        http = CounterMetricFamily(
            "imserver_http_requests", "HTTP API requests by status.", labels=["code"]
        )
        for status, n in sorted(s.site.answered.items()):
            http.add_metric([str(status)], n)
        yield http
        yield _counter(
            "imserver_http_bodies_refused", "HTTP bodies over the size limit.", s.site.refused
        )
