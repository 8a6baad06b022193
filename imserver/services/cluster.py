"""
Presence and push routing across nodes, with Redis as the bus.

L{ClusterPresence} wraps this node's local registry (L{LocalRegistry}):

* Presence: C{{p}:devices:{uid}} (a hash, see L{imserver.storage.hot.bus})
  holds each connected device's connection (C{node:incarnation:epoch}),
  since and last activity. A login's script decides across nodes: the
  older connection of the same device is kicked (C{replaced}), and beyond
  C{max_online} the least recently active other device
  (C{too_many_devices}). A kick on another node is published to it with a
  nonce; it kicks and confirms back, and the login fires (and its
  connection is registered here) once every kick is confirmed, or after
  L{KICK_CONFIRM_SECONDS}. Logouts remove a device only if it is still that
  connection's. The logins, and the logouts, of one reactor turn share one
  script call (a reconnect storm is thousands at once). This node
  refreshes its devices every third of their TTL
  (C{[server].presence_ttl_seconds}, default 30), writing their last
  activity: a node that dies leaves no presence behind the TTL, and the
  refresh restores presences lost by a Redis restart.
* Routing: for each local user the node knows the OTHER nodes holding the
  user's devices (from the login script's answer, from the join/leave
  notices the scripts publish, re-read at every refresh; a node found
  late is sent a C{sync} for the user). A push for a user whose devices
  are all here costs no Redis call; otherwise it goes through Redis
  pub/sub to those nodes (one channel per node, binary msgpack), gathered
  for one reactor turn into one script call, with the excluded
  connection's id. If the user left or a node died meanwhile the push is
  simply lost: the message stays pending and is synced on reconnect.
* Profiles: a node that changes a profile publishes it on the channel every
  node hears, so their in-process profile caches never show an old one.
* User-level transitions (L{ClusterPresence.on_change}): a login whose
  script saw no other node holding the user and kicked nobody is the user's
  first device anywhere (online); a logout whose script left the user
  without devices is the last (offline). The node that sees it tells its
  listeners and broadcasts it once (C{presence}: [uid, online, ms]) to the
  others, whose listeners hear it: one broadcast per transition, whatever
  the number of watchers. Scripts run one at a time, so two nodes never
  both see the first (or the last) device. Transitions seen while Redis is
  down are told once it answers (the refresh checks each: L{_announce}).
  A node that dies sends no offline: its users' presence expires by TTL
  without a transition.
* Recovery: when Redis loses its data (FLUSHALL, a restart without
  persistence) the bus's generation changes; every node notices within a
  second (at once if it routes a push or hears another node tell it), and
  restores its presences at once. Pushes lost meanwhile cannot be found
  again, so every user connected to the node is told C{{"t": "sync"}}; the
  same after a resubscription (pushes published while the node was not
  subscribed are gone) and, for the recipients of pushes that could not be
  routed, when Redis answers again after an outage.

If Redis is down, logins are checked against this node's devices only (its
registry's max_online), and local pushes work; cross-node pushes and kicks
wait for it. As soon as it answers again (the recovery, or the next
refresh) the logins checked here only are replayed through the login
script, so the newest connection of a device wins wherever it is (an older
one elsewhere is kicked, with confirmation; one older than the device's
connection elsewhere is kicked here); then presences are restored, and a
device another connection took meanwhile is kicked.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import msgpack
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imserver.batching import Batcher, QueueFull
from imserver.errors import Unavailable
from imserver.periodic import Periodic
from imserver.services.presence import (
    KICK_LOGIN_ELSEWHERE,
    KICK_REPLACED,
    ChangeListener,
    GoneListener,
    IClientLink,
    IPresence,
    OnlineDevice,
)
from imserver.services.registry import LocalRegistry
from imserver.storage.hot.interface import (
    HotUnavailable,
    IClusterBus,
    ISubscription,
    LoginAnswer,
    LoginEntry,
)
from imserver.storage.model import Profile

__all__ = ["KICK_CONFIRM_SECONDS", "KICK_LOGIN_ELSEWHERE", "SYNC_PUSH", "ClusterPresence"]

PRESENCE_TTL_MS = 30_000
REFRESH_CHUNK = 1000
#: How often the bus's generation is checked (a FLUSHALL disconnects nobody).
GENERATION_SECONDS = 1.0
#: The pub/sub self-check (see L{ClusterPresence._check_pubsub}): a node
#: whose probes have not come back for this long re-creates its subscriber
#: connection...
PUBSUB_ECHO_SECONDS = 3
#: ...and as many heartbeats in a row answered (each proving a probe was
#: published to a subscriber) without one of them coming back: a node whose
#: reactor is seconds late (a starved machine) reads its echoes late too, and
#: must not take that for a dead subscription (re-subscribing tells every
#: local user to sync, which starves it further).
PUBSUB_ECHO_PROBES = 3
#: ...and one that is not subscribed again this long after losing its
#: subscription, while Redis answers.
PUBSUB_STUCK_SECONDS = 5
#: Recipients of unroutable pushes remembered for a sync push; beyond it
#: every local user is told to sync.
MAX_UNROUTED = 100_000
#: How long a login waits for another node to confirm the kick of an older
#: connection (that node may be dead: its presences then expire by TTL).
KICK_CONFIRM_SECONDS = 2.0
#: Users one presence_devices script call asks about at most.
MAX_DEVICES_ASKED = 500
#: How often the activity of devices of users with several devices is written.
ACTIVITY_SECONDS = 1.0
#: Join and leave notices remembered for users whose login is pending here.
MAX_EARLY_NOTICES = 10_000
#: A pending login's state once its connection went away before it was
#: registered (else None: waiting, or the reason it was kicked meanwhile).
_GONE = ""
#: The broadcast kind of user-level presence transitions: [uid, online, at ms].
PRESENCE_KIND = "presence"
#: Pushed to a connected user who may have missed pushes: sync now.
SYNC_PUSH: Mapping[str, Any] = {"t": "sync"}


@implementer(IPresence)
class ClusterPresence:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        local: LocalRegistry,
        bus: IClusterBus,
        node_id: int,
        ttl_seconds: float = PRESENCE_TTL_MS / 1000,
        max_online: int = 5,
    ) -> None:
        self.ttl_ms = int(ttl_seconds * 1000)
        self.max_online = max_online
        self._reactor = reactor
        self.registry = local
        self._redis = bus
        self.node = str(node_id)
        #: online_devices asked while a call is in flight: the next call asks them all.
        self._devices_wanted: list[tuple[int, Deferred[list[OnlineDevice]]]] = []
        self._devices_asking = False
        #: Script calls made by online_devices (metrics, tests).
        self.devices_calls = 0
        local.node = self.node
        # Distinguishes this run of the node from earlier ones, so that a
        # stale kick never hits a new connection with a recycled epoch.
        self.incarnation = str(int(reactor.seconds() * 1000))
        #: uid -> the other nodes holding the user's devices, for each user
        #: with a connection here (an empty set: pushes need no Redis).
        self._others: dict[int, set[str]] = {}
        #: Join and leave notices, (kind, node) in the order heard, for
        #: users not known here yet whose login is pending: applied when it
        #: registers, forgotten when the user's last pending login ends
        #: without registering (or by the refresh, if left over; at most
        #: L{MAX_EARLY_NOTICES} in all).
        self._early_notices: dict[int, list[tuple[str, str]]] = {}
        self._early_count = 0
        #: When each local user last had a join or leave notice (a count),
        #: so a refresh answer older than the notice does not undo it.
        self._notices = 0
        self._noticed: dict[int, int] = {}
        #: Logins waiting for their script or kick confirmations, by conn
        #: (see L{_GONE}).
        self._pending: dict[str, str | None] = {}
        #: How many logins are pending per user.
        self._pending_users: dict[int, int] = {}
        #: Registered connections whose login was checked on this node only
        #: (Redis down), by conn: replayed by the next refresh (never
        #: refreshed before: that would kick them), and those being replayed.
        self._unchecked: dict[str, tuple[int, IClientLink]] = {}
        self._replaying: set[str] = set()
        #: Kick confirmations awaited, by nonce.
        self._confirms: dict[str, Deferred[None]] = {}
        #: Login calls in flight (by nonce), and confirmations that came
        #: back before their call's answer.
        self._calls: set[str] = set()
        self._early: set[str] = set()
        self._outgoing: list[tuple[int, bytes, str]] = []
        self._flush_call: IDelayedCall | None = None
        # Presence writes of one reactor turn share one script call: a
        # reconnect storm is thousands of logins (and logouts) at once.
        self._logins: Batcher[LoginEntry, tuple[LoginAnswer, list[Deferred[None]], int] | None] = (
            Batcher("presence logins", self._login_batch, max_batch=REFRESH_CHUNK, gather=reactor)
        )
        #: Each logout's answer: Redis's clock if it was the user's last device anywhere, else 0.
        self._logouts: Batcher[tuple[int, str, str], int] = Batcher(
            "presence logouts", self._logout_batch, max_batch=REFRESH_CHUNK, gather=reactor
        )
        self._refresh = Periodic(reactor, self.ttl_ms / 3000, self.refresh, "presence refresh")
        # The last activity of devices of users with several devices, written
        # every second (the refresh writes everyone's every ttl/3 only): the
        # too_many victim is chosen on any node by what Redis holds.
        self._activity = Periodic(reactor, ACTIVITY_SECONDS, self.write_activity, "device activity")
        self._activity_sent: dict[str, float] = {}
        self._generation_check = Periodic(
            reactor, GENERATION_SECONDS, self._check_generation, "generation check"
        )
        #: The bus's generation last seen (None: not known yet).
        self.generation: str | None = None
        self._unrouted: set[int] = set()
        self._unrouted_overflow = False
        self._everyone_pending = False
        self._recovering = False
        self._recover_again: str | None = None
        # Set by stop: a heartbeat in flight, Redis answering again or a
        # resubscription must not start work (a subscriber nobody stops).
        self._stopped = False
        self.subscription: ISubscription | None = None
        # The self-check's probes carry this, so that only ours count.
        self._probe_id = secrets.token_hex(8)
        self._probes = 0
        self._echo_at = 0.0
        #: Heartbeats answered since our last probe came back.
        self._unechoed = 0
        self._subscribed_at = 0.0
        self._unsubscribed_since: float | None = None
        # Read by metrics.
        self.routed = 0
        self.received = 0
        self.kicked_remotely = 0
        self.route_failures = 0
        self.profiles_received = 0
        self.data_losses = 0
        self.sync_pushes = 0
        #: Kicks whose confirmation did not come in time.
        self.kicks_unconfirmed = 0
        #: Self-checks that found the subscription useless (re-created).
        self.pubsub_failures = 0
        #: Called with each profile changed on a node (this one included).
        self.on_profile: Callable[[Profile], None] | None = None
        self._on_broadcast: dict[str, list[Callable[[Any], None]]] = {}
        self.broadcasts_received = 0
        #: User-level presence transitions: see L{on_change}.
        self._changes: list[ChangeListener] = []
        self.on_broadcast(PRESENCE_KIND, self._presence_heard)
        self._transitions: list[list[Any]] = []
        self._transitions_call: IDelayedCall | None = None
        #: Transitions that happened here while Redis was down: uid -> (online, ms).
        self._unannounced: dict[int, tuple[bool, int]] = {}
        self.transitions = 0

    def value(self, link: IClientLink) -> str:
        """The connection's id in the cluster (conn): node:incarnation:epoch."""
        return f"{self.node}:{self.incarnation}:{link.epoch}"

    def _entry(self, uid: int, link: IClientLink) -> LoginEntry:
        # The uid given, not link.uid: the gateway sets that once logged in.
        idle_ms = max(0, int((self._reactor.seconds() - link.last_active) * 1000))
        return (uid, link.device, self.value(link), int(link.connected_at), idle_ms)

    def start(self) -> None:
        self.subscription = self._redis.subscribe(self.node, self._on_message, self._subscribed)
        self._redis.when_back(lambda: self._recover("redis answers again"))
        self._refresh.start()
        self._activity.start()
        self._generation_check.start(now=True)

    async def stop(self) -> None:
        self._stopped = True
        # The ticks in flight finish before the subscription stops.
        await self._refresh.stop()
        await self._activity.stop()
        await self._generation_check.stop()
        # Logouts of the last turn (clients leaving at shutdown).
        await self._logouts.idle()
        if self.subscription is not None:
            await self.subscription.stop()

    # -- IPresence ---------------------------------------------------------------

    def login(self, uid: int, link: IClientLink) -> Deferred[None]:
        async def login() -> None:
            if not isinstance(link.device, str):
                # One bad entry would fail the script call of every login of the turn.
                raise TypeError(f"a connection's device must be a str, not {link.device!r}")
            conn = self.value(link)
            self._pending[conn] = None
            self._pending_users[uid] = self._pending_users.get(uid, 0) + 1
            try:
                try:
                    outcome = await self._logins.submit(self._entry(uid, link))
                except QueueFull:
                    self.log.warn("presence of {uid} not written: too many logins", uid=uid)
                    outcome = None
                stamp = 0
                if outcome is not None:
                    (kicks, others, _), confirmations, stamp = outcome
                    for device, kicked, reason, nonce in kicks:
                        if not nonce:
                            self._kick_here(uid, device, kicked, reason)
                    if confirmations:
                        await gatherResults(confirmations)
            finally:
                state = self._pending.pop(conn, _GONE)
                left = self._pending_users.pop(uid, 1) - 1
                if left:
                    self._pending_users[uid] = left
            if state is not None:
                if not left:
                    self._drop_early(uid)
                # Gone, or kicked by a later login, before it was registered.
                self._forget(uid, link.device, conn)
                if state != _GONE:
                    link.kick(state)
                return
            # Checked across nodes, or (Redis down) against this node only: replayed
            # through the login script once Redis answers (see _replay).
            limit = None if outcome is not None else self.max_online
            had = self.registry.has(uid)
            for old in self.registry.register(uid, link, limit):
                self._forget(uid, old.device, self.value(old))
            if outcome is None:
                self._unchecked[conn] = (uid, link)
            known = self._others.setdefault(uid, set())
            if outcome is not None:
                known.update(others)
            # Notices heard while this login was pending, after (or before)
            # its script read the user's nodes: in order.
            for kind, node in self._drop_early(uid):
                if kind == "j":
                    known.add(node)
                else:
                    known.discard(node)
            if outcome is None and not had:
                # Redis is down: whether it is the user's first device anywhere
                # is told once it answers (see _announce); this node's own
                # listeners know it is online now (not broadcast: no Redis).
                now = int(self._reactor.seconds() * 1000)
                self._unannounced_change(uid, True, now)
                self._tell(uid, True, now, False)
            if outcome is not None and not had and not outcome[0][0] and not outcome[0][1]:
                # The login script saw no other node holding the user and
                # kicked nobody (a device replaced elsewhere was online): its
                # first device anywhere (scripts run one at a time), stamped
                # with Redis's clock when the script ran: every node's
                # transitions are ordered by the one clock (as the scripts ran).
                self._transition(uid, True, stamp or int(self._reactor.seconds() * 1000))

        return Deferred.fromCoroutine(login())

    def _drop_early(self, uid: int) -> list[tuple[str, str]]:
        """Forget (and return) the early notices of C{uid}."""
        notices = self._early_notices.pop(uid, [])
        self._early_count -= len(notices)
        return notices

    async def _login_batch(
        self, entries: Sequence[LoginEntry], replay: bool = False
    ) -> list[tuple[LoginAnswer, list[Deferred[None]], int] | None]:
        nonce = secrets.token_hex(8)
        self._calls.add(nonce)
        try:
            got = await self._redis.presence_login(
                self.node, nonce, entries, self.ttl_ms, self.max_online, replay
            )
            answers, generation = got[0], got[1]
            # Redis's clock when the script ran (0: a bus that does not say).
            stamp = int(got[2]) if len(got) > 2 else 0
        except HotUnavailable as e:
            # Checked here only; replayed by the refresh once Redis answers.
            if self._redis.state() == "ok":
                self.log.warn(
                    "presence of {n} logins not written: {error}", n=len(entries), error=e
                )
            return [None] * len(entries)
        finally:
            self._calls.discard(nonce)
        self._saw(generation)
        out: list[tuple[LoginAnswer, list[Deferred[None]], int] | None] = []
        for answer in answers:
            kicks, _, joins = answer
            waits = [self._confirmation(k[3]) for k in kicks if k[3]]
            # The login completes once the user's other nodes route to this
            # one: a push they make after that reaches the new device, and an
            # event they pushed before is committed before its catch-up reads.
            waits += [self._confirmation(tag) for tag in joins]
            out.append((answer, waits, stamp))
        self._early = {n for n in self._early if not n.startswith(nonce + ":")}
        return out

    def _confirmation(self, nonce: str) -> Deferred[None]:
        """Fires when the kick of C{nonce} is confirmed, or after the timeout."""
        d: Deferred[None] = Deferred()
        if nonce in self._early:
            self._early.discard(nonce)
            d.callback(None)
            return d
        self._confirms[nonce] = d
        d.addTimeout(KICK_CONFIRM_SECONDS, self._reactor, onTimeoutCancel=self._unconfirmed)
        d.addBoth(self._confirmed, nonce)
        return d

    def _unconfirmed(self, result: object, timeout: float) -> None:
        self.kicks_unconfirmed += 1
        self.log.warn(
            "a kick was not confirmed within {timeout}s (its node may be down): going on",
            timeout=timeout,
        )

    def _confirmed(self, result: object, nonce: str) -> object:
        self._confirms.pop(nonce, None)
        return result

    def _kick_here(self, uid: int, device: str, conn: str, reason: str) -> bool:
        """Kick this node's connection C{conn} of the device (or its pending login)."""
        link = self.registry.device_link(uid, device)
        if link is not None and self.value(link) == conn:
            self.logout(uid, link)
            link.kick(reason)
            return True
        if conn in self._pending and self._pending[conn] is None:
            self._pending[conn] = reason
            return True
        return False

    def logout(self, uid: int, link: IClientLink) -> None:
        conn = self.value(link)
        if conn in self._pending:
            self._pending[conn] = _GONE
            return
        if not self.registry.remove(uid, link):
            return
        last = not self.registry.has(uid)
        if last:
            self._others.pop(uid, None)
            self._noticed.pop(uid, None)
        d = self._forget(uid, link.device, conn)
        if last and d is not None:
            d.addCallback(self._maybe_offline, uid)
            d.addErrback(lambda f: self.log.failure("presence transition failed", f))

    def _maybe_offline(self, stamp: int, uid: int) -> None:
        """
        The logout script found the user without devices on any node (at
        C{stamp}, Redis's clock): the last one left. Unless the user came
        back here meanwhile.
        """
        if stamp and not self.registry.has(uid) and uid not in self._pending_users:
            self._transition(uid, False, stamp)

    def _transition(self, uid: int, online: bool, at: int) -> None:
        """
        Seen here: told to this node's listeners and, once, to every other
        node (the transitions of one reactor turn share one message: a
        reconnect storm is thousands).
        """
        self.transitions += 1
        self._transitions.append([uid, online, at])
        if self._transitions_call is None:
            self._transitions_call = self._reactor.callLater(0, self._send_transitions)
        self._tell(uid, online, at, True)

    def _send_transitions(self) -> None:
        self._transitions_call = None
        sender = f"{self.node}:{self.incarnation}"
        changes, self._transitions = self._transitions, []
        message = msgpack.packb(
            [
                ["x", PRESENCE_KIND, msgpack.packb([sender, change], use_bin_type=True)]
                for change in changes
            ],
            use_bin_type=True,
        )
        d = Deferred.fromCoroutine(self._redis.broadcast(message))
        d.addErrback(self._not_broadcast, PRESENCE_KIND)

    def _unannounced_change(self, uid: int, online: bool, at: int) -> None:
        if len(self._unannounced) < MAX_UNROUTED or uid in self._unannounced:
            self._unannounced[uid] = (online, at)

    async def _announce(self) -> None:
        """
        After an outage, the transitions that may have happened here while
        Redis was down: a user who connected here only is online, one who
        left here and has no device anywhere is offline. (A redundant one is
        harmless: listeners keep the newest state.)
        """
        pending, self._unannounced = self._unannounced, {}
        for uid, (online, at) in pending.items():
            try:
                rows = await self._redis.presence_devices(uid)
            except HotUnavailable:
                for left, change in pending.items():
                    self._unannounced.setdefault(left, change)
                return
            nodes = {conn.split(":", 1)[0] for _, conn, _ in rows}
            here = self.registry.has(uid)
            if online and here and nodes <= {self.node}:
                self._transition(uid, True, at)
            elif not online and not here and not nodes and uid not in self._pending_users:
                self._transition(uid, False, at)
            elif not online and nodes:
                # Told offline here during the outage, but online elsewhere.
                self._tell(uid, True, int(self._reactor.seconds() * 1000), False)

    def _presence_heard(self, data: Any) -> None:
        uid, online, at = data
        self._tell(int(uid), bool(online), int(at), False)

    def _tell(self, uid: int, online: bool, at: int, here: bool) -> None:
        for listener in self._changes:
            try:
                listener(uid, online, at, here)
            except Exception:
                self.log.failure("a presence listener failed for uid {uid}", uid=uid)

    def on_change(self, listener: ChangeListener) -> None:
        self._changes.append(listener)

    def on_link_gone(self, listener: GoneListener) -> None:
        self.registry.on_link_gone(listener)

    def _forget(self, uid: int, device: str, conn: str) -> Deferred[int] | None:
        """
        Remove the device's presence if still C{conn}'s (one batch per
        turn): fires once done, with whether the user then has no device on
        any node (None if not queued: the TTL removes it).
        """
        self._unchecked.pop(conn, None)
        try:
            # Never fails: _logout_batch handles its errors.
            return self._logouts.submit((uid, device, conn))
        except QueueFull:
            return None

    async def _logout_batch(self, entries: Sequence[tuple[int, str, str]]) -> list[int]:
        stamp = 0
        try:
            got = await self._redis.presence_logout(self.node, entries)
            if isinstance(got, tuple):
                nobody, stamp = set(got[0]), int(got[1])
            else:  # a bus that answers the uids only
                nobody = set(got or ())
        except HotUnavailable:
            nobody = set()  # the TTL removes them anyway
            # Whether these were the users' last devices anywhere is told once
            # Redis answers (see _announce).
            # Meanwhile this node's own listeners are told it left (its last
            # device here; other nodes cannot be asked): corrected by
            # _announce if it turns out online elsewhere.
            now = int(self._reactor.seconds() * 1000)
            for uid in {entry[0] for entry in entries}:
                if not self.registry.has(uid):
                    self._unannounced_change(uid, False, now)
                    self._tell(uid, False, now, False)
        except Exception:
            self.log.failure("forgetting {n} presences failed", Failure(), n=len(entries))
            nobody = set()
        at = stamp or int(self._reactor.seconds() * 1000)
        return [at if uid in nobody else 0 for uid, _, _ in entries]

    def local(self, uid: int) -> list[IClientLink]:
        return self.registry.local(uid)

    def push(self, uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None) -> bool:
        took = self.registry.push_local(uid, frame, exclude)
        others = self._others.get(uid)
        if others is None or others:
            self._queue(uid, frame, exclude)
        return took

    def push_local(
        self, uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None
    ) -> bool:
        return self.registry.push_local(uid, frame, exclude)

    def push_remote(
        self, uid: int, frame: Mapping[str, Any], exclude: IClientLink | None = None
    ) -> None:
        others = self._others.get(uid)
        if others is None or others:
            self._queue(uid, frame, exclude)

    def _queue(self, uid: int, frame: Mapping[str, Any], exclude: IClientLink | None) -> None:
        packed = msgpack.packb(frame, use_bin_type=True)
        self._outgoing.append((uid, packed, "" if exclude is None else self.value(exclude)))
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def kick_device(self, uid: int, device: str, reason: str) -> Deferred[bool]:
        async def kick() -> bool:
            nonce = secrets.token_hex(8)
            # Before the call: the confirmation may come before its answer.
            confirmed = self._confirmation(nonce)
            try:
                conn = await self._redis.presence_kick(uid, device, reason, self.node, nonce)
            except HotUnavailable:
                conn = None  # this node's connection, if any, is kicked
            if conn is None or conn.split(":", 1)[0] == self.node:
                confirmed.addErrback(lambda f: f.trap(CancelledError))
                confirmed.cancel()
                link = self.registry.device_link(uid, device)
                if conn is None and link is not None:
                    conn = self.value(link)
                return conn is not None and self._kick_here(uid, device, conn, reason)
            await confirmed
            return True

        return Deferred.fromCoroutine(kick())

    def online_devices(self, uid: int) -> Deferred[list[OnlineDevice]]:
        """
        Asked while a call for others is in flight, the users wait for it to
        answer and then share one script call (a watch of 500 users: two calls,
        not 500).
        """
        d: Deferred[list[OnlineDevice]] = Deferred()
        self._devices_wanted.append((uid, d))
        if not self._devices_asking:
            self._ask_devices()
        return d

    def _ask_devices(self) -> None:
        wanted = self._devices_wanted[:MAX_DEVICES_ASKED]
        del self._devices_wanted[:MAX_DEVICES_ASKED]
        if not wanted:
            return
        self._devices_asking = True
        self.devices_calls += 1

        async def ask() -> None:
            try:
                answers = await self._redis.presence_devices_many(
                    list(dict.fromkeys(uid for uid, _ in wanted))
                )
            except HotUnavailable as e:
                failure = Failure(Unavailable(f"presence is unknown while Redis is down: {e}"))
                for _, d in wanted:
                    d.errback(failure)
                return
            except Exception:
                failure = Failure()
                for _, d in wanted:
                    d.errback(failure)
                return
            by_uid = dict(zip(dict.fromkeys(uid for uid, _ in wanted), answers, strict=True))
            for uid, d in wanted:
                d.callback(
                    sorted(
                        (
                            OnlineDevice(device, conn.split(":", 1)[0], since)
                            for device, conn, since in by_uid[uid]
                        ),
                        key=lambda o: (o.since, o.device),
                    )
                )

        def done(_: object) -> None:
            self._devices_asking = False
            self._ask_devices()

        call = Deferred.fromCoroutine(ask())
        call.addErrback(lambda f: self.log.failure("presence devices call failed", f))
        call.addBoth(done)

    def links(self) -> Iterator[IClientLink]:
        return iter(self.registry.links())

    def share_profile(self, profile: Profile) -> None:
        message = msgpack.packb(
            [
                [
                    "u",
                    str(profile.uid),
                    msgpack.packb([profile.nickname, profile.avatar, profile.version]),
                ]
            ],
            use_bin_type=True,
        )
        d = Deferred.fromCoroutine(self._redis.broadcast(message))
        d.addErrback(self._profile_not_shared, profile.uid)

    def _profile_not_shared(self, failure: Failure, uid: int) -> None:
        # The other nodes' send paths keep their copy until its TTL (10 s).
        if failure.check(HotUnavailable):
            self.log.warn("profile of {uid} not shared: {error}", uid=uid, error=failure.value)
        else:
            self.log.failure("sharing the profile of {uid} failed", failure, uid=uid)

    def broadcast(self, kind: str, data: Any) -> None:
        sender = f"{self.node}:{self.incarnation}"
        message = msgpack.packb(
            [["x", kind, msgpack.packb([sender, data], use_bin_type=True)]], use_bin_type=True
        )
        d = Deferred.fromCoroutine(self._redis.broadcast(message))
        d.addErrback(self._not_broadcast, kind)

    def _not_broadcast(self, failure: Failure, kind: str) -> None:
        if failure.check(HotUnavailable):
            self.log.warn("{kind} broadcast lost: {error}", kind=kind, error=failure.value)
        else:
            self.log.failure("{kind} broadcast failed", failure, kind=kind)

    def on_broadcast(self, kind: str, callback: Callable[[Any], None]) -> None:
        self._on_broadcast.setdefault(kind, []).append(callback)

    def _broadcast_received(self, kind: str, sender: str, data: Any) -> None:
        if sender == f"{self.node}:{self.incarnation}":
            return
        self.broadcasts_received += 1
        for callback in self._on_broadcast.get(kind, ()):
            try:
                callback(data)
            except Exception:
                self.log.failure("handling a {kind} broadcast failed", Failure(), kind=kind)

    def online(self, uid: int) -> Deferred[bool]:
        async def online() -> bool:
            if self.registry.has(uid):
                return True
            try:
                return bool(await self._redis.presence_devices(uid))
            except HotUnavailable as e:
                raise Unavailable(f"presence is unknown while Redis is down: {e}") from None

        return Deferred.fromCoroutine(online())

    # -- routing -----------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_call = None
        pushes, self._outgoing = self._outgoing, []
        d = Deferred.fromCoroutine(self._route(pushes))
        d.addErrback(lambda f: self.log.failure("routing pushes failed", f))

    async def _route(self, pushes: list[tuple[int, bytes, str]]) -> None:
        try:
            sent, generation = await self._redis.route(self.node, pushes)
        except HotUnavailable as e:
            # Lost pushes: the messages stay pending, and their recipients
            # are told to sync once Redis answers again.
            self.route_failures += len(pushes)
            if len(self._unrouted) < MAX_UNROUTED:
                self._unrouted.update(uid for uid, _, _ in pushes)
            else:
                self._unrouted_overflow = True
            if self._redis.state() == "ok":
                self.log.warn("{n} cross-node pushes lost: {error}", n=len(pushes), error=e)
            return
        self.routed += sent
        self._saw(generation)

    def _on_message(self, message: bytes) -> None:
        # Lua's cmsgpack packs every string as "str", and push frames are
        # binary msgpack (not UTF-8): unpack raw and decode the text fields.
        try:
            entries = [_entry(*entry) for entry in msgpack.unpackb(message, raw=True)]
        except Exception as e:
            self.log.warn("unreadable message on this node's channel: {error!r}", error=e)
            return
        for kind, uid, data in entries:
            if kind == "x":
                self._broadcast_received(*data)
            elif kind == "h":
                if data == self._probe_id:
                    self._echo_at = self._reactor.seconds()
                    self._unechoed = 0
            elif kind == "g":
                # Another node found the bus's data lost: check now.
                self._recover("told by another node")
            elif kind == "u":
                self.profiles_received += 1
                if self.on_profile is not None:
                    self.on_profile(data)
            elif kind == "p":
                frame, exclude = data
                self.received += 1
                if not exclude:
                    self.registry.push_local(uid, frame)
                else:
                    for link in self.registry.local(uid):
                        if self.value(link) != exclude:
                            link.push(frame)
            elif kind == "k":
                conn, device, reason, nonce, asker = data
                if self._kick_here(uid, device, conn, reason):
                    self.kicked_remotely += 1
                if nonce and asker:
                    self._confirm(asker, uid, nonce)
            elif kind == "c":
                waiting = self._confirms.pop(data, None)
                if waiting is not None:
                    waiting.callback(None)
                elif data.split(":", 1)[0] in self._calls:
                    self._early.add(data)
            elif kind in ("j", "l"):
                node, tag = data
                others = self._others.get(uid)
                if others is None:
                    if uid in self._pending_users and self._early_count < MAX_EARLY_NOTICES:
                        # Our login is under way: it applies them.
                        self._early_notices.setdefault(uid, []).append((kind, node))
                        self._early_count += 1
                else:
                    self._notices += 1
                    self._noticed[uid] = self._notices
                    if kind == "j":
                        others.add(node)
                    else:
                        others.discard(node)
                if tag:
                    self._confirm(node, uid, tag)

    def _confirm(self, asker: str, uid: int, nonce: str) -> None:
        message = msgpack.packb([["c", str(uid), nonce.encode()]], use_bin_type=True)
        d = Deferred.fromCoroutine(self._redis.send(asker, message))
        d.addErrback(self._not_confirmed, asker)

    def _not_confirmed(self, failure: Failure, asker: str) -> None:
        # The asking node goes on after its timeout.
        if failure.check(HotUnavailable):
            self.log.warn(
                "kick not confirmed to node {node}: {error}", node=asker, error=failure.value
            )
        else:
            self.log.failure("confirming a kick to node {node} failed", failure, node=asker)

    # -- presence refresh ---------------------------------------------------------

    async def write_activity(self) -> None:
        """
        Write the last activity of the devices that were active since it was
        last written, for the users with several devices (here, or here and
        elsewhere): their too_many victim is chosen by it, on whichever node
        the next login comes. One script call a second, none when no such
        device was active; nothing for a user with one device.
        """
        sent = self._activity_sent
        now = self._reactor.seconds()
        entries: list[tuple[int, str, str, int]] = []
        live: dict[str, float] = {}
        for uid, link in self.registry.several(lambda uid: bool(self._others.get(uid))):
            conn = self.value(link)
            active = link.last_active
            live[conn] = sent.get(conn, active)
            if active > sent.get(conn, 0.0):
                entries.append((uid, link.device, conn, max(0, int((now - active) * 1000))))
                live[conn] = active
        self._activity_sent = live
        for i in range(0, len(entries), REFRESH_CHUNK):
            try:
                await self._redis.presence_active(entries[i : i + REFRESH_CHUNK])
            except HotUnavailable:
                return

    async def refresh(self) -> None:
        """
        Replay the logins checked on this node only (L{_replay}), then
        extend the presence of every local device (restoring lost ones) with
        its last activity, kick the connections whose device another one
        took, and re-read which other nodes hold each local user. Each chunk
        is built just before its call; a connection closed or replaced
        during the call is removed again (its field may have been restored
        after its logout) before this returns.
        """
        for uid in [uid for uid in self._early_notices if uid not in self._pending_users]:
            self._drop_early(uid)
        if self._unchecked and not await self._replay():
            return  # Redis is still down
        pairs = self.registry.pairs()
        for i in range(0, len(pairs), REFRESH_CHUNK):
            # Built just before the call: a connection closed or replaced
            # since the refresh started is not written back.
            chunk = [
                self._entry(uid, link)
                for uid, link in pairs[i : i + REFRESH_CHUNK]
                if self._registered(uid, link) and not self._to_replay(link)
            ]
            if not chunk:
                continue
            asked = self._notices
            try:
                lost, shared, generation = await self._redis.presence_refresh(
                    self.node, chunk, self.ttl_ms
                )
            except HotUnavailable:
                return
            self._saw(generation)
            stale = {conn for _, _, conn in lost}
            undone: list[Deferred[int]] = []
            for uid, device, conn in lost:
                # Logged in elsewhere while the kick could not reach us; only
                # that connection: the device may have a newer one here now.
                link = self.registry.device_link(uid, device)
                if link is not None and self.value(link) == conn:
                    self.logout(uid, link)
                    link.kick(KICK_REPLACED)
            for uid, device, conn, _, _ in chunk:
                # Closed or replaced during the call: if the script restored
                # its field after its logout had removed it, remove it again
                # (only if still that connection's).
                link = self.registry.device_link(uid, device)
                if conn not in stale and (link is None or self.value(link) != conn):
                    d = self._forget(uid, device, conn)
                    if d is not None:
                        undone.append(d)
            for uid in {entry[0] for entry in chunk}:
                known = self._others.get(uid)
                if known is None:
                    continue
                now = shared.get(uid, set())
                if self._noticed.get(uid, 0) > asked:
                    now |= known  # a notice came after the script read
                learned = now - known
                self._others[uid] = now
                if learned:
                    # Pushes meanwhile missed the user's devices there.
                    self.push_remote(uid, SYNC_PUSH)
                    self.sync_pushes += 1
            if undone:
                await gatherResults(undone)
        if self._unannounced:
            await self._announce()

    def _registered(self, uid: int, link: IClientLink) -> bool:
        return self.registry.device_link(uid, link.device) is link

    def _to_replay(self, link: IClientLink) -> bool:
        """Whether the link's login is still to be (or being) replayed."""
        conn = self.value(link)
        return conn in self._unchecked or conn in self._replaying

    async def _replay(self) -> bool:
        """
        Log in again, through the login script, the connections whose login
        was checked on this node only (Redis was down), as logins and not as
        refreshes: the newest connection of the device wins (an older one
        elsewhere is kicked, with confirmation, before this returns), and
        beyond max_online the least recently active device goes. False if
        Redis is still down (they are replayed next time).
        """
        unchecked, self._unchecked = self._unchecked, {}
        self._replaying.update(unchecked)
        try:
            return await self._replay_logins(
                [(uid, link) for uid, link in unchecked.values() if self._registered(uid, link)]
            )
        finally:
            self._replaying.difference_update(unchecked)

    async def _replay_logins(self, pairs: list[tuple[int, IClientLink]]) -> bool:
        waits: list[Deferred[None]] = []
        for i in range(0, len(pairs), REFRESH_CHUNK):
            chunk = [
                (u, link) for u, link in pairs[i : i + REFRESH_CHUNK] if self._registered(u, link)
            ]
            if not chunk:
                continue
            entries = [self._entry(uid, link) for uid, link in chunk]
            outcomes = await self._login_batch(entries, replay=True)
            for (uid, link), entry, outcome in zip(chunk, entries, outcomes, strict=True):
                if not self._registered(uid, link):
                    # Closed meanwhile: its logout may have come before the script.
                    self._forget(uid, link.device, entry[2])
                elif outcome is None:
                    self._unchecked[entry[2]] = (uid, link)
                else:
                    (kicks, others, _), confirmations, _ = outcome
                    waits += confirmations
                    for device, kicked, reason, nonce in kicks:
                        if not nonce:
                            self._kick_here(uid, device, kicked, reason)
                    known = self._others.get(uid)
                    if known is not None and not set(others) <= known:
                        # Pushes made meanwhile missed the user's devices there.
                        known.update(others)
                        self.push_remote(uid, SYNC_PUSH)
                        self.sync_pushes += 1
            if outcomes and outcomes[0] is None:
                for uid, link in pairs[i + REFRESH_CHUNK :]:
                    if self._registered(uid, link):
                        self._unchecked[self.value(link)] = (uid, link)
                return False
        if waits:
            await gatherResults(waits)
        return True

    # -- recovery -------------------------------------------------------------------

    def _saw(self, generation: str | None) -> None:
        """A generation a script returned: a change means Redis lost its data."""
        if generation is not None and generation == self.generation:
            return
        if generation is not None and self.generation is None and not self._recovering:
            self.generation = generation
            return
        self._recover("the bus's generation changed")

    async def _check_generation(self) -> None:
        """The generation and the pub/sub self-check: one script call a second."""
        try:
            current, receivers = await self._redis.heartbeat(
                secrets.token_hex(8), self.node, self._probe()
            )
        except HotUnavailable:
            # Checked again when Redis answers, from then on: no probe is
            # published meanwhile, and only time Redis answers counts
            # towards a reconnect stuck.
            self._echo_at = self._reactor.seconds()
            self._unechoed = 0
            self._unsubscribed_since = None
            return
        self._saw(current)
        self._check_pubsub(receivers)

    def _probe(self) -> bytes:
        """A message for this node's own channel that only this node counts."""
        self._probes += 1
        probe: bytes = msgpack.packb(
            [["h", str(self._probes), self._probe_id.encode()]], use_bin_type=True
        )
        return probe

    def _check_pubsub(self, receivers: int) -> None:
        """
        Whatever the subscription believes, a node must hear its own
        channel, or pushes from other nodes miss its users without anything
        saying so: the probe it just published reached no subscriber (the
        connection was killed without us noticing: a NAT, a proxy, a server
        that lost it), or its probes do not come back (what we hear is not
        what is published), or a lost subscription is not made again while
        Redis answers (a reconnect stuck somewhere). Then the subscriber
        connection is dropped and made again, and the users are told to
        sync once it is (as after any resubscription).
        """
        subscription = self.subscription
        if subscription is None:
            return
        now = self._reactor.seconds()
        if not subscription.subscribed:
            # Its own reconnect is on it; unless that takes too long.
            if self._unsubscribed_since is None:
                self._unsubscribed_since = now
            elif now - self._unsubscribed_since >= PUBSUB_STUCK_SECONDS:
                self._pubsub_failed(
                    f"not subscribed again after {now - self._unsubscribed_since:.0f}s "
                    "while redis answers"
                )
            return
        self._unsubscribed_since = None
        if receivers == 0:
            self._pubsub_failed("a probe published to this node's channel reached no subscriber")
            return
        self._unechoed += 1
        silent = now - max(self._echo_at, self._subscribed_at)
        if silent >= PUBSUB_ECHO_SECONDS and self._unechoed >= PUBSUB_ECHO_PROBES:
            self._pubsub_failed(
                f"none of the last {self._unechoed} probes came back on this node's "
                f"channel in {silent:.0f}s"
            )

    def _pubsub_failed(self, reason: str) -> None:
        if self.subscription is None or self._stopped:
            return
        self.pubsub_failures += 1
        self.log.warn(
            "pub/sub self-check of node {node}: {reason}; pushes from other nodes may be "
            "missing: re-creating the subscriber connection (its users will be told to sync)",
            node=self.node,
            reason=reason,
        )
        self._unsubscribed_since = None
        self.subscription.restart()

    def _subscribed(self, again: bool) -> None:
        self._subscribed_at = self._reactor.seconds()
        self._unechoed = 0
        self._unsubscribed_since = None
        if again:
            # Whatever was published to this node meanwhile is lost.
            self._everyone_pending = True
            self._recover("resubscribed")

    def _recover(self, reason: str) -> None:
        """Start a recovery (or run one more after the one running)."""
        if self._stopped:
            return
        if self._recovering:
            self._recover_again = reason
            return
        self._recovering = True
        d = Deferred.fromCoroutine(self._recovery(reason))
        d.addErrback(lambda f: self.log.failure("cluster recovery failed", f))
        d.addBoth(self._recovered)

    def _recovered(self, _: object) -> None:
        self._recovering = False
        again, self._recover_again = self._recover_again, None
        if again is not None:
            self._recover(again)

    async def _recovery(self, reason: str) -> None:
        """
        Check the generation, restore this node's presences at once, and
        tell the users who may have missed pushes to sync: every local user
        if Redis lost its data or this node was not subscribed for a while,
        else the recipients of pushes that could not be routed.
        """
        try:
            current = await self._redis.generation(secrets.token_hex(8))
        except HotUnavailable:
            return  # started again when Redis answers
        previous, self.generation = self.generation, current
        lost = previous is not None and previous != current
        everyone = lost or self._everyone_pending or self._unrouted_overflow
        self._everyone_pending = False
        if lost:
            self.data_losses += 1
            # The other nodes check at once instead of within a second.
            try:
                await self._redis.broadcast(msgpack.packb([["g", "0", b""]], use_bin_type=True))
            except HotUnavailable:
                pass
        await self.refresh()
        unrouted, self._unrouted = self._unrouted, set()
        self._unrouted_overflow = False
        told = 0
        for uid in unrouted:
            # Recipients on other nodes (or on none: then the push goes nowhere).
            self.push_remote(uid, SYNC_PUSH)
            told += 1
        if everyone:
            for link in list(self.registry.links()):
                link.push(SYNC_PUSH)
                told += 1
            if lost:
                self.log.warn(
                    "redis lost its data: node {node} restored {presences} presences at once "
                    "(pub/sub {pubsub}) and told {told} users to sync",
                    node=self.node,
                    presences=len(self.registry),
                    pubsub=self.pubsub_state(),
                    told=told,
                )
            else:
                self.log.warn("{reason}: told {told} users to sync", reason=reason, told=told)
        elif told:
            self.log.warn(
                "{reason}: restored {presences} presences; told {told} users whose "
                "pushes were lost to sync",
                reason=reason,
                presences=len(self.registry),
                told=told,
            )
        self.sync_pushes += told

    def pubsub_state(self) -> str:
        """C{ok} while subscribed to this node's channel, else C{down}."""
        return "ok" if self.subscription is not None and self.subscription.subscribed else "down"


def _entry(kind: bytes, uid: bytes, data: Any, *rest: bytes) -> tuple[str, int, Any]:
    """
    One entry of a channel message: (C{p}, uid, (push frame, excluded conn)),
    (C{k}, uid, (conn, device, reason, nonce, asking node)): a kick, (C{c},
    uid, nonce): a kick confirmed, (C{j}, uid, (node, nonce)): that node
    now holds the user (confirm the nonce), (C{l}, uid, (node, "")): it no
    longer does, (C{u}, uid, profile), (C{g}, 0,
    empty): the bus lost its data, or (C{h}, 0, a node's probe id): a node's
    self-check probe, or (C{x}, 0, (kind, sending node, data)): a broadcast.
    """
    if kind == b"x":
        sender, value = msgpack.unpackb(data, raw=False)
        return "x", 0, (uid.decode(), str(sender), value)
    if kind == b"g":
        return "g", 0, None
    if kind == b"h":
        return "h", 0, data.decode()
    if kind == b"u":
        nickname, avatar, version = msgpack.unpackb(data, raw=False)
        return "u", int(uid), Profile(int(uid), str(nickname), str(avatar), int(version))
    if kind == b"p":
        frame = msgpack.unpackb(data, raw=False)
        if not isinstance(frame, dict):
            raise ValueError(f"a push frame must be a map, not {type(frame).__name__}")
        return "p", int(uid), (frame, rest[0].decode() if rest else "")
    if kind == b"k":
        conn, device, reason, nonce, asker = (part.decode() for part in data)
        return "k", int(uid), (conn, device, reason, nonce, asker)
    if kind == b"j":
        # (node, nonce to confirm); a bare node from an older node.
        if isinstance(data, bytes):
            return "j", int(uid), (data.decode(), "")
        node, tag = (part.decode() for part in data)
        return "j", int(uid), (node, tag)
    if kind == b"l":
        return "l", int(uid), (data.decode(), "")
    if kind == b"c":
        return "c", int(uid), data.decode()
    raise ValueError(f"unknown entry kind {kind!r}")
