"""
The web chat (clients/web, served by the HTTP listener at C{/}).

L{StaticServingTests} serve the bundle and C{/v1/web/config} in process
(real HTTP on a loopback port). L{BundleTests} run clients/web's npm test:
type check, unit tests, and a fresh build that must equal the bundle
committed under imserver/http/static. L{BrowserTests} run headless Debian chromium
browsers, driven by selenium through chromium-driver, against C{twistd -n
imserver}: two users chat, one goes away and catches up, the server dies and
comes back; unread badges and receipts are checked on the page, and
screenshots are kept as artifacts (their directory is printed).
L{OriginTests} and L{NoWebSocketTests}: the page says what is wrong.

Without chromium, chromedriver, selenium, node or npm these tests are
skipped, unless C{IMSERVER_TEST_BACKENDS=required} (CI): then they fail.
C{IMSERVER_DOCS_SCREENSHOT=1} also rewrites docs/images/webchat.png.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet.interfaces import IListeningPort
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from imserver.http.resource import JsonResource, Responder
from imserver.http.web import FILES, WebConfig, WebSocketPlace, add_static
from tests.harness import REQUIRED, BackendUnavailable, ServerProcess
from tests.support import reactor

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "clients" / "web"
STATIC = ROOT / "imserver" / "http" / "static"
CHROMIUM = os.environ.get("IMSERVER_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("IMSERVER_CHROMEDRIVER", "/usr/bin/chromedriver")
#: Seconds a browser may take to show what the test waits for (a loaded 2-core machine).
WAIT = 45


def unavailable(message: str) -> None:
    """Skip, or fail when the environment must have everything (CI)."""
    if REQUIRED:
        raise BackendUnavailable(message + " (IMSERVER_TEST_BACKENDS=required)")
    raise SkipTest(message)


# ---------------------------------------------------------------------------
# Serving, in process


class StaticServingTests(TestCase):
    """The bundle's files and the config endpoint, over real HTTP."""

    def setUp(self) -> None:
        self.place: WebSocketPlace | None = WebSocketPlace(port=7001)
        self.origins: tuple[str, ...] = ()
        root = JsonResource(Responder())
        v1 = JsonResource(root.responder)
        root.putChild(b"v1", v1)
        web = JsonResource(root.responder)
        v1.putChild(b"web", web)
        self.config = WebConfig(
            root.responder, websocket=lambda: self.place, origins=(), recall_seconds=120
        )
        web.putChild(b"config", self.config)
        add_static(root)
        port: IListeningPort = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any, bytes]:
        response = await self.http.get(self.base + path, **kwargs)
        return response.code, response.headers, await response.content()

    async def test_files(self) -> None:
        """Each file with its type, no-cache (revalidated by Last-Modified) and nosniff."""
        for path, name in (
            ("/", "index.html"),
            ("/index.html", "index.html"),
            ("/app.js", "app.js"),
            ("/app.css", "app.css"),
        ):
            code, headers, body = await self.get(path)
            self.assertEqual(code, 200, path)
            self.assertEqual(headers.getRawHeaders("content-type"), [FILES[name].decode()])
            self.assertEqual(headers.getRawHeaders("cache-control"), ["no-cache"])
            self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"])
            self.assertIn("script-src 'self'", headers.getRawHeaders("content-security-policy")[0])
            self.assertEqual(body, (STATIC / name).read_bytes())
            modified = headers.getRawHeaders("last-modified")[0]
            code, _, body = await self.get(path, headers={"If-Modified-Since": modified})
            self.assertEqual((code, body), (304, b""))

    async def test_nothing_else(self) -> None:
        """No directory listing, no other file: the API's JSON 404 (or a plain 404 below a file)."""
        for path in (
            "/static/",
            "/static/app.js",
            "/imserver.toml",
            "/../pyproject.toml",
            "/app.js/x",
        ):
            code, _, body = await self.get(path)
            self.assertEqual(code, 404, path)
            self.assertNotIn(b"Directory listing", body)

    async def test_config(self) -> None:
        """The WebSocket URL carries the host the page was loaded from."""
        code, headers, body = await self.get(
            "/v1/web/config", headers={"Host": "chat.example:7080"}
        )
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])
        self.assertEqual(
            json.loads(body),
            {"websocket": "ws://chat.example:7001/v1/ws", "problem": None, "recall_seconds": 120},
        )
        code, _, body = await self.get("/v1/web/config", headers={"Host": "[::1]:7080"})
        self.assertEqual(json.loads(body)["websocket"], "ws://[::1]:7001/v1/ws")

    async def test_config_wss(self) -> None:
        self.place = WebSocketPlace(port=443, secure=True)
        _, _, body = await self.get("/v1/web/config", headers={"Host": "chat.example"})
        self.assertEqual(json.loads(body)["websocket"], "wss://chat.example:443/v1/ws")

    async def test_config_off(self) -> None:
        """No WebSocket listener: null, and the page can say why."""
        self.place = None
        _, _, body = await self.get("/v1/web/config")
        config = json.loads(body)
        self.assertIsNone(config["websocket"])
        self.assertIn("[server] websocket", config["problem"])

    async def test_config_origins(self) -> None:
        """With an origin allow-list, the page's own origin must be in it."""
        self.config.origins = ("http://chat.example:*",)
        _, _, body = await self.get("/v1/web/config", headers={"Host": "chat.example:7080"})
        self.assertEqual(json.loads(body)["websocket"], "ws://chat.example:7001/v1/ws")
        _, _, body = await self.get("/v1/web/config", headers={"Host": "other.example:7080"})
        config = json.loads(body)
        self.assertIsNone(config["websocket"])
        self.assertIn("http://other.example:7080", config["problem"])
        self.assertIn("websocket_origins", config["problem"])


class PackageDataTests(TestCase):
    def test_installed(self) -> None:
        """Every file served is package data (so `pip install .` serves the page)."""
        import fnmatch
        import tomllib

        setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
        patterns = setuptools["package-data"]["imserver.http"]
        for name in FILES:
            self.assertTrue(any(fnmatch.fnmatch(f"static/{name}", p) for p in patterns), name)
            self.assertTrue((STATIC / name).is_file(), name)


class ServedByServerTests(TestCase):
    """C{twistd -n imserver} serves the page and knows its WebSocket port."""

    def test_served(self) -> None:
        server = ServerProcess().start()
        self.addCleanup(server.cleanup)
        base = f"http://127.0.0.1:{server.http_port}"
        with urllib.request.urlopen(base + "/") as r:
            self.assertEqual(r.read(), (STATIC / "index.html").read_bytes())
        with urllib.request.urlopen(base + "/v1/web/config") as r:
            config = json.load(r)
        self.assertEqual(config["websocket"], server.ws_url)
        self.assertEqual(config["recall_seconds"], 120)

    def test_websocket_off(self) -> None:
        server = ServerProcess({"server": {"websocket": ""}}).start()
        self.addCleanup(server.cleanup)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v1/web/config") as r:
            self.assertIsNone(json.load(r)["websocket"])


# ---------------------------------------------------------------------------
# The bundle


def npm() -> str:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed; the web chat's bundle cannot be checked")
    return str(shutil.which("npm"))


def npm_install(directory: Path) -> None:
    """C{npm ci}, if the package has no node_modules yet or one older than its lock file."""
    installed = directory / "node_modules" / ".package-lock.json"
    lock = directory / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = subprocess.run(
        [npm(), "ci", "--no-audit", "--no-fund"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise AssertionError(f"npm ci in {directory} failed:\n{done.stdout}\n{done.stderr}")


class BundleTests(TestCase):
    timeout = 600

    def test_npm_test(self) -> None:
        """
        `npm test` in clients/web: the page's TypeScript checks, its unit
        tests (test/*.test.ts) pass, and imserver/http/static is what
        clients/web builds with clients/js as it is now.
        """
        npm_install(WEB)
        done = subprocess.run([npm(), "test"], cwd=WEB, capture_output=True, text=True, timeout=300)
        self.assertEqual(done.returncode, 0, f"{done.stdout}\n{done.stderr}")


# ---------------------------------------------------------------------------
# In a browser


def new_driver(width: int = 1280, height: int = 800, scale: float = 1) -> Any:
    new_driver_check()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--lang=en-US",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": False},
    )
    return driver


#: What the page shows, read in one script (no stale elements).
STATE_JS = """
const q = (s) => document.querySelector(s);
const conn = q('#conn');
const banner = q('#conn-banner');
return {
  state: conn ? conn.dataset.state : null,
  banner: banner && !banner.hidden ? banner.textContent : null,
  title: document.title,
  me: q('#me-name') ? q('#me-name').textContent : null,
  chat: q('#chat') && !q('#chat').hidden ? q('#chat-name').textContent : null,
  olderButton: !!(q('#load-older') && !q('#load-older').hidden),
  jump: !!(q('#jump') && !q('#jump').hidden),
  typing: !!q('#chat-typing'),
  convs: [...document.querySelectorAll('#conv-list .conv')].map((li) => ({
    peer: Number(li.dataset.peer),
    unread: Number(li.dataset.unread),
    name: li.querySelector('.conv-name').textContent,
    last: li.querySelector('.conv-last').textContent,
  })),
  msgs: [...document.querySelectorAll('#messages .msg')].map((m) => ({
    id: m.dataset.msgId || null,
    mine: m.classList.contains('mine'),
    status: m.dataset.status || null,
    recalled: m.classList.contains('recalled'),
    text: m.querySelector('.text') ? m.querySelector('.text').textContent : null,
  })),
};
"""


class Browser:
    """One user's browser, and what its page shows."""

    def __init__(self, test: TestCase, name: str, artifacts: Path, **size: Any) -> None:
        self.name = name
        self.artifacts = artifacts
        self.driver = new_driver(**size)
        test.addCleanup(self.quit)
        self.shots = 0

    def quit(self) -> None:
        try:
            self.dump_log()
        finally:
            self.driver.quit()

    def dump_log(self) -> None:
        try:
            entries = self.driver.get_log("browser")
        except Exception:
            return
        with open(self.artifacts / f"{self.name}-console.log", "a") as f:
            for entry in entries:
                f.write(f"{entry.get('level')} {entry.get('message')}\n")

    def open(self, url: str) -> None:
        self.driver.get(url)

    def page(self) -> dict[str, Any]:
        value: dict[str, Any] = self.driver.execute_script(STATE_JS)
        return value

    def wait(self, what: str, check: Callable[[dict[str, Any]], Any], timeout: float = WAIT) -> Any:
        """Poll the page until C{check(page)} is true; on timeout, a screenshot and the page."""
        deadline = time.monotonic() + timeout
        page: dict[str, Any] = {}
        while time.monotonic() < deadline:
            page = self.page()
            value = check(page)
            if value:
                return value
            time.sleep(0.1)
        shot = self.shot(f"timeout-{what.replace(' ', '-')}")
        raise AssertionError(
            f"{self.name}: {what} not seen within {timeout}s (screenshot {shot}):\n"
            + json.dumps(page, indent=1)
        )

    def live(self) -> None:
        self.wait("live", lambda p: p["state"] == "live")

    def conv(self, page: dict[str, Any], peer: int) -> dict[str, Any]:
        """The conversation list's entry for C{peer} ({} if it has none)."""
        found: dict[str, Any] = next((c for c in page["convs"] if c["peer"] == peer), {})
        return found

    def unread(self, page: dict[str, Any], peer: int) -> int | None:
        value: int | None = self.conv(page, peer).get("unread")
        return value

    def find(self, css: str, timeout: float = WAIT) -> Any:
        """The element, once the page shows it."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.wait import WebDriverWait

        located = expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
        return WebDriverWait(self.driver, timeout).until(located)

    def type(self, css: str, text: str) -> None:
        element = self.find(css)
        element.clear()
        element.send_keys(text)

    def say(self, text: str) -> None:
        """Type a message and press Enter."""
        from selenium.webdriver.common.keys import Keys

        self.find("#composer").send_keys(text, Keys.ENTER)

    def start_chat(self, uid: int) -> None:
        from selenium.webdriver.common.keys import Keys

        self.type("#new-peer", str(uid))
        self.find("#new-peer").send_keys(Keys.ENTER)

    def open_conv(self, peer: int) -> None:
        self.find(f'#conv-list .conv[data-peer="{peer}"]').click()

    def shot(self, label: str) -> str:
        self.shots += 1
        path = self.artifacts / f"{self.name}-{self.shots:02d}-{label}.png"
        self.driver.save_screenshot(str(path))
        return str(path)


def token_link(server: ServerProcess, uid: int) -> str:
    return f"http://127.0.0.1:{server.http_port}/#token={server.token(uid)}"


def cli_link(server: ServerProcess, uid: int) -> str:
    """What C{imserver token --uid UID --url} prints for this server."""
    cli = "import sys; from imserver.cli import main; sys.exit(main())"
    argv = ["token", "--uid", str(uid), "--url", "--config", server.config_path]
    done = subprocess.run(
        [sys.executable, "-c", cli, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise AssertionError(f"imserver token --url failed:\n{done.stderr}")
    link = done.stdout.strip()
    if not link.startswith(f"http://127.0.0.1:{server.http_port}/#token="):
        raise AssertionError(f"unexpected link {link!r}")
    return link


def texts(page: dict[str, Any], mine: bool | None = None) -> list[str]:
    return [m["text"] for m in page["msgs"] if mine is None or m["mine"] == mine]


def status_of(page: dict[str, Any], text: str) -> str | None:
    found = [m["status"] for m in page["msgs"] if m["text"] == text]
    return found[-1] if found else None


def shows(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda page: text in texts(page)


def shows_me(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda page: bool(page["me"] == name)


def statuses(page: dict[str, Any], sent: list[str]) -> list[str | None]:
    return [status_of(page, text) for text in sent]


AVATAR = "data:image/svg+xml;base64," + base64.b64encode(
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64">'
    b'<rect width="64" height="64" fill="#8b5cf6"/>'
    b'<circle cx="32" cy="25" r="12" fill="#f5f3ff"/>'
    b'<rect x="12" y="42" width="40" height="26" rx="13" fill="#f5f3ff"/></svg>'
).decode("ascii")


class BrowserCase(TestCase):
    """A server (C{sections} over the test default), and a directory for screenshots."""

    timeout = 600
    sections: dict[str, dict[str, Any]] = {}

    def setUp(self) -> None:
        new_driver_check()
        self.artifacts = Path(self.mktemp()).resolve()
        self.artifacts.mkdir(parents=True)
        print(f"\nweb chat screenshots: {self.artifacts}", file=sys.stderr)
        self.server = ServerProcess(self.sections).start()
        self.addCleanup(self.server.cleanup)


class BrowserTests(BrowserCase):
    def test_chat_receipts_unread_and_catch_up(self) -> None:
        """
        Alice and Bob chat; unread badges and sent / delivered / read are
        right; Bob closes his tab, Alice writes on, Bob comes back and
        catches up; the server dies, both pages say so, Alice writes while
        it is down, and it all arrives once it is back; Alice recalls.
        """
        alice, bob = 101, 102
        a = Browser(self, "alice", self.artifacts)
        b = Browser(self, "bob", self.artifacts)
        # Alice opens a link: signed in, and the token leaves the address bar.
        a.open(token_link(self.server, alice))
        a.live()
        self.assertNotIn("token", a.driver.current_url)
        # Bob pastes his token (after trying a bad one).
        b.open(f"http://127.0.0.1:{self.server.http_port}/")
        b.type("#token-input", "not-a-token")
        b.find("#sign-in").click()
        b.wait("refusal", lambda p: "not an imserver token" in b.find("#login-error").text)
        b.type("#token-input", self.server.token(bob))
        b.find("#sign-in").click()
        b.live()

        # Alice starts a chat with Bob's uid and writes.
        a.start_chat(bob)
        a.wait("chat open", lambda p: p["chat"] == f"User {bob}")
        hello = ["Hi Bob!", "Are you there?"]
        for text in hello:
            a.say(text)
        # Bob's page is open (its device acks): delivered, not read.
        a.wait(
            "delivered",
            lambda p: statuses(p, hello) == ["delivered"] * 2,
        )
        page = b.wait("badge 2", lambda p: b.unread(p, alice) == 2 and p)
        self.assertEqual(b.conv(page, alice)["last"], hello[-1])
        self.assertEqual(page["title"], "(2) imserver chat")
        b.shot("unread")
        # Bob opens it: read, and the badge goes.
        b.open_conv(alice)
        b.wait("history", lambda p: texts(p) == hello)
        a.wait(
            "read",
            lambda p: statuses(p, hello) == ["read"] * 2,
        )
        page = b.wait("no badge", lambda p: b.unread(p, alice) == 0 and p)
        self.assertEqual(page["title"], "imserver chat")
        b.say("Hello Alice, here I am.")
        # Alice has the conversation open: she reads it at once.
        a.wait("reply", lambda p: texts(p, mine=False) == ["Hello Alice, here I am."])
        b.wait("read by Alice", lambda p: status_of(p, "Hello Alice, here I am.") == "read")
        # Alice types: Bob sees it until her message comes.
        a.find("#composer").send_keys("Good")
        b.wait("typing", lambda p: p["typing"])
        a.say(", let me tell you something.")
        b.wait("typed", lambda p: texts(p)[-1] == "Good, let me tell you something.")
        b.wait("typing over", lambda p: not p["typing"])
        a.shot("chatting")

        # Bob closes his tab; Alice writes on.
        b.open("about:blank")
        missed = ["One.", "Two.", "Three, while you were away."]
        for text in missed:
            a.say(text)
        a.wait("sent", lambda p: statuses(p, missed) == ["sent"] * 3)
        a.shot("sent-while-bob-away")
        # Bob comes back (his token kept): three unread, caught up.
        b.open(f"http://127.0.0.1:{self.server.http_port}/")
        b.live()
        page = b.wait("badge 3", lambda p: b.unread(p, alice) == 3 and p)
        self.assertEqual(b.conv(page, alice)["last"], missed[-1])
        a.wait(
            "delivered after return",
            lambda p: statuses(p, missed) == ["delivered"] * 3,
        )
        b.shot("back-with-unread")
        b.open_conv(alice)
        b.wait("caught up", lambda p: texts(p)[-3:] == missed)
        a.wait("read after return", lambda p: statuses(p, missed) == ["read"] * 3)
        b.wait("no badge", lambda p: b.unread(p, alice) == 0)

        # The server dies: both pages say they are offline.
        self.server.kill()
        for browser in (a, b):
            browser.wait("offline", lambda p: p["state"] != "live" and p["banner"])
        queued = "Written while the server was down."
        a.say(queued)
        a.wait("queued", lambda p: status_of(p, queued) == "sending")
        a.shot("offline")
        self.server.start()
        for browser in (a, b):
            browser.live()
            browser.wait("banner gone", lambda p: p["banner"] is None)
        b.wait("queued message", lambda p: texts(p)[-1] == queued)
        a.wait("queued read", lambda p: status_of(p, queued) == "read")
        page = a.page()
        self.assertEqual(texts(page).count(queued), 1)
        page = b.wait("no badge, open", lambda p: b.unread(p, alice) == 0 and p)
        self.assertEqual(texts(page).count(queued), 1)

        # Alice recalls it (the button shows on hover).
        from selenium.webdriver.common.action_chains import ActionChains

        row = a.find("#messages .msg.mine:last-of-type")
        ActionChains(a.driver).move_to_element(row).perform()
        row.find_element("css selector", ".recall").click()
        a.wait("recalled", lambda p: p["msgs"][-1]["recalled"])
        b.wait("recalled for Bob", lambda p: p["msgs"][-1]["text"] == "Message recalled")
        self.assertTrue(b.page()["msgs"][-1]["recalled"])
        page = b.wait("preview", lambda p: b.conv(p, alice)["last"] == missed[-1] and p)
        self.assertEqual(b.conv(page, alice)["unread"], 0)
        self.assertEqual(page["title"], "imserver chat")
        b.shot("recalled")

        # A message queued while the server is down survives closing the tab:
        # the next visit sends it (from the SDK's outbox in localStorage), once.
        self.server.kill()
        a.wait("offline again", lambda p: p["state"] != "live")
        kept = "Queued, then the tab was closed."
        a.say(kept)
        a.wait("queued again", lambda p: status_of(p, kept) == "sending")
        a.open("about:blank")
        self.server.start()
        a.open(f"http://127.0.0.1:{self.server.http_port}/")
        a.live()
        b.wait("kept message", lambda p: texts(p)[-1] == kept)
        a.open_conv(bob)
        a.wait("kept, stored", lambda p: texts(p).count(kept) == 1 and status_of(p, kept) == "read")
        self.assertEqual(texts(b.page()).count(kept), 1)

    def test_history_paging_and_profile(self) -> None:
        """
        40 messages; Bob, on a new device, sees the newest page, then the
        older ones by scrolling up and by the button; Alice sets a nickname
        and an avatar, which Bob sees with her next message.
        """
        alice, bob = 201, 202
        a = Browser(self, "alice", self.artifacts)
        b = Browser(self, "bob", self.artifacts)
        # The link `imserver token --url` prints (README, "Web chat").
        a.open(cli_link(self.server, alice))
        b.open(token_link(self.server, bob))
        a.live()
        b.live()
        a.start_chat(bob)
        a.wait("chat open", lambda p: p["chat"] == f"User {bob}")
        sent = [f"message {i:02d}" for i in range(1, 41)]
        for text in sent:
            a.say(text)
        a.wait("all delivered", lambda p: statuses(p, sent) == ["delivered"] * 40)
        # Bob's page again, as a new device (no stream to replay): history pages.
        b.driver.execute_script(f"sessionStorage.removeItem('imserver.client.{bob}')")
        b.open(f"http://127.0.0.1:{self.server.http_port}/")
        b.live()
        b.wait("badge 40", lambda p: b.unread(p, alice) == 40)
        b.open_conv(alice)
        page = b.wait("newest page", lambda p: texts(p) == sent[-30:] and p["olderButton"] and p)
        b.driver.execute_script("document.getElementById('messages').scrollTop = 0")
        b.wait("older by scrolling", lambda p: texts(p) == sent and not p["olderButton"])
        b.shot("history")

        # Profile: nickname and avatar.
        a.find("#me").click()
        a.type("#profile-nickname", "Alice")
        a.type("#profile-avatar", AVATAR)
        a.find("#profile-save").click()
        a.wait("nickname", lambda p: p["me"] == "Alice")
        a.say("Now with a name.")
        page = b.wait("name", lambda p: b.conv(p, alice).get("name") == "Alice" and p)
        self.assertEqual(page["chat"], "Alice")
        # Bob is reading old messages: the new one does not move him, a button offers it.
        b.wait("jump button", lambda p: p["jump"] and texts(p)[-1] == "Now with a name.")
        b.find("#jump").click()
        b.wait("at the bottom", lambda p: not p["jump"])
        self.assertTrue(
            b.driver.execute_script("return !!document.querySelector('#chat-head .avatar img')")
        )
        b.shot("profile")

    def test_load_older_button(self) -> None:
        """
        The "Load older messages" button pages too: in a window tall enough
        for the newest page, where there is nothing to scroll.
        """
        alice, bob = 301, 302
        a = Browser(self, "alice", self.artifacts, height=1800)
        a.open(token_link(self.server, alice))
        a.live()
        b = Browser(self, "bob", self.artifacts)
        b.open(token_link(self.server, bob))
        b.live()
        b.open("about:blank")
        a.start_chat(bob)
        a.wait("chat open", lambda p: p["chat"] == f"User {bob}")
        sent = [f"line {i}" for i in range(1, 35)]
        for text in sent:
            a.say(text)
        a.wait("all sent", lambda p: statuses(p, sent) == ["sent"] * len(sent))
        # Alice's page as a new device: her history comes in pages.
        a.driver.execute_script(f"sessionStorage.removeItem('imserver.client.{alice}')")
        a.open(f"http://127.0.0.1:{self.server.http_port}/")
        a.live()
        a.wait("conversation", lambda p: a.conv(p, bob))
        a.open_conv(bob)
        a.wait("newest page", lambda p: texts(p) == sent[-30:] and p["olderButton"])
        fits = (
            "const m = document.getElementById('messages'); return m.scrollHeight <= m.clientHeight"
        )
        self.assertTrue(a.driver.execute_script(fits))
        a.find("#load-older").click()
        a.wait("all", lambda p: texts(p) == sent and not p["olderButton"])

    def test_kicked(self) -> None:
        """
        A page replaced by another login of its device says so, does not
        reconnect by itself, and connects again when asked.
        """
        from imserver.services.tokens import TokenService

        token = TokenService(self.server.secret).mint(
            601, now=time.time(), ttl_seconds=3600, device="laptop"
        )
        link = f"http://127.0.0.1:{self.server.http_port}/#token={token}"
        first = Browser(self, "first", self.artifacts)
        first.open(link)
        first.live()
        second = Browser(self, "second", self.artifacts)
        second.open(link)
        second.live()
        page = first.wait("kicked", lambda p: p["state"] == "kicked" and p)
        self.assertIn("signed in again elsewhere", page["banner"])
        first.shot("kicked")
        first.find("#reconnect").click()
        first.live()
        second.wait("kicked in turn", lambda p: p["state"] == "kicked")

    def test_config_retried(self) -> None:
        """While /v1/web/config cannot be fetched the page says so, and tries again."""
        a = Browser(self, "alice", self.artifacts)
        a.driver.execute_cdp_cmd("Network.enable", {})
        a.driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/web/config*"]})
        a.open(token_link(self.server, 701))
        a.wait("retrying", lambda p: "Cannot reach the server" in a.find("#login-error").text)
        a.driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        a.live()


class OriginTests(BrowserCase):
    sections = {"server": {"websocket_origins": ["http://localhost:*"]}}

    def test_origin_must_be_allowed(self) -> None:
        """
        With an origin allow-list the page's origin must be in it: opened
        from an origin it allows, it works; from another, it says why.
        """
        a = Browser(self, "alice", self.artifacts)
        token = self.server.token(401)
        a.open(f"http://127.0.0.1:{self.server.http_port}/#token={token}")
        a.wait("refused origin", lambda p: a.driver.find_elements("id", "config-problem"))
        self.assertIn("websocket_origins", a.find("#config-problem").text)
        a.shot("origin-refused")
        a.open(f"http://localhost:{self.server.http_port}/#token={token}")
        a.live()


class NoWebSocketTests(BrowserCase):
    sections = {"server": {"websocket": ""}}

    def test_page_says_so(self) -> None:
        a = Browser(self, "alice", self.artifacts)
        a.open(token_link(self.server, 501))
        a.wait("no websocket", lambda p: a.driver.find_elements("id", "config-problem"))
        self.assertIn("[server] websocket is off", a.find("#config-problem").text)


class DocsScreenshot(BrowserCase):
    def setUp(self) -> None:
        if not os.environ.get("IMSERVER_DOCS_SCREENSHOT"):
            raise SkipTest("set IMSERVER_DOCS_SCREENSHOT=1 to rewrite docs/images/webchat.png")
        super().setUp()

    def test_docs_screenshot(self) -> None:
        """docs/images/webchat.png: Alice talks with Bob; Carol waits."""
        alice, bob, carol = 42, 43, 44
        size = {"width": 1100, "height": 680, "scale": 2}
        a = Browser(self, "alice", self.artifacts, **size)
        b = Browser(self, "bob", self.artifacts, **size)
        c = Browser(self, "carol", self.artifacts, **size)
        for browser, uid in ((a, alice), (b, bob), (c, carol)):
            browser.open(token_link(self.server, uid))
            browser.live()
        for browser, name in ((a, "Alice"), (b, "Bob"), (c, "Carol")):
            browser.find("#me").click()
            browser.type("#profile-nickname", name)
            if browser is a:
                browser.type("#profile-avatar", AVATAR)
            browser.find("#profile-save").click()
            browser.wait("nickname", shows_me(name))
        c.start_chat(alice)
        c.wait("chat", lambda p: p["chat"] == "Alice")
        c.say("Lunch at noon?")
        c.say("The usual place.")
        b.start_chat(alice)
        b.wait("chat", lambda p: p["chat"] == "Alice")
        b.say("Hi Alice! Did the deploy go out?")
        a.wait("bob", lambda p: a.conv(p, bob))
        a.open_conv(bob)
        script = [
            (a, "It did — the WebSocket listener is live on 7001."),
            (b, "Nice. The web chat reconnects by itself if it drops?"),
            (a, "Yes: it backs off, catches up, and resends what you typed meanwhile."),
            (b, "And read receipts?"),
        ]
        for who, text in script:
            who.say(text)
            other = a if who is b else b
            other.wait("arrived", shows(text))
        b.wait("read", lambda p: status_of(p, "And read receipts?") == "read")
        a.say("Sent ✓, delivered ✓✓, read: blue ✓✓.")
        a.wait(
            "delivered",
            lambda p: status_of(p, "Sent ✓, delivered ✓✓, read: blue ✓✓.") in ("delivered", "read"),
        )
        a.wait("carol's badge", lambda p: a.unread(p, carol) == 2)
        a.find("#composer").click()
        path = ROOT / "docs" / "images" / "webchat.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        a.driver.save_screenshot(str(path))
        print(f"\nwrote {path}", file=sys.stderr)


def new_driver_check() -> None:
    """Skip (or fail in CI) before starting a server when there is no browser."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        unavailable("selenium is not installed (pip install selenium)")
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            unavailable(f"{what} is not installed ({path})")
    if not (STATIC / "app.js").is_file():
        raise AssertionError("imserver/http/static/app.js is missing: npm run build in clients/web")
