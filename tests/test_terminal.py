"""
C{imserver chat} for real: two instances in a private tmux server (fixed
100x30 windows), driven by send-keys and read by capture-pane, against a
real C{twistd -n imserver} (tests/harness.ServerProcess), over TCP and
WebSocket: a conversation opened, a message with an unread badge, a reply,
receipts, typing and presence, history paging, an instance restarted
catching up, a server restart the chats ride out, and a message typed
offline that outlives its chat (the state file's outbox).

Skipped without tmux, unless IMSERVER_TEST_BACKENDS=required (then failed).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import REPO, REQUIRED, ServerProcess
from tests.support import eventually, within

COLS, ROWS = 100, 30
#: What C{{T}} stands for in the patterns of L{TerminalChatTests.see}: a message's time
#: (C{12:34}, or C{Dec 01 12:34} when the test runs across midnight).
TIME = r"(?:[A-Z][a-z]{2} \d\d )?\d\d:\d\d"
#: Seconds a screen may take to show what it should (a loaded 2-core machine).
PATIENCE = 60.0


def tmux_binary() -> str:
    path = shutil.which("tmux")
    if path is None:
        if REQUIRED:
            raise AssertionError("tmux is not installed (IMSERVER_TEST_BACKENDS=required)")
        raise SkipTest("tmux is not installed")
    return path


class Tmux:
    """A private tmux server (its own socket), one session per chat instance."""

    def __init__(self, directory: str) -> None:
        self.binary = tmux_binary()
        self.socket = os.path.join(directory, "tmux.sock")
        self.env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8", TERM="xterm-256color")
        self.env.pop("TMUX", None)
        self.started = False

    def run(self, *args: str) -> str:
        out = subprocess.run(
            [self.binary, "-u", "-f", "/dev/null", "-S", self.socket, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
        )
        if out.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        command = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        command += " exec " + shlex.join(argv)
        self.run(
            "new-session", "-d", "-s", name, "-x", str(COLS), "-y", str(ROWS), "-c", REPO, command
        )
        if not self.started:
            self.started = True
            # A chat that exits leaves its last screen to read (and to report).
            self.run("set-option", "-g", "remain-on-exit", "on")
        self.run("set-option", "-t", name, "remain-on-exit", "on")

    def keys(self, name: str, *keys: str) -> None:
        self.run("send-keys", "-t", name, *keys)

    def type(self, name: str, text: str) -> None:
        """Type C{text} literally, then Enter."""
        self.run("send-keys", "-t", name, "-l", text)
        self.run("send-keys", "-t", name, "Enter")

    def screen(self, name: str) -> str:
        return self.run("capture-pane", "-p", "-t", name)

    def dead(self, name: str) -> bool:
        return self.run("display-message", "-p", "-t", name, "#{pane_dead}").strip() == "1"

    def kill(self, name: str) -> None:
        self.run("kill-session", "-t", name)

    def stop(self) -> None:
        if self.started:
            subprocess.run(
                [self.binary, "-S", self.socket, "kill-server"],
                capture_output=True,
                env=self.env,
                timeout=30,
            )


class TerminalChatTests(TestCase):
    timeout = 600

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="imserver-tchat-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.tmux = Tmux(self.dir)
        self.addCleanup(self.tmux.stop)
        self.server = ServerProcess({"limits": {"send_per_second": 10_000, "send_burst": 10_000}})
        self.addCleanup(self.server.cleanup)
        self.server.start()

    def chat(self, name: str, uid: int, url: str | None = None) -> None:
        """
        Start C{imserver chat --uid} in session C{name} (the state file is per
        name), on the config's TCP listener unless C{url} says otherwise.
        """
        argv = [
            sys.executable,
            "-m",
            "imserver.cli",
            "chat",
            "--uid",
            str(uid),
            "--config",
            self.server.config_path,
            "--state",
            os.path.join(self.dir, f"{name}.json"),
            "--log",
            os.path.join(self.dir, f"{name}.log"),
            *(["--url", url] if url else []),
        ]
        env = {
            "PYTHONPATH": REPO,
            "HOME": self.dir,
            "XDG_STATE_HOME": os.path.join(self.dir, "state"),
        }
        self.tmux.start(name, argv, env)

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.dir, f"{name}.log"), encoding="utf-8") as f:
                return f.read()
        except OSError:
            return ""

    async def see(self, name: str, check: str | Callable[[str], object]) -> str:
        """
        Wait until session C{name}'s screen matches C{check}: a predicate, or a
        regex (multi-line, C{{T}} for a time).
        """
        last = [""]

        def ok() -> bool:
            last[0] = self.tmux.screen(name)
            if callable(check):
                return bool(check(last[0]))
            return re.search(check.replace("{T}", TIME), last[0], re.MULTILINE) is not None

        try:
            await eventually(ok, timeout=PATIENCE, interval=0.2)
        except AssertionError:
            raise AssertionError(
                f"{name}'s screen never matched {check!r}:\n{last[0]}\n"
                f"--- {name}.log:\n{self.log(name)[-3000:]}\n--- server log:\n"
                f"{self.server.log()[-3000:]}"
            ) from None
        return last[0]

    async def live(self, name: str, uid: int, url: str | None = None) -> None:
        self.chat(name, uid, url)
        await self.see(name, rf"imserver chat · uid {uid} · .*● live")

    async def test_two_users_chat_with_badges_and_receipts(self) -> None:
        await self.live("alice", 1)
        await self.live("bob", 2, self.server.ws_url)  # Bob over WebSocket

        self.tmux.type("alice", "/open 2")
        await self.see("alice", r"Chat with uid 2")
        await self.see("alice", r"beginning of the conversation")
        self.tmux.type("alice", "hello bob")
        await self.see("alice", r"you: hello bob  ✓")

        # Bob: the conversation in the list, with an unread badge and the message.
        screen = await self.see("bob", r"1\. uid 1[ •]+\[1\]\s+{T} hello bob")
        self.assertIn("1 unread", screen.splitlines()[0])
        # Bob's client acked it: delivered.
        await self.see("alice", r"you: hello bob  ✓✓$")

        self.tmux.keys("bob", "Enter")  # opens the selected conversation
        await self.see("bob", r"uid 1: hello bob")
        # Shown is read: Alice sees it, Bob's badge is gone.
        await self.see("alice", r"you: hello bob  ✓✓ read")
        await self.see("bob", lambda s: "unread" not in s.splitlines()[0])

        await self.see("bob", r"Chat with uid 1 · online")
        await self.see("alice", r"Chat with uid 2 · online")

        # Typing shows on the other side; sending ends it.
        self.tmux.keys("bob", "-l", "hi alice, 你好")
        await self.see("alice", r"Chat with uid 2 · online · typing…")
        self.tmux.keys("bob", "Enter")
        await self.see("alice", r"uid 2: hi alice, 你好")
        await self.see("alice", lambda s: "typing" not in s.splitlines()[1])
        # Alice has the conversation open: read at once.
        await self.see("bob", r"you: hi alice, 你好  ✓✓ read")

        self.tmux.keys("bob", "Escape")
        await self.see("bob", r"1\. uid 1[ •]+{T} you: hi alice")
        self.tmux.type("bob", "/quit")
        await within(eventually(lambda: self.tmux.dead("bob"), timeout=PATIENCE), PATIENCE + 5)
        await self.see("alice", r"Chat with uid 2 · last seen {T}")

    async def test_history_paging(self) -> None:
        from imserver.client import connect
        from tests.support import reactor

        await self.live("alice", 1)
        carol = await within(connect(reactor, self.server.endpoint, self.server.token(3)))
        self.addCleanup(carol.close)
        for i in range(75):
            await within(carol.request("send", to=1, cid=f"c{i}", body=f"message {i:02}"))
        await self.see("alice", r"1\. uid 3[ •]+\[75\]\s+{T} message 74")

        # Restarted (same device, its place in the stream kept), the chat has only the
        # list: the conversation comes from the server a page (30) at a time.
        await self.quit("alice")
        with open(os.path.join(self.dir, "alice.json")) as f:
            self.assertGreaterEqual(json.load(f)["seq"], 75)  # nothing to replay
        await self.live("alice", 1)
        await self.see("alice", r"1\. uid 3[ •]+\[75\]\s+{T} message 74")
        self.tmux.keys("alice", "Enter")
        screen = await self.see("alice", r"uid 3: message 74")
        self.assertIn("uid 3: message 49", screen)  # 26 rows of messages
        self.assertNotIn("message 48", screen)
        # Everything was shown up to the newest: read, badge gone.
        await self.see("alice", lambda s: "unread" not in s.splitlines()[0])

        # PgUp until the first message: two older pages come in on the way.
        await self.page("alice", "PPage", "beginning of the conversation")
        older = re.findall(r"history of uid 3 before [1-9]\d*: (\d+) messages", self.log("alice"))
        self.assertEqual(sum(map(int, older)), 45)  # 30 + 15: the older pages, from the server
        screen = self.tmux.screen("alice")
        self.assertIn("uid 3: message 00", screen)
        self.assertNotIn("message 74", screen)

        # And back down to the newest.
        await self.page("alice", "NPage", "uid 3: message 74")
        self.assertNotIn("↑", self.tmux.screen("alice").splitlines()[1])

    async def page(self, name: str, key: str, until: str) -> list[str]:
        """
        Press C{key} until C{until} shows, waiting for each press to show (and
        each older page to load); the screens seen on the way.
        """
        seen = [self.tmux.screen(name)]
        for _ in range(40):
            if until in seen[-1]:
                return seen
            self.tmux.keys(name, key)
            seen.append(
                await self.see(name, lambda s, b=seen[-1]: s != b and "loading older" not in s)
            )
        raise AssertionError(f"{key} never showed {until!r}:\n{seen[-1]}")

    async def quit(self, name: str) -> None:
        """/quit, and wait for the chat to be gone (its session too)."""
        self.tmux.type(name, "/quit")
        await within(eventually(lambda: self.tmux.dead(name), timeout=PATIENCE), PATIENCE + 5)
        self.tmux.kill(name)

    async def test_restarted_instance_catches_up(self) -> None:
        await self.live("alice", 1)
        await self.live("bob", 2)
        device = re.search(r"device (\S+)", self.tmux.screen("bob"))
        assert device is not None

        await self.quit("bob")

        self.tmux.type("alice", "/open 2")
        await self.see("alice", r"beginning of the conversation")
        self.tmux.type("alice", "while you were away")
        self.tmux.type("alice", "and another one")
        await self.see("alice", r"you: and another one  ✓$")
        await self.see("alice", r"you: while you were away  ✓$")

        # Bob again, same state file: the same device, the two messages waiting.
        await self.live("bob", 2)
        screen = await self.see("bob", r"1\. uid 1[ •]+\[2\]\s+{T} and another one")
        self.assertIn(f"device {device.group(1)}", screen)
        await self.see("alice", r"you: and another one  ✓✓$")
        self.tmux.keys("bob", "Enter")
        screen = await self.see("bob", r"uid 1: and another one")
        self.assertIn("uid 1: while you were away", screen)
        await self.see("alice", r"you: and another one  ✓✓ read")

    async def test_server_restart_offline_then_live_again(self) -> None:
        await self.live("alice", 1)
        await self.live("bob", 2)
        self.tmux.type("alice", "/open 2")
        await self.see("alice", r"beginning of the conversation")

        self.server.stop()
        await self.see("alice", r"○ (offline|connecting)")
        # Typed while offline: kept in the outbox, shown as not sent yet.
        self.tmux.type("alice", "sent while offline")
        await self.see("alice", r"you: sent while offline  …")

        self.server.start()
        await self.see("alice", r"● live")
        await self.see("alice", r"you: sent while offline  ✓")
        await self.see("bob", r"1\. uid 1[ •]+\[1\]\s+{T} sent while offline")

    async def test_unsent_messages_outlive_the_chat(self) -> None:
        await self.live("bob", 2)
        await self.live("alice", 1)
        self.tmux.type("alice", "/open 2")
        await self.see("alice", r"beginning of the conversation")
        self.server.stop()
        await self.see("alice", r"○ (offline|connecting)")
        self.tmux.type("alice", "kept in the outbox")
        await self.see("alice", r"you: kept in the outbox  …")
        await self.quit("alice")

        # The state file kept it: the next run shows it waiting and sends it (same cid).
        self.server.start()
        await self.live("alice", 1)
        await self.see("bob", r"1\. uid 1[ •]+\[1\]\s+{T} kept in the outbox")
        self.tmux.type("alice", "/open 2")
        await self.see("alice", r"you: kept in the outbox  ✓")
        self.assertEqual(self.tmux.screen("alice").count("kept in the outbox"), 1)
