"""
End-to-end: C{twistd -n imserver} as a subprocess, spoken to over TCP exactly
as docs/protocol.md describes (auth, ping, kick, goaway and every documented
error of the connection layer).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import jwt
import msgpack
from twisted.trial.unittest import TestCase

from imserver.client import RequestFailed
from tests.harness import REPO, BackendUnavailable, ServerProcess, port_open
from tests.support import ClientsMixin, within


class ConnectionE2ETests(ClientsMixin, TestCase):
    # One server for the class, started on first use (trial has no
    # setUpClass); the harness kills it at exit.
    _server: ServerProcess | None = None

    @property
    def server(self) -> ServerProcess:
        cls = type(self)
        if cls._server is None or not cls._server.running:
            cls._server = ServerProcess().start()
        return cls._server

    async def test_token_from_the_cli_authenticates(self) -> None:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "imserver.cli",
                "token",
                "--uid",
                "42",
                "--config",
                self.server.config_path,
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        client = await self.client(self.server.endpoint)
        reply = await within(client.auth(out.stdout.strip(), device="test"))
        self.assertEqual(reply["uid"], 42)
        self.assertEqual(reply["heartbeat"], 30.0)
        self.assertLess(abs(reply["server_time"] / 1000 - time.time()), 5)
        pong = await within(client.request("ping"))
        self.assertEqual(set(pong), {"t", "id", "server_time"})

    async def test_second_login_kicks_the_first(self) -> None:
        first = await self.client(self.server.endpoint, self.server.token(7))
        second = await self.client(self.server.endpoint, self.server.token(7))
        self.assertEqual(await within(first.next_push()), {"t": "kick", "reason": "replaced"})
        await within(first.closed)
        await within(second.request("ping"))

    async def assertClosedWith(self, code: str, *frames: bytes) -> None:
        client = await self.client(self.server.endpoint)
        for frame in frames:
            client.send_raw(frame)
        error = await within(client.next_push())
        self.assertEqual(error["code"], code)
        await within(client.closed)

    async def test_frame_too_large(self) -> None:
        await self.assertClosedWith("frame_too_large", struct.pack(">I", 65537) + b"\x80")

    async def test_zero_length_frame(self) -> None:
        await self.assertClosedWith("frame_too_large", struct.pack(">I", 0))

    async def test_op_before_auth(self) -> None:
        client = await self.client(self.server.endpoint)
        with self.assertRaises(RequestFailed) as e:
            await within(client.request("ping"))
        self.assertEqual(e.exception.code, "unauthenticated")
        await within(client.closed)

    async def assertAuthFailed(self, token: str) -> None:
        client = await self.client(self.server.endpoint)
        with self.assertRaises(RequestFailed) as e:
            await within(client.auth(token))
        self.assertEqual(e.exception.code, "auth_failed")
        await within(client.closed)

    async def test_bad_tokens(self) -> None:
        secret = self.server.secret
        await self.assertAuthFailed("garbage")
        await self.assertAuthFailed(
            jwt.encode(
                {"sub": "1", "exp": int(time.time()) + 60}, "another-secret-entirely-0123456789ab"
            )
        )
        await self.assertAuthFailed(jwt.encode({"sub": "1", "exp": int(time.time()) - 1}, secret))
        await self.assertAuthFailed(
            jwt.encode({"sub": "1", "exp": int(time.time()) + 60}, None, algorithm="none")
        )
        await self.assertAuthFailed(jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, secret))

    async def test_non_map_body_keeps_the_connection(self) -> None:
        client = await self.client(self.server.endpoint, self.server.token(8))
        body = msgpack.packb([1, 2, 3])
        client.send_raw(struct.pack(">I", len(body)) + body)
        error = await within(client.next_push())
        self.assertEqual((error["t"], error["code"]), ("error", "bad_frame"))
        self.assertNotIn("id", error)
        await within(client.request("ping"))

    async def test_unknown_op(self) -> None:
        client = await self.client(self.server.endpoint, self.server.token(9))
        with self.assertRaises(RequestFailed) as e:
            await within(client.request("teleport"))
        self.assertEqual(e.exception.code, "unknown_op")
        await within(client.request("ping"))


class LifecycleE2ETests(ClientsMixin, TestCase):
    async def test_goaway_on_sigterm_then_clean_exit(self) -> None:
        server = ServerProcess().start()
        self.addCleanup(server.cleanup)
        client = await self.client(server.endpoint, server.token(1))
        server.signal(signal.SIGTERM)
        self.assertEqual(await within(client.next_push()), {"t": "goaway", "reason": "shutdown"})
        await within(client.closed)
        # twistd re-raises the signal after a graceful shutdown.
        self.assertEqual(server.stop(), -signal.SIGTERM)
        self.assertIn("imserver stopped", server.log())

    async def test_json_lines_logging(self) -> None:
        server = ServerProcess()
        self.addCleanup(server.cleanup)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        env = dict(os.environ, PYTHONPATH=REPO)
        server._spawn(
            [
                twistd,
                "-n",
                "--pidfile=",
                "--logger=imserver.logs.json",
                "imserver",
                "--config",
                server.config_path,
            ],
            env=env,
        )
        deadline = time.monotonic() + 30
        while "ready (config" not in server.log():
            self.assertTrue(server.running, server.log())
            self.assertLess(time.monotonic(), deadline, server.log())
            time.sleep(0.05)
        server.stop()
        events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        [ready] = [e for e in events if "ready (config" in e.get("log_format", "")]
        self.assertEqual(ready["node_id"], 1)
        self.assertEqual(ready["hot"], "embedded")

    async def test_bad_config_fails_to_start_with_the_key_named(self) -> None:
        server = ServerProcess({"server": {"node_id": 4096}})
        self.addCleanup(server.cleanup)
        with self.assertRaises(BackendUnavailable):
            server.start(timeout=20)
        self.assertNotEqual(server.stop(), 0)
        self.assertIn("[server].node_id", server.log())

    async def test_unreachable_database_fails_start_with_status_1(self) -> None:
        server = ServerProcess({"storage": {"sql": "mysql://root@127.0.0.1:1/nothing"}})
        self.addCleanup(server.cleanup)
        with self.assertRaises(BackendUnavailable):
            server.start(timeout=30)
        self.assertEqual(server.proc.wait(30) if server.proc else None, 1)
        self.assertIn("failed to start", server.log())

    def test_embedded_default_without_config(self) -> None:
        """The README's first command: no config, SQLite in the working directory."""
        if port_open(7000):
            self.skipTest("port 7000 is taken on this machine")
        server = ServerProcess()
        self.addCleanup(server.cleanup)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        env = dict(os.environ, PYTHONPATH=REPO)
        server._spawn([twistd, "-n", "--pidfile=", "imserver"], env=env)
        deadline = time.monotonic() + 30
        while "ready (config <embedded>" not in server.log():
            self.assertTrue(server.running, server.log())
            self.assertLess(time.monotonic(), deadline, server.log())
            time.sleep(0.05)
        self.assertTrue(port_open(7000))
        self.assertTrue(os.path.exists(os.path.join(server.dir, "imserver.db")))
        self.assertEqual(server.stop(), -signal.SIGTERM)
        self.assertIn("imserver stopped", server.log())
