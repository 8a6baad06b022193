"""
The chat's state and what it looks like, with no I/O.

L{ChatModel} holds the conversations, their messages, the screen (the list or
one conversation) and the input line. The application feeds it the SDK's
events and replies (C{on_message}, C{apply_convs}, ...) and the keys typed
(L{ChatModel.key}); it renders itself to lines (L{ChatModel.render}) and asks
for what it needs done as L{Action}s (send, open, load older, mark read),
which the application carries out with the L{imserver.client.Client} and
reports back. So all of it is tested without a terminal or a server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from imserver.client.terminal.text import cells, clean, fit, tail, wrap

HISTORY_PAGE = 30

Msg = Mapping[str, Any]


# ---------------------------------------------------------------------------
# Actions: what the model asks the application to do


@attrs.frozen
class LoadHistory:
    """Fetch a page of C{peer}'s history: the newest (C{before} 0) or older."""

    peer: int
    before: int = 0


@attrs.frozen
class LoadConvs:
    """Fetch the next (older) page of the conversation list."""

    before: int


@attrs.frozen
class Send:
    peer: int
    body: str
    local_id: int


@attrs.frozen
class MarkRead:
    session_id: int
    msg_id: int


@attrs.frozen
class LookUp:
    """Fetch the profile of a peer whose name is not known yet."""

    peer: int


@attrs.frozen
class Typing:
    """Tell C{peer} this user is typing to them (or stopped)."""

    peer: int
    active: bool


@attrs.frozen
class Quit:
    pass


Action = LoadHistory | LoadConvs | Send | MarkRead | LookUp | Typing | Quit

#: docs/protocol.md, "typing": send active about every 3 s; show one 6 s at most.
TYPING_EVERY = 3.0
TYPING_SHOWN = 6.0


# ---------------------------------------------------------------------------
# State


@attrs.frozen
class Line:
    """One screen row: text (already fitted to the width) and a style name."""

    text: str
    style: str = ""


@attrs.frozen
class View:
    lines: tuple[Line, ...]
    cursor: tuple[int, int]  # row, column (0-based)


@attrs.define
class Pending:
    """
    A message typed here that the server has not answered yet (or refused).
    One the SDK's outbox kept from an earlier run has its C{cid} (its answer
    is not ours to wait for: it is found by cid in history once sent).
    """

    local_id: int
    body: str
    ts: int
    error: str = ""
    cid: str = ""
    #: A restored send that left the outbox: its message is looked for in history.
    left: bool = False


@attrs.define
class Conv:
    peer: int
    session_id: int = 0
    name: str = ""
    last: Msg | None = None
    last_msg_id: int = 0
    unread: int = 0
    #: This user's read position (what was marked read, here or on another device),
    #: and what it was before the last read sent from here (put back if that failed).
    my_read: int = 0
    read_before: int = 0
    read_again: bool = False
    peer_read: int = 0
    peer_delivered: int = 0
    messages: dict[int, Msg] = attrs.Factory(dict)
    pending: list[Pending] = attrs.Factory(list)
    #: History: the newest page was loaded; older pages exist; a page is on its way.
    loaded: bool = False
    more: bool = False
    loading: bool = False

    @property
    def title(self) -> str:
        return f"{self.name} (uid {self.peer})" if self.name else f"uid {self.peer}"

    @property
    def activity(self) -> int:
        return self.last_msg_id


def local_time(ts: int, now: float | None = None) -> str:
    """C{12:34} today, C{Dec 01 12:34} another day (local time)."""
    when = time.localtime(ts / 1000)
    today = time.localtime(time.time() if now is None else now)
    same_day = (when.tm_year, when.tm_yday) == (today.tm_year, today.tm_yday)
    return time.strftime("%H:%M" if same_day else "%b %d %H:%M", when)


def body_text(body: Any) -> str:
    return body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, default=str)


class ChatModel:
    """
    @param me: this user's uid.
    @param fmt_time: ms since the epoch to the time shown beside a message.
    """

    def __init__(
        self,
        me: int,
        *,
        device: str = "",
        width: int = 80,
        height: int = 24,
        fmt_time: Callable[[int], str] = local_time,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.me = me
        self.device = device
        self.width = width
        self.height = height
        self.fmt_time = fmt_time
        self.now = now
        self.state = "connecting"
        self.state_detail = ""
        self.convs: dict[int, Conv] = {}
        #: The list from the server: older pages exist (from C{convs_before}); one is coming.
        self.convs_more = False
        self.convs_before = 0
        self.convs_loading = False
        self._convs_paged = False
        self.screen = "list"
        #: The conversation the list's cursor is on: it stays on it when others move.
        self.selected_peer: int | None = None
        self.peer: int | None = None
        #: Chat screen: rows scrolled up from the bottom.
        self.scroll = 0
        self.input = ""
        self.pos = 0
        self.notice = ""
        self.actions: list[Action] = []
        self._local_ids = 0
        #: uid -> (online, last_seen) of the peers watched.
        self.presence: dict[int, tuple[bool, int]] = {}
        #: peer -> when (L{now}) their typing indicator goes out.
        self.typing: dict[int, float] = {}
        self._typing_to: int | None = None
        self._typing_at = 0.0

    # -- queries ---------------------------------------------------------

    def ordered(self) -> list[Conv]:
        """The conversation list: most recent first, new empty ones last."""
        return sorted(self.convs.values(), key=lambda c: (-c.activity, c.peer))

    def conv(self, peer: int) -> Conv:
        conv = self.convs.get(peer)
        if conv is None:
            conv = self.convs[peer] = Conv(peer)
        return conv

    def by_session(self, session_id: int) -> Conv | None:
        for conv in self.convs.values():
            if conv.session_id == session_id:
                return conv
        return None

    def take_actions(self) -> list[Action]:
        """What to do now (drained): includes marking read what the screen shows."""
        self._mark_shown_read()
        actions, self.actions = self.actions, []
        return actions

    # -- the SDK's events and replies --------------------------------------

    def set_state(self, state: str, detail: str = "") -> None:
        self.state = state
        self.state_detail = detail
        if state == "live":
            for conv in self.convs.values():
                if conv.read_again:
                    conv.read_again, conv.my_read = False, conv.read_before

    def reset(self) -> None:
        """The server forgot this device: drop everything, it is loaded again."""
        self.convs.clear()
        self.scroll = 0
        if self.peer is not None:
            self.conv(self.peer)
            self.actions.append(LoadHistory(self.peer))

    def apply_convs(
        self, entries: Iterable[Mapping[str, Any]], more: bool = False, before: int = 0
    ) -> None:
        """
        A page of C{convs} (C{before} 0: the newest). The cursor for the next
        page is the last entry's C{last_msg_id}; a refresh of the newest page
        leaves the paging where it got to.
        """
        entries = list(entries)
        if before:
            self.convs_loading = False
            self._convs_paged = True
        if before or not self._convs_paged:
            self.convs_more = more
            if entries:
                self.convs_before = int(entries[-1].get("last_msg_id") or 0)
        for entry in entries:
            peer_info = entry.get("peer") or {}
            peer = int(peer_info.get("uid", 0))
            if not peer:
                continue
            conv = self.conv(peer)
            conv.session_id = int(entry.get("session_id") or conv.session_id)
            conv.name = str(peer_info.get("nickname") or conv.name)
            last_msg_id = int(entry.get("last_msg_id") or 0)
            if last_msg_id >= conv.last_msg_id:
                conv.last_msg_id = last_msg_id
                conv.last = entry.get("last")
                conv.unread = int(entry.get("unread") or 0)
                if conv.unread == 0:
                    conv.my_read = max(conv.my_read, last_msg_id)
            conv.peer_read = max(conv.peer_read, int(entry.get("peer_read") or 0))
            conv.peer_delivered = max(
                conv.peer_delivered, int(entry.get("peer_delivered") or 0), conv.peer_read
            )

    def apply_history(self, peer: int, before: int, reply: Mapping[str, Any]) -> None:
        conv = self.conv(peer)
        conv.loading = False
        msgs = list(reply.get("msgs") or ())
        for msg in msgs:
            self._store(conv, msg)
        if not before:
            # A restored send that left the outbox is stored by now, or was refused.
            for pending in conv.pending:
                if pending.left and not pending.error:
                    pending.error = "not sent"
        if before or not conv.loaded:
            conv.more = bool(reply.get("more"))
        conv.loaded = True
        if msgs and not conv.session_id:
            conv.session_id = int(msgs[0].get("session_id") or 0)
        conv.peer_read = max(conv.peer_read, int(reply.get("peer_read") or 0))
        conv.peer_delivered = max(
            conv.peer_delivered, int(reply.get("peer_delivered") or 0), conv.peer_read
        )

    def history_failed(self, peer: int, error: str) -> None:
        self.conv(peer).loading = False
        self.notice = f"history of uid {peer}: {error}"

    def on_message(self, msg: Msg, unread: int | None = None) -> None:
        sender = int(msg.get("from") or 0)
        peer = int(msg.get("to") or 0) if sender == self.me else sender
        if not peer:
            return
        conv = self.conv(peer)
        msg_id = int(msg.get("msg_id") or 0)
        if msg_id in conv.messages:
            return
        conv.session_id = conv.session_id or int(msg.get("session_id") or 0)
        if (
            self.screen == "chat"
            and self.peer == peer
            and self.scroll
            and msg_id > conv.last_msg_id
        ):
            # Scrolled up to read: a new message below does not move what is read.
            self.scroll += len(self._message_lines(conv, msg))
        if sender == peer:
            self.typing.pop(peer, None)
            nickname = (msg.get("sender") or {}).get("nickname")
            conv.name = str(nickname or conv.name)
            if msg_id > conv.my_read:
                conv.unread = unread if unread is not None else conv.unread + 1
        self._store(conv, msg)

    def on_read(self, session_id: int, by: int, msg_id: int, unread: int | None = None) -> None:
        conv = self.by_session(session_id)
        if conv is None:
            return
        if by == self.me:
            conv.my_read = max(conv.my_read, msg_id)
            if unread is not None:
                conv.unread = unread
            else:
                conv.unread = self._count_unread(conv)
        else:
            conv.peer_read = max(conv.peer_read, msg_id)
            conv.peer_delivered = max(conv.peer_delivered, msg_id)

    def read_failed(self, session_id: int, msg_id: int, again: bool) -> None:
        """
        A read was lost (C{again}) or refused. A lost one is marked anew once
        live again (not at once: that could spin while the connection is down).
        """
        conv = self.by_session(session_id)
        if conv is not None and again and conv.my_read == msg_id:
            conv.read_again = True

    def on_delivered(self, session_id: int, by: int, msg_id: int) -> None:
        conv = self.by_session(session_id)
        if conv is not None and by != self.me:
            conv.peer_delivered = max(conv.peer_delivered, msg_id)

    def on_recall(self, session_id: int, msg_id: int) -> None:
        conv = self.by_session(session_id)
        if conv is None:
            return
        self._forget(conv, msg_id)

    def on_hide(self, msg_ids: Iterable[int]) -> None:
        """Messages hidden for this user (on any of its devices) leave the screen."""
        hidden = set(msg_ids)
        for conv in self.convs.values():
            for msg_id in hidden & conv.messages.keys():
                self._forget(conv, msg_id)

    def on_clear(self, session_id: int, up_to: int) -> None:
        conv = self.by_session(session_id)
        if conv is not None:
            for msg_id in [m for m in conv.messages if m <= up_to]:
                self._forget(conv, msg_id)

    def on_edit(self, msg: Msg) -> None:
        conv = self.by_session(int(msg.get("session_id") or 0))
        msg_id = int(msg.get("msg_id") or 0)
        if conv is None or msg_id not in conv.messages:
            return
        conv.messages[msg_id] = msg
        if conv.last is not None and conv.last.get("msg_id") == msg_id:
            conv.last = msg

    def on_presence(self, uid: int, online: bool, last_seen: int) -> None:
        self.presence[uid] = (online, last_seen)

    def on_typing(self, peer: int, active: bool) -> None:
        if active:
            self.typing[peer] = self.now() + TYPING_SHOWN
        else:
            self.typing.pop(peer, None)

    def next_expiry(self) -> float | None:
        """When (L{now}) the next typing indicator goes out: the screen changes then."""
        now = self.now()
        for peer in [p for p, until in self.typing.items() if until <= now]:
            del self.typing[peer]
        return min(self.typing.values(), default=None)

    def on_profile(self, user: Mapping[str, Any]) -> None:
        conv = self.convs.get(int(user.get("uid") or 0))
        if conv is not None and user.get("nickname"):
            conv.name = str(user["nickname"])

    def sent(self, peer: int, local_id: int, result: Mapping[str, Any]) -> None:
        """The server stored a message typed here."""
        conv = self.conv(peer)
        pending = self._take_pending(conv, local_id)
        if pending is None:
            return
        conv.session_id = int(result.get("session_id") or conv.session_id)
        msg = {
            "msg_id": int(result["msg_id"]),
            "session_id": conv.session_id,
            "from": self.me,
            "to": peer,
            "type": "text",
            "body": pending.body,
            "ts": int(result.get("ts") or pending.ts),
        }
        if msg["msg_id"] not in conv.messages:
            self._store(conv, msg)

    def restore_pending(self, peer: int, body: Any, cid: str) -> None:
        """A send from an earlier run that the SDK's outbox sends again (same cid)."""
        self._local_ids += 1
        pending = Pending(self._local_ids, body_text(body), int(time.time() * 1000), cid=cid)
        self.conv(peer).pending.append(pending)

    def restored(self) -> bool:
        """Whether a restored send is still in the outbox (the app watches it leave)."""
        return any(p.cid and not p.left for c in self.convs.values() for p in c.pending)

    def outbox_is(self, cids: Iterable[str]) -> None:
        """The SDK's outbox now: the restored sends gone from it are looked for in history."""
        still = set(cids)
        for conv in self.convs.values():
            gone = [p for p in conv.pending if p.cid and not p.left and p.cid not in still]
            for pending in gone:
                pending.left = True
            if gone and conv.loaded and not conv.loading:
                self.actions.append(LoadHistory(conv.peer))

    def send_failed(self, peer: int, local_id: int, error: str) -> None:
        for pending in self.conv(peer).pending:
            if pending.local_id == local_id:
                pending.error = error

    # -- keys --------------------------------------------------------------

    def key(self, key: str) -> None:
        if len(key) == 1:
            self.input = self.input[: self.pos] + key + self.input[self.pos :]
            self.pos += 1
        else:
            handler = getattr(self, "_key_" + key.replace("-", "_"), None)
            if handler is not None:
                handler()
        self._typing_check()

    def _typing_check(self) -> None:
        """Typing a message to the open peer says so (every 3 s); sending or leaving stops it."""
        target = self.peer if self.screen == "chat" else None
        if not self.input.strip() or self.input.startswith("/"):
            target = None
        if target is not None and not self.conv(target).session_id:
            target = None  # typing to a user one has no conversation with is forbidden
        if self._typing_to is not None and self._typing_to != target:
            self.actions.append(Typing(self._typing_to, False))
            self._typing_to = None
        now = self.now()
        if target is not None and (
            self._typing_to is None or now - self._typing_at >= TYPING_EVERY
        ):
            self.actions.append(Typing(target, True))
            self._typing_to, self._typing_at = target, now

    def _key_enter(self) -> None:
        line, self.input, self.pos = self.input.strip(), "", 0
        self.notice = ""
        if line.startswith("/"):
            self._command(line)
        elif self.screen == "list":
            self._enter_on_list(line)
        elif line and self.peer is not None:
            self._send(self.peer, line)

    def _key_backspace(self) -> None:
        if self.pos:
            self.input = self.input[: self.pos - 1] + self.input[self.pos :]
            self.pos -= 1

    def _key_delete(self) -> None:
        self.input = self.input[: self.pos] + self.input[self.pos + 1 :]

    def _key_left(self) -> None:
        self.pos = max(0, self.pos - 1)

    def _key_right(self) -> None:
        self.pos = min(len(self.input), self.pos + 1)

    def _key_home(self) -> None:
        self.pos = 0

    _key_ctrl_a = _key_home

    def _key_end(self) -> None:
        self.pos = len(self.input)

    _key_ctrl_e = _key_end

    def _key_ctrl_u(self) -> None:
        self.input, self.pos = self.input[self.pos :], 0

    def _key_ctrl_c(self) -> None:
        self.actions.append(Quit())

    def _key_ctrl_d(self) -> None:
        if not self.input:
            self.actions.append(Quit())
        else:
            self._key_delete()

    def _key_esc(self) -> None:
        if self.input:
            self.input, self.pos = "", 0
        else:
            self.show_list()

    def _key_up(self) -> None:
        if self.screen == "list":
            self.select(self.selected - 1)
        else:
            self._scroll_by(1)

    def _key_down(self) -> None:
        if self.screen == "list":
            if self.selected + 1 >= len(self.convs):
                self._more_convs()
            self.select(self.selected + 1)
        else:
            self._scroll_by(-1)

    def _key_pgup(self) -> None:
        if self.screen == "chat":
            self._scroll_by(self._body_rows() - 1)

    def _key_pgdn(self) -> None:
        if self.screen == "chat":
            self._scroll_by(-(self._body_rows() - 1))

    # -- screens -----------------------------------------------------------

    def convs_failed(self, error: str) -> None:
        self.convs_loading = False
        self.notice = f"conversations: {error}"

    def _more_convs(self) -> None:
        if self.convs_more and not self.convs_loading and self.convs_before:
            self.convs_loading = True
            self.actions.append(LoadConvs(self.convs_before))

    def show_list(self) -> None:
        if self.peer is not None:
            self.selected_peer = self.peer
        self.screen = "list"
        self.peer = None
        self.scroll = 0

    def open(self, peer: int) -> None:
        if peer == self.me:
            self.notice = "that is you: open another uid"
            return
        conv = self.conv(peer)
        self.screen = "chat"
        self.peer = peer
        self.scroll = 0
        if not conv.loaded and not conv.loading:
            conv.loading = True
            self.actions.append(LoadHistory(peer))
        if not conv.name:
            self.actions.append(LookUp(peer))

    def _enter_on_list(self, line: str) -> None:
        ordered = self.ordered()
        if not line:
            if ordered:
                self.open(ordered[self.selected].peer)
            else:
                self.notice = "no conversations yet: /open UID starts one"
        elif line.isdigit() and 1 <= int(line) <= len(ordered):
            self.open(ordered[int(line) - 1].peer)
        else:
            self.notice = "type a number from the list, or /open UID"

    def _command(self, line: str) -> None:
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("open", "o"):
            if arg.isdigit() and int(arg) > 0:
                self.open(int(arg))
            else:
                self.notice = "usage: /open UID"
        elif name in ("list", "back", "l"):
            self.show_list()
        elif name in ("quit", "q", "exit"):
            self.actions.append(Quit())
        elif name in ("help", "h", "?"):
            self.notice = HELP
        else:
            self.notice = f"unknown command /{name} (/help)"

    def _send(self, peer: int, body: str) -> None:
        self._local_ids += 1
        conv = self.conv(peer)
        conv.pending.append(Pending(self._local_ids, body, int(time.time() * 1000)))
        self.scroll = 0
        self.actions.append(Send(peer, body, self._local_ids))

    # -- rendering ---------------------------------------------------------

    def resize(self, width: int, height: int) -> None:
        self.width, self.height = max(20, width), max(6, height)

    def _body_rows(self) -> int:
        return self.height - 4  # title, header, (body), notice, input

    def render(self) -> View:
        w = self.width
        rows: list[Line] = [Line(fit(self._title(), w), "title")]
        if self.screen == "chat" and self.peer is not None:
            header, body = self._chat_rows()
        else:
            header, body = self._list_rows()
        rows.append(Line(fit(header, w), "header"))
        padding = [Line(" " * w) for _ in range(self._body_rows() - len(body))]
        # A conversation sits on the input line, as in any chat; the list hangs from the top.
        rows.extend([*padding, *body] if self.screen == "chat" else [*body, *padding])
        rows.append(Line(fit(" " + clean(self.notice) if self.notice else self._hint(), w), "dim"))
        prompt = "> "
        room = w - cells(prompt) - 1
        before = tail(self.input[: self.pos], room)
        shown = before + self.input[self.pos :]
        rows.append(Line(fit(prompt + clean(shown), w), "input"))
        return View(tuple(rows), (len(rows) - 1, cells(prompt) + cells(clean(before))))

    def _title(self) -> str:
        state = {
            "live": "● live",
            "connecting": "○ connecting…",
            "syncing": "◐ syncing…",
            "offline": "○ offline",
        }.get(self.state, "✗ " + self.state)
        if self.state_detail:
            state += f" ({self.state_detail})"
        total = sum(c.unread for c in self.convs.values())
        unread = f" · {total} unread" if total else ""
        device = f" · device {self.device}" if self.device else ""
        return f" imserver chat · uid {self.me}{device}{unread} · {state}"

    def _hint(self) -> str:
        if self.screen == "chat":
            return " Enter: send · PgUp/PgDn: scroll, older · Esc: back · /open UID · /quit"
        return " ↑↓ + Enter or a number: open · /open UID: new conversation · /quit"

    def _list_rows(self) -> tuple[str, list[Line]]:
        ordered = self.ordered()
        rows = self._body_rows()
        footer = ""
        if self.convs_loading:
            footer = "   … loading more conversations"
        elif self.convs_more:
            footer = "   ↓ more conversations"
        if footer:
            rows -= 1
        first = max(0, self.selected - rows + 1)
        body: list[Line] = []
        for i, conv in enumerate(ordered[first : first + rows], start=first):
            badge = f"[{conv.unread}]" if conv.unread else ""
            online = " •" if self.presence.get(conv.peer, (False, 0))[0] else ""
            cursor = "▸" if i == self.selected else " "
            left = f"{cursor}{i + 1:>3}. {clean(conv.title)}{online}"
            last = conv.last
            preview = ""
            if last is not None:
                who = "you: " if last.get("from") == self.me else ""
                text = clean(body_text(last.get("body")).replace("\n", " "))
                when = self.fmt_time(int(last.get("ts") or 0))
                preview = f"{when} {who}{text}"
            line = f"{fit(left, 30)} {badge:>6}  {preview}"
            body.append(Line(fit(line, self.width), "selected" if i == self.selected else ""))
        if not ordered:
            body.append(Line(fit("   No conversations yet. /open UID starts one.", self.width)))
        if footer:
            body.append(Line(fit(footer, self.width), "dim"))
        return f" Conversations ({len(ordered)})", body

    def _chat_rows(self) -> tuple[str, list[Line]]:
        assert self.peer is not None
        conv = self.conv(self.peer)
        lines = self._conv_lines(conv)
        rows = self._body_rows()
        self.scroll = max(0, min(self.scroll, len(lines) - rows))
        end = len(lines) - self.scroll
        shown = lines[max(0, end - rows) : end]
        where = f" · ↑{self.scroll}" if self.scroll else ""
        online, last_seen = self.presence.get(conv.peer, (False, 0))
        seen = " · online" if online else ""
        if not online and last_seen:
            seen = f" · last seen {self.fmt_time(last_seen)}"
        typing = " · typing…" if self.typing.get(conv.peer, 0) > self.now() else ""
        header = f" Chat with {clean(conv.title)}{seen}{typing}{where}"
        return header, [line for line, _ in shown]

    def _conv_lines(self, conv: Conv) -> list[tuple[Line, int]]:
        """Every row of a conversation, oldest first, each with its message id (0: none)."""
        w = self.width
        if conv.loading:
            top = "   … loading older messages"
        elif conv.more:
            top = "   ↑ PgUp: older messages"
        elif conv.loaded:
            top = "   ─ beginning of the conversation ─"
        else:
            top = ""
        lines: list[tuple[Line, int]] = [(Line(fit(top, w), "dim"), 0)] if top else []
        for msg_id in sorted(conv.messages):
            lines.extend(self._message_lines(conv, conv.messages[msg_id]))
        for pending in conv.pending:
            mark = f"  ✗ {pending.error}" if pending.error else "  …"
            when = self.fmt_time(pending.ts)
            for row in self._wrap_message(f" {when} you: ", pending.body + mark):
                lines.append((Line(fit(row, w), "mine"), 0))
        return lines

    def _message_lines(self, conv: Conv, msg: Msg) -> list[tuple[Line, int]]:
        msg_id = int(msg.get("msg_id") or 0)
        mine = msg.get("from") == self.me
        who = "you" if mine else clean(conv.name or f"uid {conv.peer}")
        mark = ""
        if mine:
            if msg_id <= conv.peer_read:
                mark = "  ✓✓ read"
            elif msg_id <= conv.peer_delivered:
                mark = "  ✓✓"
            else:
                mark = "  ✓"
        edited = " (edited)" if msg.get("edited") else ""
        when = self.fmt_time(int(msg.get("ts") or 0))
        text = body_text(msg.get("body")) + edited + mark
        style = "mine" if mine else ""
        return [
            (Line(fit(row, self.width), style), msg_id)
            for row in self._wrap_message(f" {when} {who}: ", text)
        ]

    def _wrap_message(self, prefix: str, text: str) -> list[str]:
        indent = cells(prefix)
        room = max(10, self.width - indent - 1)
        rows: list[str] = []
        for para in text.split("\n"):
            rows.extend(wrap(clean(para), room))
        return [(prefix if i == 0 else " " * indent) + row for i, row in enumerate(rows)]

    # -- internals ---------------------------------------------------------

    def _store(self, conv: Conv, msg: Msg) -> None:
        msg_id = int(msg.get("msg_id") or 0)
        if not msg_id:
            return
        cid = msg.get("cid")
        if cid and msg.get("from") == self.me:
            conv.pending = [p for p in conv.pending if p.cid != cid]
        conv.messages[msg_id] = msg
        if msg_id >= conv.last_msg_id:
            conv.last_msg_id = msg_id
            conv.last = msg

    def _forget(self, conv: Conv, msg_id: int) -> None:
        msg = conv.messages.pop(msg_id, None)
        if msg is not None and msg.get("from") == conv.peer and msg_id > conv.my_read:
            conv.unread = max(0, conv.unread - 1)
        if conv.last is not None and conv.last.get("msg_id") == msg_id:
            conv.last = conv.messages[max(conv.messages)] if conv.messages else None

    def _take_pending(self, conv: Conv, local_id: int) -> Pending | None:
        for i, pending in enumerate(conv.pending):
            if pending.local_id == local_id:
                return conv.pending.pop(i)
        return None

    def _count_unread(self, conv: Conv) -> int:
        return sum(
            1
            for msg_id, msg in conv.messages.items()
            if msg_id > conv.my_read and msg.get("from") == conv.peer
        )

    @property
    def selected(self) -> int:
        """The row of the list's cursor (the first row when it is on no conversation)."""
        for i, conv in enumerate(self.ordered()):
            if conv.peer == self.selected_peer:
                return i
        return 0

    def select(self, row: int) -> None:
        ordered = self.ordered()
        if ordered:
            self.selected_peer = ordered[max(0, min(row, len(ordered) - 1))].peer

    def _scroll_by(self, rows: int) -> None:
        if self.peer is None:
            return
        conv = self.conv(self.peer)
        total = len(self._conv_lines(conv))
        top = max(0, total - self._body_rows())
        self.scroll = max(0, min(self.scroll + rows, top))
        if rows > 0 and self.scroll >= top and conv.more and not conv.loading and conv.messages:
            conv.loading = True
            self.actions.append(LoadHistory(conv.peer, before=min(conv.messages)))

    def _mark_shown_read(self) -> None:
        """The newest message from the peer on screen is read (the server is told once)."""
        if self.screen != "chat" or self.peer is None:
            return
        conv = self.conv(self.peer)
        lines = self._conv_lines(conv)
        rows = self._body_rows()
        scroll = max(0, min(self.scroll, len(lines) - rows))
        end = len(lines) - scroll
        shown = {msg_id for _, msg_id in lines[max(0, end - rows) : end] if msg_id}
        theirs = [m for m in shown if conv.messages[m].get("from") == conv.peer]
        newest = max(theirs, default=0)
        if newest > conv.my_read and conv.session_id:
            conv.read_before, conv.my_read = conv.my_read, newest
            # Reading covers everything up to newest; what is newer is all loaded.
            conv.unread = self._count_unread(conv)
            self.actions.append(MarkRead(conv.session_id, newest))


HELP = "/open UID: chat with a uid · /list or Esc: conversations · PgUp/PgDn: scroll · /quit"
