"""
The application: the SDK's events into the model, the model's actions into
requests, the model's view onto the terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.client.terminal.model import (
    HISTORY_PAGE,
    Action,
    ChatModel,
    LoadConvs,
    LoadHistory,
    LookUp,
    MarkRead,
    Quit,
    Send,
    Typing,
    View,
)

log = Logger()

CONVS_PAGE = 100
#: The errors after which a read is sent again (when the screen shows it again).
RETRY_READ = frozenset({"timeout", "disconnected", "unavailable", "internal", "rate_limited"})
#: Seconds between looks at the outbox while sends of an earlier run are in it.
OUTBOX_POLL = 1.0
#: The most uids one watch may name (docs/protocol.md, "presence, watch").
MAX_WATCH = 500


def field(event: Any, name: str, default: Any = None) -> Any:
    """A field of an SDK event, whether it is a mapping or an object."""
    if isinstance(event, Mapping):
        return event.get(name, default)
    return getattr(event, name, default)


def error_text(failure: Failure) -> str:
    code = getattr(failure.value, "code", "")
    return str(code or failure.getErrorMessage() or repr(failure.value))


class ChatApp:
    """
    @param client: an L{imserver.client.Client} (or a fake with its methods
        and C{on}).
    @param draw: shows a L{View} (the terminal's C{draw}); C{full} repaints.
    @param size: the terminal's (columns, rows).
    @param clock: C{callLater} and C{seconds} (the reactor), for typing
        indicators that go out by themselves; the model's C{now} must be
        its C{seconds}.
    """

    def __init__(
        self,
        client: Any,
        model: ChatModel,
        draw: Callable[[View, bool], None],
        size: Callable[[], tuple[int, int]] = lambda: (80, 24),
        nickname: str | None = None,
        clock: Any = None,
    ) -> None:
        self.client = client
        self.model = model
        self._draw = draw
        self._size = size
        self._nickname = nickname
        self.done: Deferred[None] = Deferred()
        self._quitting = False
        self._unsubscribe: list[Callable[[], Any]] = []
        self._clock = clock
        self._expiry: Any = None
        self._watched: frozenset[int] = frozenset()
        self._refreshing: Any = None
        self._polling: Any = None
        self._full = False

    def start(self) -> None:
        for name, handler in (
            ("state", self._on_state),
            ("message", self._on_message),
            ("read", self._on_read),
            ("delivered", self._on_delivered),
            ("recall", self._on_recall),
            ("edit", self._on_edit),
            ("hide", self._on_hide),
            ("clear", self._on_clear),
            ("profile", self._on_profile),
            ("reset", self._on_reset),
            ("typing", self._on_typing),
            ("presence", self._on_presence),
        ):
            self._unsubscribe.append(self.client.on(name, handler))
        for entry in self.client.outbox:
            self.model.restore_pending(int(entry["to"]), entry["body"], str(entry["cid"]))
        self.resized()
        self.client.start()

    # -- input -------------------------------------------------------------

    def key(self, key: str) -> None:
        if key == "ctrl-l":  # the usual: paint the whole screen again
            self.refresh(full=True)
            return
        self.model.key(key)
        self.refresh()

    def resized(self) -> None:
        self.model.resize(*self._size())
        self.refresh(full=True)

    def refresh(self, full: bool = False) -> None:
        """
        Carry out what the model asks for, then show it: at the end of this
        reactor turn when there is a clock, so a page of catch-up events (or a
        paste) is drawn once, not once per event.
        """
        self._full = self._full or full
        if self._clock is None:
            self._refresh_now()
        elif self._refreshing is None:
            self._refreshing = self._clock.callLater(0, self._refresh_now)

    def _refresh_now(self) -> None:
        self._refreshing = None
        full, self._full = self._full, False
        if self.model.restored():
            self.model.outbox_is(entry["cid"] for entry in self.client.outbox)
        for action in self.model.take_actions():
            self._do(action)
        if self._quitting:
            return
        self._draw(self.model.render(), full)
        self._watch_peers()
        self._schedule_expiry()
        if self.model.restored() and self._clock is not None and self._polling is None:
            # Nothing tells when a restored send is answered: look at the outbox again.
            self._polling = self._clock.callLater(OUTBOX_POLL, self._poll_outbox)

    def _poll_outbox(self) -> None:
        self._polling = None
        self.refresh()

    def _schedule_expiry(self) -> None:
        """Redraw when a typing indicator goes out (one timer, for the first)."""
        when = self.model.next_expiry()
        if self._clock is None or when is None:
            return
        if self._expiry is not None and self._expiry.active():
            if self._expiry.getTime() <= when:
                return
            self._expiry.cancel()
        self._expiry = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self.refresh()

    def _watch_peers(self) -> None:
        """
        Watch the presence of the peers in the list (the SDK re-watches after
        reconnects). Only conversations that exist: a peer's presence shows to
        contacts, and a conversation started after a watch counts from the next.
        """
        started = sorted(peer for peer, conv in self.model.convs.items() if conv.session_id)
        peers = frozenset(started[:MAX_WATCH])
        if peers == self._watched or self.model.state != "live":
            return
        # Once per change of the set, failed or not: a refused watch is not retried per key.
        self._watched = peers

        async def watch() -> None:
            reply = await self.client.watch(sorted(peers))
            for user in field(reply, "users", ()) or ():
                self.model.on_presence(
                    int(user.get("uid", 0)),
                    bool(user.get("online")),
                    int(user.get("last_seen") or 0),
                )
            self.refresh()

        self._run(watch(), "watch", quiet=True)

    # -- the SDK's events --------------------------------------------------

    def _on_state(self, event: Any) -> None:
        state = str(field(event, "state", ""))
        detail = ""
        if state == "offline" and field(event, "retry_in") is not None:
            detail = f"retry in {float(field(event, 'retry_in')):.0f}s"
        elif field(event, "reason"):
            detail = str(field(event, "reason"))
        self.model.set_state(state, detail)
        if state == "live":
            self._run(self._caught_up(), "refresh")
        self.refresh()

    def _on_message(self, event: Any) -> None:
        msg = field(event, "msg")
        if msg is not None:
            self.model.on_message(msg, field(event, "unread"))
            self.refresh()

    def _on_read(self, event: Any) -> None:
        self.model.on_read(
            int(field(event, "session_id", 0)),
            int(field(event, "by", 0)),
            int(field(event, "msg_id", 0)),
            field(event, "unread"),
        )
        self.refresh()

    def _on_delivered(self, event: Any) -> None:
        self.model.on_delivered(
            int(field(event, "session_id", 0)),
            int(field(event, "by", 0)),
            int(field(event, "msg_id", 0)),
        )
        self.refresh()

    def _on_recall(self, event: Any) -> None:
        self.model.on_recall(int(field(event, "session_id", 0)), int(field(event, "msg_id", 0)))
        self.refresh()

    def _on_edit(self, event: Any) -> None:
        msg = field(event, "msg")
        if msg is not None:
            self.model.on_edit(msg)
            self.refresh()

    def _on_hide(self, event: Any) -> None:
        self.model.on_hide(int(m) for m in field(event, "msg_ids", ()) or ())
        self.refresh()

    def _on_clear(self, event: Any) -> None:
        self.model.on_clear(int(field(event, "session_id", 0)), int(field(event, "up_to", 0)))
        self.refresh()

    def _on_profile(self, event: Any) -> None:
        user = field(event, "user")
        if user is not None:
            self.model.on_profile(user)
            self.refresh()

    def _on_typing(self, event: Any) -> None:
        sender = field(event, "from_", field(event, "from", 0))
        self.model.on_typing(int(sender or 0), bool(field(event, "active", False)))
        self.refresh()

    def _on_presence(self, event: Any) -> None:
        self.model.on_presence(
            int(field(event, "uid", 0)),
            bool(field(event, "online", False)),
            int(field(event, "last_seen", 0) or 0),
        )
        self.refresh()

    def _on_reset(self, event: Any) -> None:
        self.model.reset()
        self.refresh()

    # -- requests ----------------------------------------------------------

    async def _caught_up(self) -> None:
        """Live (again): the list, the open conversation and the peers' positions, fresh."""
        if self._nickname:
            nickname, self._nickname = self._nickname, None
            await self.client.set_profile(nickname=nickname)
        reply = await self.client.convs(limit=CONVS_PAGE)
        self.model.apply_convs(field(reply, "convs", ()), bool(field(reply, "more")))
        peer = self.model.peer
        if peer is not None:
            await self._load_history(LoadHistory(peer))
        self.refresh()

    def _do(self, action: Action) -> None:
        if isinstance(action, Send):
            self._run(self._send(action), "send")
        elif isinstance(action, LoadConvs):
            self._run(self._load_convs(action), "conversations")
        elif isinstance(action, LoadHistory):
            self._run(self._load_history(action), "history")
        elif isinstance(action, MarkRead):
            self._run(self._mark_read(action), "read")
        elif isinstance(action, LookUp):
            self._run(self._look_up(action), "profile")
        elif isinstance(action, Typing):
            self._run(self.client.typing(action.peer, action.active), "typing", quiet=True)
        elif isinstance(action, Quit):
            self.quit()

    async def _send(self, action: Send) -> None:
        try:
            result = await self.client.send(action.peer, action.body)
        except Exception as e:
            self.model.send_failed(action.peer, action.local_id, str(getattr(e, "code", e)))
        else:
            self.model.sent(action.peer, action.local_id, result)
        self.refresh()

    async def _load_convs(self, action: LoadConvs) -> None:
        try:
            reply = await self.client.convs(limit=CONVS_PAGE, before=action.before)
        except Exception as e:
            self.model.convs_failed(str(getattr(e, "code", e)))
        else:
            entries = field(reply, "convs", ())
            self.model.apply_convs(entries, bool(field(reply, "more")), action.before)
        self.refresh()

    async def _load_history(self, action: LoadHistory) -> None:
        fields: dict[str, Any] = {"peer": action.peer, "limit": HISTORY_PAGE}
        if action.before:
            fields["before"] = action.before
        try:
            reply = await self.client.history(**fields)
        except Exception as e:
            self.model.history_failed(action.peer, str(getattr(e, "code", e)))
        else:
            log.info(
                "history of uid {peer} before {before}: {count} messages, more: {more}",
                peer=action.peer,
                before=action.before,
                count=len(field(reply, "msgs", ()) or ()),
                more=bool(field(reply, "more")),
            )
            self.model.apply_history(action.peer, action.before, reply)
        self.refresh()

    async def _mark_read(self, action: MarkRead) -> None:
        try:
            reply = await self.client.read(action.session_id, action.msg_id)
        except Exception as e:
            # Not live for a while, or lost with its connection: read again once live.
            again = getattr(e, "code", "") in RETRY_READ
            self.model.read_failed(action.session_id, action.msg_id, again)
            raise
        self.model.on_read(action.session_id, self.model.me, action.msg_id, field(reply, "unread"))
        self.refresh()

    async def _look_up(self, action: LookUp) -> None:
        reply = await self.client.profile([action.peer])
        for user in field(reply, "users", ()) or ():
            self.model.on_profile(user)
        self.refresh()

    def _run(self, work: Any, what: str, quiet: bool = False) -> None:
        """Run a coroutine (or a Deferred); a failure is logged and, unless quiet, shown."""
        d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
        d.addErrback(self._failed, what, quiet)

    def _failed(self, failure: Failure, what: str, quiet: bool) -> None:
        if self._quitting:
            return
        log.failure("{what} failed", failure, what=what)
        if quiet:
            return
        self.model.notice = f"{what}: {error_text(failure)}"
        self.refresh()

    # -- the end -------------------------------------------------------------

    def quit(self) -> None:
        if self._quitting:
            return
        self._quitting = True
        for timer in (self._expiry, self._refreshing, self._polling):
            if timer is not None and timer.active():
                timer.cancel()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        d = Deferred.fromCoroutine(self._close())
        d.addBoth(lambda _: self.done.callback(None) if not self.done.called else None)

    async def _close(self) -> None:
        await self.client.close()
