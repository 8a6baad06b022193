"""The imserver console script: token (and its web chat link) and migrate."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from urllib.parse import unquote, urlsplit

import twisted.test
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from imserver.cli import web_chat_url
from imserver.config import DEV_SECRET, parse_config
from imserver.services.tokens import InvalidToken, TokenService
from tests.harness import REPO, shared_mariadb, to_toml


def imserver(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imserver.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


class CliTests(SynchronousTestCase):
    def config(self, **storage: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(to_toml({"storage": storage}))
        return path

    def test_token_uses_the_configured_secret(self) -> None:
        out = imserver("token", "--uid", "42", "--ttl", "60")
        self.assertEqual(out.returncode, 0, out.stderr)
        uid = TokenService(DEV_SECRET).verify(out.stdout.strip(), now=time.time())
        self.assertEqual(uid, 42)
        self.assertRaises(
            InvalidToken, TokenService(DEV_SECRET).verify, out.stdout.strip(), now=time.time() + 61
        )

    def test_token_refuses_bad_uids(self) -> None:
        for uid in ("0", "-3", str(2**63)):
            out = imserver("token", "--uid", uid)
            self.assertNotEqual(out.returncode, 0)
            self.assertIn("--uid", out.stderr)

    def test_token_url_links_the_web_chat(self) -> None:
        """The embedded HTTP listener (tcp:7080 on loopback), the token in the fragment."""
        out = imserver("token", "--uid", "42", "--url")
        self.assertEqual(out.returncode, 0, out.stderr)
        url = urlsplit(out.stdout.strip())
        self.assertEqual((url.scheme, url.netloc, url.path), ("http", "127.0.0.1:7080", "/"))
        self.assertTrue(url.fragment.startswith("token="), url.fragment)
        token = unquote(url.fragment.removeprefix("token="))
        self.assertEqual(TokenService(DEV_SECRET).verify(token, now=time.time()), 42)

    def test_token_url_follows_the_http_endpoint(self) -> None:
        pem = FilePath(twisted.test.__file__).sibling("server.pem").path.replace(":", "\\:")
        cases = {
            "tcp:8080": "http://127.0.0.1:8080/",
            "tcp:8080:interface=0.0.0.0": "http://127.0.0.1:8080/",
            "tcp:8080:192.0.2.7": "http://192.0.2.7:8080/",
            "tcp:port=8081:interface=10.1.2.3": "http://10.1.2.3:8081/",
            "tcp6:8080:interface=\\:\\:1": "http://[::1]:8080/",
            "tcp6:8080": "http://[::1]:8080/",
            f"ssl:8443:privateKey={pem}:interface=127.0.0.1": "https://127.0.0.1:8443/",
            f"ssl:8443:privateKey={pem}": "https://127.0.0.1:8443/",
        }
        for desc, base in cases.items():
            config = parse_config({"server": {"http": desc}})
            self.assertEqual(web_chat_url(config, "a.b-c_d"), base + "#token=a.b-c_d", desc)

    def test_token_url_needs_an_http_listener(self) -> None:
        config = parse_config({"server": {"http": ""}})
        with self.assertRaises(SystemExit) as e:
            web_chat_url(config, "t")
        self.assertIn("[server] http", str(e.exception))

    def test_migrate_sqlite(self) -> None:
        path = self.config(sql="sqlite:" + os.path.abspath(self.mktemp()))
        first = imserver("migrate", "--config", path)
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn("applied migrations: [1", first.stdout)
        again = imserver("migrate", "--config", path)
        self.assertIn("schema is up to date", again.stdout)

    def test_migrate_mariadb(self) -> None:
        path = self.config(sql=shared_mariadb().fresh_database())
        out = imserver("migrate", "--config", path)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("applied migrations: [1", out.stdout)

    def test_bad_config_is_reported(self) -> None:
        path = self.config(sql="oracle://x")
        out = imserver("migrate", "--config", path)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("[storage].sql", out.stderr)
