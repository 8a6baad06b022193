"""
The terminal chat without a terminal: the model's state and rendering, the
key parser, the text helpers, and the app over a fake Client (events in,
requests out), as in imserver.client.terminal.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from imserver.client.protocol import RequestFailed
from imserver.client.terminal import default_state_path, token_uid, url_from_endpoint
from imserver.client.terminal.app import ChatApp
from imserver.client.terminal.keys import KeyParser
from imserver.client.terminal.model import (
    ChatModel,
    Line,
    LoadConvs,
    LoadHistory,
    LookUp,
    MarkRead,
    Quit,
    Send,
    Typing,
    View,
)
from imserver.client.terminal.screen import TerminalProtocol, encode_view
from imserver.client.terminal.text import cells, clean, cut, fit, tail, wrap

ME, BOB, CAROL = 1, 2, 3
S_BOB, S_CAROL = 1002, 1003


def msg(msg_id: int, sender: int, to: int, body: Any, session_id: int = S_BOB) -> dict[str, Any]:
    return {
        "msg_id": msg_id,
        "session_id": session_id,
        "from": sender,
        "to": to,
        "type": "text",
        "body": body,
        "ts": 0,
    }


def conv_entry(peer: int, session_id: int, last: dict[str, Any] | None, **kw: Any) -> dict:
    return {
        "session_id": session_id,
        "peer": {"uid": peer, "nickname": kw.pop("nickname", ""), "avatar": ""},
        "last": last,
        "last_msg_id": last["msg_id"] if last else 0,
        "unread": kw.pop("unread", 0),
        "peer_read": kw.pop("peer_read", 0),
        "peer_delivered": kw.pop("peer_delivered", 0),
        "muted_until": 0,
    }


def model(width: int = 80, height: int = 12) -> ChatModel:
    return ChatModel(ME, device="dev1", width=width, height=height, fmt_time=lambda ts: "09:00")


def texts(m: ChatModel) -> list[str]:
    return [line.text.rstrip() for line in m.render().lines]


def screen(m: ChatModel) -> str:
    return "\n".join(texts(m))


def type_line(m: ChatModel, text: str) -> None:
    for ch in text:
        m.key(ch)
    m.key("enter")


class TextTests(SynchronousTestCase):
    def test_clean_drops_control_characters(self) -> None:
        self.assertEqual(clean("a\x1b[2Jb\tc\x07"), "a?[2Jb c?")
        self.assertEqual(clean("x\u202ey"), "x\N{REPLACEMENT CHARACTER}y")

    def test_wide_characters_take_two_cells(self) -> None:
        self.assertEqual(cells("ab"), 2)
        self.assertEqual(cells("中文"), 4)
        self.assertEqual(cut("中文字", 5), "中文")
        self.assertEqual(fit("中文字", 5), "中文 ")
        self.assertEqual(tail("abc中", 3), "c中")

    def test_wrap(self) -> None:
        self.assertEqual(wrap("one two three", 7), ["one two", "three"])
        self.assertEqual(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"])
        self.assertEqual(wrap("", 4), [""])

    def test_local_time_gives_the_day_when_not_today(self) -> None:
        from imserver.client.terminal.model import local_time

        now = time.mktime((2026, 12, 2, 15, 0, 0, 0, 0, -1))
        self.assertEqual(local_time(int(now * 1000) - 3600_000, now), "14:00")
        self.assertEqual(local_time(int(now * 1000) - 86400_000, now), "Dec 01 15:00")


class KeyParserTests(SynchronousTestCase):
    def test_text_and_controls(self) -> None:
        p = KeyParser()
        self.assertEqual(
            p.feed(b"hi\r\x7f\x03\x15"), ["h", "i", "enter", "backspace", "ctrl-c", "ctrl-u"]
        )

    def test_utf8_split_between_reads(self) -> None:
        p = KeyParser()
        data = "é中".encode()
        self.assertEqual(p.feed(data[:1]), [])
        self.assertEqual(p.feed(data[1:]), ["é", "中"])

    def test_sequences(self) -> None:
        p = KeyParser()
        keys = p.feed(b"\x1b[A\x1b[B\x1bOC\x1b[5~\x1b[6~\x1b[3~\x1b[1;5D\x1b[H\x1b[99~x")
        self.assertEqual(
            keys, ["up", "down", "right", "pgup", "pgdn", "delete", "left", "home", "x"]
        )

    def test_sequence_split_between_reads(self) -> None:
        p = KeyParser()
        self.assertEqual(p.feed(b"\x1b["), [])
        self.assertTrue(p.pending)
        self.assertEqual(p.feed(b"5~"), ["pgup"])

    def test_lone_escape_waits_for_flush(self) -> None:
        p = KeyParser()
        self.assertEqual(p.feed(b"\x1b"), [])
        self.assertEqual(p.flush(), ["esc"])
        self.assertEqual(p.feed(b"\x1bq"), ["esc", "q"])


class ListTests(SynchronousTestCase):
    def test_empty(self) -> None:
        m = model()
        self.assertIn("No conversations yet", screen(m))
        self.assertIn("connecting", texts(m)[0])

    def test_list_with_badges_and_last_message(self) -> None:
        m = model()
        m.apply_convs(
            [
                conv_entry(BOB, S_BOB, msg(20, BOB, ME, "hi there"), nickname="bob", unread=2),
                conv_entry(CAROL, S_CAROL, msg(10, ME, CAROL, "bye", S_CAROL)),
            ]
        )
        lines = texts(m)
        self.assertIn("2 unread", lines[0])
        self.assertRegex(lines[2], r"1\. bob \(uid 2\)\s+\[2\]\s+09:00 hi there")
        self.assertRegex(lines[3], r"2\. uid 3\s+09:00 you: bye")
        self.assertNotIn("[", lines[3])

    def test_new_message_moves_conversation_up_with_a_badge(self) -> None:
        m = model()
        m.apply_convs(
            [
                conv_entry(BOB, S_BOB, msg(20, BOB, ME, "old")),
                conv_entry(CAROL, S_CAROL, msg(10, CAROL, ME, "older", S_CAROL)),
            ]
        )
        m.on_message(msg(30, CAROL, ME, "news", S_CAROL), unread=1)
        lines = texts(m)
        self.assertRegex(lines[2], r"1\. uid 3\s+\[1\]\s+09:00 news")
        m.on_message(msg(31, CAROL, ME, "more", S_CAROL))
        self.assertRegex(texts(m)[2], r"\[2\]")
        # The same message again (a replay) changes nothing.
        m.on_message(msg(31, CAROL, ME, "more", S_CAROL))
        self.assertRegex(texts(m)[2], r"\[2\]")

    def test_control_characters_from_peers_do_not_reach_the_terminal(self) -> None:
        m = model()
        m.on_message(msg(5, BOB, ME, "evil\x1b]0;title\x07") | {"sender": {"nickname": "\x1b[31m"}})
        rendered = "".join(line.text for line in m.render().lines)
        self.assertNotIn("\x1b", rendered)
        self.assertNotIn("\x07", rendered)

    def test_open_by_arrows_number_and_command(self) -> None:
        m = model()
        m.apply_convs(
            [
                conv_entry(BOB, S_BOB, msg(20, BOB, ME, "a")),
                conv_entry(CAROL, S_CAROL, msg(10, CAROL, ME, "b", S_CAROL)),
            ]
        )
        m.key("down")
        m.key("enter")
        self.assertEqual((m.screen, m.peer), ("chat", CAROL))
        self.assertEqual(m.take_actions(), [LoadHistory(CAROL), LookUp(CAROL)])
        m.key("esc")
        self.assertEqual((m.screen, m.selected), ("list", 1))
        type_line(m, "1")
        self.assertEqual(m.peer, BOB)
        m.key("esc")
        type_line(m, "/open 77")
        self.assertEqual((m.screen, m.peer), ("chat", 77))
        self.assertIn("Chat with uid 77", screen(m))

    def test_the_cursor_stays_on_its_conversation(self) -> None:
        m = model()
        m.apply_convs(
            [
                conv_entry(BOB, S_BOB, msg(20, BOB, ME, "a")),
                conv_entry(CAROL, S_CAROL, msg(10, CAROL, ME, "b", S_CAROL)),
            ]
        )
        m.key("down")
        m.key("down")  # stops at the last row
        self.assertEqual(m.selected, 1)
        m.on_message(msg(30, CAROL, ME, "news", S_CAROL))  # carol moves to the top
        self.assertEqual(m.selected, 0)
        self.assertTrue(texts(m)[2].startswith("▸  1. uid 3"))
        m.key("enter")
        self.assertEqual(m.peer, CAROL)

    def test_older_conversations_come_a_page_at_a_time(self) -> None:
        m = model(height=8)  # 4 body rows
        page = [
            conv_entry(10 + i, 500 + i, msg(90 - i, 10 + i, ME, f"c{i}", 500 + i)) for i in range(3)
        ]
        m.apply_convs(page, more=True)
        self.assertIn("↓ more conversations", screen(m))
        m.key("down")
        m.key("down")
        self.assertEqual(m.take_actions(), [])
        m.key("down")  # past the last one: the next page
        self.assertEqual(m.take_actions(), [LoadConvs(before=88)])
        self.assertIn("loading more conversations", screen(m))
        m.key("down")
        self.assertEqual(m.take_actions(), [])  # one at a time
        older = [conv_entry(20, 600, msg(50, 20, ME, "old", 600))]
        m.apply_convs(older, more=False, before=88)
        self.assertNotIn("more conversations", screen(m))
        m.key("down")
        self.assertTrue(texts(m)[-3].startswith("▸  4. uid 20"), texts(m))
        # A refresh of the newest page (live again) does not undo the paging.
        m.apply_convs(page, more=True)
        self.assertFalse(m.convs_more)

    def test_bad_input_on_the_list(self) -> None:
        m = model()
        type_line(m, "")
        self.assertIn("/open UID starts one", texts(m)[-2])
        type_line(m, "9")
        self.assertIn("type a number", texts(m)[-2])
        type_line(m, "/open me")
        self.assertIn("usage: /open UID", texts(m)[-2])
        type_line(m, "/open 1")
        self.assertIn("that is you", texts(m)[-2])
        type_line(m, "/frob")
        self.assertIn("unknown command /frob", texts(m)[-2])
        self.assertEqual(m.screen, "list")

    def test_quit(self) -> None:
        m = model()
        type_line(m, "/quit")
        self.assertEqual(m.take_actions(), [Quit()])
        m.key("ctrl-c")
        m.key("x")
        m.key("ctrl-d")  # deletes: the line is not empty
        self.assertEqual(m.take_actions(), [Quit()])

    def test_connection_state_in_the_title(self) -> None:
        m = model()
        m.set_state("offline", "retry in 2s")
        self.assertIn("○ offline (retry in 2s)", texts(m)[0])
        m.set_state("live")
        self.assertIn("● live", texts(m)[0])
        m.set_state("kicked", "replaced")
        self.assertIn("✗ kicked (replaced)", texts(m)[0])


class ChatTests(SynchronousTestCase):
    def opened(self, height: int = 12) -> ChatModel:
        m = model(height=height)
        m.apply_convs([conv_entry(BOB, S_BOB, msg(20, BOB, ME, "hi"), nickname="bob", unread=1)])
        m.open(BOB)
        self.assertEqual(m.take_actions(), [LoadHistory(BOB)])
        self.assertIn("loading", screen(m))
        return m

    def test_history_read_and_receipts(self) -> None:
        m = self.opened()
        m.apply_history(
            BOB,
            0,
            {
                "msgs": [
                    msg(20, BOB, ME, "hi"),
                    msg(12, ME, BOB, "second"),
                    msg(11, ME, BOB, "first"),
                ],
                "more": False,
                "peer_read": 11,
                "peer_delivered": 12,
            },
        )
        lines = texts(m)
        body = lines[2:-2]
        self.assertEqual(
            [line for line in body if line.strip()],
            [
                "   ─ beginning of the conversation ─",
                " 09:00 you: first  ✓✓ read",
                " 09:00 you: second  ✓✓",
                " 09:00 bob: hi",
            ],
        )
        # Shown: marked read, once.
        self.assertEqual(m.take_actions(), [MarkRead(S_BOB, 20)])
        self.assertEqual(m.take_actions(), [])
        self.assertEqual(m.convs[BOB].unread, 0)
        self.assertNotIn("unread", lines[0] if False else texts(m)[0])
        # Receipts move.
        m.on_delivered(S_BOB, BOB, 12)
        m.on_read(S_BOB, BOB, 12)
        self.assertIn("second  ✓✓ read", screen(m))

    def test_send_pending_then_sent_then_refused(self) -> None:
        m = self.opened()
        m.apply_history(BOB, 0, {"msgs": [], "more": False, "peer_read": 0, "peer_delivered": 0})
        type_line(m, "hello bob")
        self.assertEqual(
            m.take_actions(), [Typing(BOB, True), Send(BOB, "hello bob", 1), Typing(BOB, False)]
        )
        self.assertIn("you: hello bob  …", screen(m))
        m.sent(BOB, 1, {"msg_id": 40, "session_id": S_BOB, "ts": 0, "dup": False})
        self.assertIn("you: hello bob  ✓", screen(m))
        self.assertNotIn("hello bob  …", screen(m))
        # The same message coming back (catch-up of this user's stream) is not doubled.
        m.on_message(msg(40, ME, BOB, "hello bob"))
        self.assertEqual(screen(m).count("hello bob"), 1)
        type_line(m, "nope")
        m.send_failed(BOB, 2, "forbidden")
        self.assertIn("you: nope  ✗ forbidden", screen(m))

    def test_sends_restored_from_an_earlier_run(self) -> None:
        m = model()
        m.restore_pending(BOB, "from before", "dev1.x.1")
        m.restore_pending(BOB, "refused", "dev1.x.2")
        m.open(BOB)
        m.take_actions()
        self.assertIn("you: from before  …", screen(m))
        self.assertTrue(m.restored())
        m.outbox_is(["dev1.x.1", "dev1.x.2"])  # still waiting: nothing to do
        self.assertEqual(m.take_actions(), [])
        m.apply_history(BOB, 0, {"msgs": [], "more": False})
        self.assertNotIn("not sent", screen(m))
        m.outbox_is([])  # both answered: the newest history shows what was stored
        self.assertFalse(m.restored())
        self.assertEqual(m.take_actions(), [LoadHistory(BOB)])
        stored = msg(50, ME, BOB, "from before") | {"cid": "dev1.x.1"}
        m.apply_history(BOB, 0, {"msgs": [stored], "more": False})
        self.assertEqual(screen(m).count("from before"), 1)
        self.assertIn("you: from before  ✓", screen(m))
        self.assertIn("you: refused  ✗ not sent", screen(m))

    def test_enter_on_an_empty_line_sends_nothing(self) -> None:
        m = self.opened()
        type_line(m, "   ")
        self.assertEqual(m.take_actions(), [])

    def test_live_message_in_the_open_conversation_is_read(self) -> None:
        m = self.opened()
        m.apply_history(BOB, 0, {"msgs": [msg(20, BOB, ME, "hi")], "more": False})
        m.take_actions()
        m.on_message(msg(21, BOB, ME, "are you there?"), unread=1)
        self.assertIn("bob: are you there?", screen(m))
        self.assertEqual(m.take_actions(), [MarkRead(S_BOB, 21)])
        self.assertEqual(m.convs[BOB].unread, 0)

    def test_message_of_another_conversation_while_chatting(self) -> None:
        m = self.opened()
        m.apply_history(BOB, 0, {"msgs": [msg(20, BOB, ME, "hi")], "more": False})
        m.take_actions()
        m.on_message(msg(30, CAROL, ME, "psst", S_CAROL), unread=1)
        self.assertEqual(m.take_actions(), [])
        self.assertIn("1 unread", texts(m)[0])
        self.assertNotIn("psst", screen(m))

    def test_paging(self) -> None:
        m = self.opened(height=10)  # 6 body rows
        newest = [msg(100 + i, BOB, ME, f"m{i}") for i in range(19, 7, -1)]
        m.apply_history(BOB, 0, {"msgs": newest, "more": True})
        m.take_actions()
        self.assertIn("m19", screen(m))
        self.assertNotIn("m13", screen(m))
        m.key("pgup")
        self.assertIn("m10", screen(m))
        self.assertNotIn("m19", screen(m))
        self.assertEqual(m.take_actions(), [])
        m.key("pgup")  # reaches the top: the older page is asked for
        self.assertIn("m8", screen(m))
        self.assertIn("loading older", screen(m))
        self.assertEqual(m.take_actions(), [LoadHistory(BOB, before=108)])
        m.key("pgup")  # one page at a time
        self.assertEqual(m.take_actions(), [])
        older = [msg(100 + i, BOB, ME, f"m{i}") for i in range(7, -1, -1)]
        m.apply_history(BOB, 108, {"msgs": older, "more": False})
        # The view stays where it was; the next PgUps show the older ones.
        self.assertIn("m8", screen(m))
        self.assertNotIn("m6", screen(m))
        m.key("pgup")
        m.key("pgup")
        self.assertIn("beginning of the conversation", screen(m))
        self.assertIn("m0", screen(m))
        self.assertEqual(m.take_actions(), [])
        for _ in range(5):
            m.key("pgdn")
        self.assertIn("m19", screen(m))
        self.assertNotIn("↑", texts(m)[1])

    def test_a_new_message_does_not_move_a_scrolled_view(self) -> None:
        m = self.opened(height=10)  # 6 body rows
        m.apply_history(BOB, 0, {"msgs": [msg(100 + i, BOB, ME, f"m{i}") for i in range(12)]})
        m.key("pgup")
        before = texts(m)[2:-2]
        self.assertNotIn("m11", "\n".join(before))
        m.on_message(msg(200, BOB, ME, "a long one " * 12))
        self.assertEqual(texts(m)[2:-2], before)
        m.key("end")  # the input line's end: the view stays
        for _ in range(3):
            m.key("pgdn")
        self.assertIn("a long one", screen(m))

    def test_refresh_keeps_knowing_the_beginning(self) -> None:
        m = self.opened()
        m.apply_history(BOB, 0, {"msgs": [msg(20, BOB, ME, "hi")], "more": False})
        m.apply_history(
            BOB, 0, {"msgs": [msg(21, BOB, ME, "x"), msg(20, BOB, ME, "hi")], "more": True}
        )
        self.assertFalse(m.convs[BOB].more)

    def test_recall_hide_clear_and_edit(self) -> None:
        m = self.opened()
        m.apply_history(
            BOB,
            0,
            {
                "msgs": [msg(23, BOB, ME, "d"), msg(22, BOB, ME, "c"), msg(21, ME, BOB, "b")],
                "more": False,
            },
        )
        m.on_edit(msg(22, BOB, ME, "C!") | {"edited": 5})
        self.assertIn("bob: C! (edited)", screen(m))
        m.on_recall(S_BOB, 23)
        self.assertNotIn("bob: d", screen(m))
        self.assertEqual(m.convs[BOB].last["msg_id"], 22)  # type: ignore[index]
        m.on_hide([22])
        self.assertNotIn("C!", screen(m))
        m.on_clear(S_BOB, 21)
        self.assertEqual(m.convs[BOB].messages, {})

    def test_read_on_another_device(self) -> None:
        m = model()
        m.on_message(msg(20, BOB, ME, "hi"), unread=1)
        m.on_message(msg(21, BOB, ME, "hi"), unread=2)
        m.on_read(S_BOB, ME, 20)
        self.assertEqual(m.convs[BOB].unread, 1)
        m.on_read(S_BOB, ME, 21, unread=0)
        self.assertEqual(m.convs[BOB].unread, 0)

    def test_reset_forgets_and_reloads_the_open_conversation(self) -> None:
        m = self.opened()
        m.apply_history(BOB, 0, {"msgs": [msg(20, BOB, ME, "hi")], "more": False})
        m.take_actions()
        m.reset()
        self.assertEqual(m.convs[BOB].messages, {})
        self.assertEqual(m.take_actions(), [LoadHistory(BOB)])

    def test_long_and_multi_line_messages_wrap(self) -> None:
        m = model(width=40)
        m.open(BOB)
        m.apply_history(BOB, 0, {"msgs": [msg(20, BOB, ME, "word " * 12 + "\nend")], "more": False})
        body = [line for line in texts(m)[2:-2] if line.strip()]
        self.assertEqual(body[1], " 09:00 uid 2: word word word word word")
        self.assertTrue(body[2].startswith("              word"))
        self.assertEqual(body[-1], "              end")

    def test_input_line_editing_and_cursor(self) -> None:
        m = model(width=20)
        for ch in "hello":
            m.key(ch)
        m.key("left")
        m.key("left")
        m.key("backspace")
        self.assertEqual(m.input, "helo")
        self.assertEqual(m.render().cursor, (m.height - 1, 2 + 2))
        m.key("home")
        m.key("delete")
        m.key("end")
        m.key("!")
        self.assertEqual(m.input, "elo!")
        for ch in "x" * 40:
            m.key(ch)
        view = m.render()
        self.assertEqual(view.lines[-1].text, "> " + "x" * 17 + " ")
        self.assertEqual(view.cursor, (m.height - 1, 19))
        m.key("ctrl-u")
        self.assertEqual(m.input, "")


class TypingPresenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.client = FakeClient()
        self.model = ChatModel(
            ME, width=80, height=12, fmt_time=lambda ts: "09:00", now=self.clock.seconds
        )
        self.views: list[View] = []
        self.app = ChatApp(
            self.client, self.model, lambda v, full: self.views.append(v), clock=self.clock
        )
        self.app.start()
        self.clock.advance(0)
        self.client.replies["convs"] = {
            "convs": [conv_entry(BOB, S_BOB, msg(20, BOB, ME, "hi"))],
            "more": False,
        }
        self.emit("state", Event(state="live", reason=None, retry_in=None))

    def header(self) -> str:
        return self.views[-1].lines[1].text.rstrip()

    # The app draws at the end of the reactor turn: each step here ends one.
    def key(self, key: str) -> None:
        self.app.key(key)
        self.clock.advance(0)

    def emit(self, name: str, event: Any) -> None:
        self.client.emit(name, event)
        self.clock.advance(0)

    def refresh(self) -> None:
        self.app.refresh()
        self.clock.advance(0)

    def test_typing_is_sent_every_3_seconds_and_stopped_by_sending(self) -> None:
        self.model.open(BOB)
        self.refresh()
        typing = lambda: [args for name, args in self.client.calls if name == "typing"]  # noqa: E731
        self.key("h")
        self.clock.advance(1)
        self.key("e")
        self.assertEqual(typing(), [(BOB, True)])
        self.clock.advance(2.5)
        self.key("y")
        self.assertEqual(typing(), [(BOB, True), (BOB, True)])
        self.key("enter")
        self.assertEqual(typing(), [(BOB, True), (BOB, True), (BOB, False)])
        # Commands are not typing; nor is a conversation not started yet.
        for ch in "/open 9":
            self.key(ch)
        self.key("enter")
        self.key("x")
        self.assertEqual(len(typing()), 3)

    def test_leaving_the_conversation_stops_typing(self) -> None:
        self.model.open(BOB)
        self.key("h")
        self.key("ctrl-u")
        self.key("h")
        self.key("esc")  # clears the line
        self.assertEqual(
            [args for name, args in self.client.calls if name == "typing"],
            [(BOB, True), (BOB, False), (BOB, True), (BOB, False)],
        )

    def test_peer_typing_shown_until_false_or_6_seconds(self) -> None:
        self.model.open(BOB)
        self.emit("typing", Event(from_=BOB, active=True))
        self.assertIn("typing…", self.header())
        self.emit("typing", Event(from_=BOB, active=False))
        self.assertNotIn("typing…", self.header())
        self.emit("typing", Event(from_=BOB, active=True))
        self.clock.advance(5.9)
        self.assertIn("typing…", self.header())
        self.clock.advance(0.2)  # the app's timer redraws by itself
        self.assertNotIn("typing…", self.header())
        # A message from the peer ends it too.
        self.emit("typing", Event(from_=BOB, active=True))
        self.emit("message", Event(msg=msg(21, BOB, ME, "there"), unread=1))
        self.assertNotIn("typing…", self.header())

    def test_restored_sends_are_watched_leaving_the_outbox(self) -> None:
        from twisted.internet.task import Clock

        clock = Clock()
        client = FakeClient()
        client.outbox = [{"cid": "d.r.1", "to": BOB, "type": None, "body": "again"}]
        m = ChatModel(ME, width=80, height=12, fmt_time=lambda ts: "09:00", now=clock.seconds)
        views: list[View] = []
        app = ChatApp(client, m, lambda v, full: views.append(v), clock=clock)
        app.start()
        m.open(BOB)
        app.refresh()
        clock.advance(0)
        self.assertIn("you: again  …", "\n".join(line.text for line in views[-1].lines))
        client.calls.clear()
        clock.advance(1)
        self.assertEqual(client.calls, [])
        client.outbox = []
        client.replies["history"] = {
            "msgs": [msg(60, ME, BOB, "again") | {"cid": "d.r.1"}],
            "more": False,
        }
        clock.advance(1)  # the poll sees it gone, the newest history page has it
        clock.advance(0)
        self.assertEqual([name for name, _ in client.calls], ["history"])
        shown = "\n".join(line.text for line in views[-1].lines)
        self.assertIn("you: again  ✓", shown)
        self.assertEqual(clock.getDelayedCalls(), [])  # no more polling

    def test_presence_of_the_peers_in_the_list(self) -> None:
        self.assertEqual(self.client.calls[-1], ("watch", [BOB]))
        self.client.replies["watch"] = {"users": [{"uid": CAROL, "online": True, "last_seen": 7}]}
        self.emit("presence", Event(uid=BOB, online=True, last_seen=5))
        lines = [line.text for line in self.views[-1].lines]
        self.assertTrue(lines[2].startswith("▸  1. uid 2 •"), lines[2])
        self.model.open(BOB)
        self.refresh()
        self.assertIn("Chat with uid 2 · online", self.header())
        self.emit("presence", Event(uid=BOB, online=False, last_seen=5))
        self.assertIn("Chat with uid 2 · last seen 09:00", self.header())
        # A new conversation: the watch grows (once it exists: the first message).
        for ch in "/open 3":
            self.key(ch)
        self.key("enter")
        self.key("x")
        self.key("enter")
        self.assertEqual(self.client.calls[-1], ("send", (CAROL, "x")))
        self.client.sends[0].callback({"msg_id": 40, "session_id": S_CAROL, "ts": 0, "dup": False})
        self.clock.advance(0)
        watches = [args for name, args in self.client.calls if name == "watch"]
        self.assertEqual(watches, [[BOB], [BOB, CAROL]])
        # The reply says the state now.
        self.assertIn("Chat with uid 3 · online", self.header())

    def test_one_draw_per_reactor_turn(self) -> None:
        drawn = len(self.views)
        for i in range(50):
            self.client.emit("message", Event(msg=msg(100 + i, CAROL, ME, f"m{i}", S_CAROL)))
        self.assertEqual(len(self.views), drawn)
        self.clock.advance(0)
        # One draw, and one more once the new peer's presence is watched.
        self.assertEqual(len(self.views), drawn + 2)
        self.assertIn("[50]", self.views[-1].lines[2].text)


class ScreenTests(SynchronousTestCase):
    def test_only_changed_rows_are_written(self) -> None:
        a = View((Line("one"), Line("two", "title")), (1, 0))
        b = View((Line("one"), Line("TWO", "title")), (0, 3))
        first = encode_view(a)
        self.assertIn("\x1b[1;1Hone", first)
        self.assertIn("\x1b[2;1H\x1b[1;7mtwo", first)
        second = encode_view(b, a.lines)
        self.assertNotIn("one", second)
        self.assertIn("TWO", second)
        self.assertTrue(second.endswith("\x1b[1;4H\x1b[?25h"))

    def test_keys_and_lone_escape_on_a_timer(self) -> None:
        from twisted.internet.task import Clock

        clock = Clock()
        keys: list[str] = []
        closed: list[bool] = []
        term = TerminalProtocol(clock, keys.append, lambda: closed.append(True), fd=-1)
        transport = StringTransport()
        term.makeConnection(transport)
        self.assertIn(b"\x1b[?1049h", transport.value())
        term.dataReceived(b"a\x1b")
        self.assertEqual(keys, ["a"])
        clock.advance(0.1)
        self.assertEqual(keys, ["a", "esc"])
        term.dataReceived(b"\x1b")
        term.dataReceived(b"[A")
        clock.advance(0.1)
        self.assertEqual(keys, ["a", "esc", "up"])
        term.restore()
        self.assertTrue(transport.value().endswith(b"\x1b[?1049l"))
        term.connectionLost()
        self.assertEqual(closed, [True])
        self.assertTrue(term.lost.called)


class FakeClient:
    """The Client methods the app uses, answering from canned replies."""

    def __init__(self) -> None:
        self.handlers: dict[str, list[Any]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.replies: dict[str, Any] = {
            "convs": {"convs": [], "more": False},
            "history": {"msgs": [], "more": False, "peer_read": 0, "peer_delivered": 0},
            "read": {"unread": 0, "total_unread": 0},
            "profile": {"users": []},
            "set_profile": {},
            "watch": {"users": []},
            "typing": {},
        }
        self.sends: list[Deferred[dict[str, Any]]] = []
        #: The SDK's outbox: sends not answered yet ({cid, to, type, body}).
        self.outbox: list[dict[str, Any]] = []
        self.started = self.closed = False

    def on(self, name: str, handler: Any) -> Any:
        self.handlers.setdefault(name, []).append(handler)
        return lambda: self.handlers[name].remove(handler)

    def emit(self, name: str, event: Any) -> None:
        for handler in list(self.handlers.get(name, ())):
            handler(event)

    def start(self) -> None:
        self.started = True

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)

    def _reply(self, name: str, args: Any) -> Deferred[Any]:
        self.calls.append((name, args))
        reply = self.replies[name]
        if isinstance(reply, Exception):
            d: Deferred[Any] = Deferred()
            d.errback(reply)
            return d
        return succeed(reply)

    def convs(self, **kw: Any) -> Deferred[Any]:
        return self._reply("convs", kw)

    def history(self, **kw: Any) -> Deferred[Any]:
        return self._reply("history", kw)

    def read(self, session_id: int, msg_id: int) -> Deferred[Any]:
        return self._reply("read", (session_id, msg_id))

    def profile(self, uids: list[int]) -> Deferred[Any]:
        return self._reply("profile", uids)

    def set_profile(self, **kw: Any) -> Deferred[Any]:
        return self._reply("set_profile", kw)

    def watch(self, uids: list[int]) -> Deferred[Any]:
        return self._reply("watch", uids)

    def typing(self, to: int, active: bool) -> Deferred[Any]:
        return self._reply("typing", (to, active))

    def send(self, to: int, body: str) -> Deferred[dict[str, Any]]:
        self.calls.append(("send", (to, body)))
        d: Deferred[dict[str, Any]] = Deferred()
        self.sends.append(d)
        return d


class Event:
    """An SDK event: attributes, as imserver.client's frozen event classes."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class AppTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = FakeClient()
        self.model = model()
        self.views: list[View] = []
        self.app = ChatApp(
            self.client,
            self.model,
            lambda view, full: self.views.append(view),
            lambda: (80, 12),
            nickname="alice",
        )
        self.app.start()

    def shown(self) -> str:
        return "\n".join(line.text.rstrip() for line in self.views[-1].lines)

    def names(self) -> list[str]:
        return [name for name, _ in self.client.calls]

    def calls(self, *names: str) -> list[tuple[str, Any]]:
        return [call for call in self.client.calls if call[0] in names]

    def test_live_loads_the_list_and_sets_the_nickname(self) -> None:
        self.assertTrue(self.client.started)
        self.assertIn("connecting", self.shown())
        self.client.replies["convs"] = {
            "convs": [conv_entry(BOB, S_BOB, msg(20, BOB, ME, "hi"), unread=1)],
            "more": False,
        }
        self.client.emit("state", Event(state="live", reason=None, retry_in=None))
        self.assertEqual(self.names(), ["set_profile", "convs", "watch"])
        self.assertEqual(self.calls("watch"), [("watch", [BOB])])
        self.assertIn("● live", self.shown())
        self.assertRegex(self.shown(), r"uid 2\s+\[1\]\s+09:00 hi")
        # Live again after a reconnect: the list is reloaded, the nickname is not set again.
        self.client.emit("state", Event(state="offline", reason=None, retry_in=1.6))
        self.assertIn("offline (retry in 2s)", self.shown())
        self.client.emit("state", Event(state="live", reason=None, retry_in=None))
        self.assertEqual(self.names(), ["set_profile", "convs", "watch", "convs"])

    def test_older_conversations(self) -> None:
        self.client.replies["convs"] = {
            "convs": [conv_entry(BOB, S_BOB, msg(20, BOB, ME, "hi"))],
            "more": True,
        }
        self.client.emit("state", Event(state="live", reason=None, retry_in=None))
        self.client.replies["convs"] = {
            "convs": [conv_entry(CAROL, S_CAROL, msg(10, CAROL, ME, "yo", S_CAROL))],
            "more": False,
        }
        self.app.key("down")
        self.assertEqual(self.calls("convs")[-1], ("convs", {"limit": 100, "before": 20}))
        self.assertRegex(self.shown(), r"2\. uid 3\s+09:00 yo")

    def test_open_send_and_read(self) -> None:
        self.client.replies["history"] = {
            "msgs": [msg(20, BOB, ME, "hi")],
            "more": False,
            "peer_read": 0,
            "peer_delivered": 0,
        }
        self.client.replies["profile"] = {"users": [{"uid": BOB, "nickname": "bob"}]}
        for ch in "/open 2":
            self.app.key(ch)
        self.app.key("enter")
        self.assertEqual(
            self.calls("history", "profile", "read"),
            [
                ("history", {"peer": BOB, "limit": 30}),
                ("read", (S_BOB, 20)),
                ("profile", [BOB]),
            ],
        )
        self.assertIn("Chat with bob (uid 2)", self.shown())
        for ch in "yo":
            self.app.key(ch)
        self.app.key("enter")
        self.assertEqual(self.calls("send"), [("send", (BOB, "yo"))])
        self.assertIn("you: yo  …", self.shown())
        self.client.sends[0].callback({"msg_id": 30, "session_id": S_BOB, "ts": 0, "dup": False})
        self.assertIn("you: yo  ✓", self.shown())
        self.client.emit("delivered", Event(session_id=S_BOB, msg_id=30, by=BOB))
        self.assertIn("you: yo  ✓✓", self.shown())
        self.client.emit("read", Event(session_id=S_BOB, msg_id=30, by=BOB, unread=None))
        self.assertIn("you: yo  ✓✓ read", self.shown())
        self.client.emit("message", Event(msg=msg(31, BOB, ME, "k"), unread=1, replay=False))
        self.assertIn("bob: k", self.shown())
        self.assertEqual(self.calls("read")[-1], ("read", (S_BOB, 31)))

    def test_a_refused_send_and_a_failed_request_are_shown(self) -> None:
        self.client.replies["history"] = RequestFailed({"code": "unavailable", "message": "x"})
        for ch in "/open 2":
            self.app.key(ch)
        self.app.key("enter")
        self.assertIn("history of uid 2: unavailable", self.shown())
        self.app.key("a")
        self.app.key("enter")
        self.client.sends[0].errback(RequestFailed({"code": "no_such_user", "message": "x"}))
        self.assertIn("you: a  ✗ no_such_user", self.shown())
        self.client.replies["profile"] = RequestFailed({"code": "internal", "message": "x"})
        self.app.key("esc")
        for ch in "/open 3":
            self.app.key(ch)
        self.app.key("enter")
        self.assertIn("profile: internal", self.shown())
        self.flushLoggedErrors(RequestFailed)

    def test_a_lost_read_is_sent_again_once_live(self) -> None:
        self.client.replies["history"] = {"msgs": [msg(20, BOB, ME, "hi")], "more": False}
        self.client.replies["read"] = RequestFailed({"code": "timeout", "message": "x"})
        for ch in "/open 2":
            self.app.key(ch)
        self.app.key("enter")
        self.assertEqual(self.calls("read"), [("read", (S_BOB, 20))])
        self.client.replies["read"] = {"unread": 0, "total_unread": 0}
        self.app.key("x")
        self.assertEqual(len(self.calls("read")), 1)  # not at once
        self.client.emit("state", Event(state="live", reason=None, retry_in=None))
        self.assertEqual(self.calls("read"), [("read", (S_BOB, 20))] * 2)
        self.client.emit("state", Event(state="live", reason=None, retry_in=None))
        self.assertEqual(len(self.calls("read")), 2)
        self.flushLoggedErrors(RequestFailed)

    def test_a_refused_read_is_not_sent_again(self) -> None:
        self.client.replies["history"] = {"msgs": [msg(20, BOB, ME, "hi")], "more": False}
        self.client.replies["read"] = RequestFailed({"code": "forbidden", "message": "x"})
        for ch in "/open 2":
            self.app.key(ch)
        self.app.key("enter")
        self.client.emit("state", Event(state="live", reason=None, retry_in=None))
        self.assertEqual(len(self.calls("read")), 1)
        self.assertIn("read: forbidden", self.shown())
        self.flushLoggedErrors(RequestFailed)

    def test_quit_closes_the_client(self) -> None:
        self.app.key("ctrl-c")
        self.assertTrue(self.client.closed)
        self.assertTrue(self.app.done.called)
        self.assertEqual(self.client.handlers["message"], [])


class OptionsTests(SynchronousTestCase):
    def test_url_from_the_listen_endpoint(self) -> None:
        self.assertEqual(url_from_endpoint("tcp:7000:interface=127.0.0.1"), "tcp://127.0.0.1:7000")
        self.assertEqual(url_from_endpoint("tcp:port=7000"), "tcp://127.0.0.1:7000")
        self.assertEqual(url_from_endpoint("tcp6:7000:interface=\\:\\:1"), "tcp://[::1]:7000")
        self.assertRaises(ValueError, url_from_endpoint, "unix:/tmp/im.sock")

    def test_token_uid(self) -> None:
        from imserver.services.tokens import TokenService

        token = TokenService("x" * 32).mint(42, now=0, ttl_seconds=60)
        self.assertEqual(token_uid(token), 42)
        self.assertRaises(SystemExit, token_uid, "nonsense")

    def test_state_path(self) -> None:
        path = default_state_path(42, "tcp://127.0.0.1:7000")
        self.assertTrue(path.endswith("/imserver/chat-42-127.0.0.1_7000.json"), path)

    def test_needs_a_terminal(self) -> None:
        import subprocess
        import sys

        from tests.harness import REPO

        out = subprocess.run(
            [sys.executable, "-m", "imserver.cli", "chat", "--uid", "1"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("imserver: chat needs a terminal", out.stderr)

    def test_token_for_another_uid(self) -> None:
        from imserver.cli import cmd_chat as run
        from imserver.services.tokens import TokenService

        token = TokenService("x" * 32).mint(42, now=0, ttl_seconds=60)
        args = argparse.Namespace(token=token, uid=7, url="tcp://127.0.0.1:1", config=None)
        with self.assertRaises(SystemExit) as e:
            run(args)
        self.assertIn("the token is for uid 42, not 7", str(e.exception))

    def test_needs_uid_or_token(self) -> None:
        from imserver.cli import cmd_chat as run

        args = argparse.Namespace(token=None, uid=None, url=None, config=None)
        self.assertRaises(SystemExit, run, args)
