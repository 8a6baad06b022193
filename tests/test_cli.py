"""The imserver console script: token and migrate."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from imserver.config import DEV_SECRET
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
