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
    LoadHistory,
    LookUp,
    MarkRead,
    Quit,
    Send,
    View,
)

log = Logger()

CONVS_PAGE = 100


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
    """

    def __init__(
        self,
        client: Any,
        model: ChatModel,
        draw: Callable[[View, bool], None],
        size: Callable[[], tuple[int, int]] = lambda: (80, 24),
        nickname: str | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self._draw = draw
        self._size = size
        self._nickname = nickname
        self.done: Deferred[None] = Deferred()
        self._quitting = False
        self._unsubscribe: list[Callable[[], Any]] = []

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
        ):
            self._unsubscribe.append(self.client.on(name, handler))
        self.resized()
        self.client.start()

    # -- input -------------------------------------------------------------

    def key(self, key: str) -> None:
        self.model.key(key)
        self.refresh()

    def resized(self) -> None:
        self.model.resize(*self._size())
        self.refresh(full=True)

    def refresh(self, full: bool = False) -> None:
        """Carry out what the model asks for, then show it."""
        for action in self.model.take_actions():
            self._do(action)
        if not self._quitting:
            self._draw(self.model.render(), full)

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
        self.model.apply_convs(field(reply, "convs", ()))
        peer = self.model.peer
        if peer is not None:
            await self._load_history(LoadHistory(peer))
        self.refresh()

    def _do(self, action: Action) -> None:
        if isinstance(action, Send):
            self._run(self._send(action), "send")
        elif isinstance(action, LoadHistory):
            self._run(self._load_history(action), "history")
        elif isinstance(action, MarkRead):
            self._run(self._mark_read(action), "read")
        elif isinstance(action, LookUp):
            self._run(self._look_up(action), "profile")
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

    async def _load_history(self, action: LoadHistory) -> None:
        fields: dict[str, Any] = {"peer": action.peer, "limit": HISTORY_PAGE}
        if action.before:
            fields["before"] = action.before
        try:
            reply = await self.client.history(**fields)
        except Exception as e:
            self.model.history_failed(action.peer, str(getattr(e, "code", e)))
        else:
            self.model.apply_history(action.peer, action.before, reply)
        self.refresh()

    async def _mark_read(self, action: MarkRead) -> None:
        reply = await self.client.read(action.session_id, action.msg_id)
        self.model.on_read(action.session_id, self.model.me, action.msg_id, field(reply, "unread"))
        self.refresh()

    async def _look_up(self, action: LookUp) -> None:
        reply = await self.client.profile([action.peer])
        for user in field(reply, "users", ()) or ():
            self.model.on_profile(user)
        self.refresh()

    def _run(self, coro: Any, what: str) -> None:
        d = Deferred.fromCoroutine(coro)
        d.addErrback(self._failed, what)

    def _failed(self, failure: Failure, what: str) -> None:
        if self._quitting:
            return
        log.failure("{what} failed", failure, what=what)
        self.model.notice = f"{what}: {error_text(failure)}"
        self._draw(self.model.render(), False)

    # -- the end -------------------------------------------------------------

    def quit(self) -> None:
        if self._quitting:
            return
        self._quitting = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        d = Deferred.fromCoroutine(self._close())
        d.addBoth(lambda _: self.done.callback(None) if not self.done.called else None)

    async def _close(self) -> None:
        await self.client.close()
