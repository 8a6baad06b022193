"""Configuration: parsing, validation, the shipped files, the twistd options."""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from imserver import tap
from imserver.config import (
    DEV_SECRET,
    Config,
    ConfigError,
    MysqlTarget,
    RedisTarget,
    SqliteTarget,
    is_loopback,
    load_config,
    parse_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_self_signed(directory: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class ParseTests(SynchronousTestCase):
    def assertRefused(self, raw: dict[str, Any], *fragments: str) -> None:
        with self.assertRaises(ConfigError) as e:
            parse_config(raw)
        for fragment in fragments:
            self.assertIn(fragment, str(e.exception))

    def test_workers_need_shared_backends_and_tcp_ports(self) -> None:
        shared = {"sql": "mysql://im:pw@db/im", "redis": "redis://r:6379/0"}
        config = parse_config({"server": {"workers": 4, "node_id": 8}, "storage": shared})
        self.assertEqual(config.server.workers, 4)
        self.assertRefused({"server": {"workers": 2}}, "[server].workers", "[storage].redis")
        self.assertRefused(
            {"server": {"workers": 2}, "storage": {"redis": "redis://r:6379/0"}},
            "mysql://",
        )
        self.assertRefused(
            {"server": {"workers": 4, "node_id": 1021}, "storage": shared}, "1021..1024"
        )
        self.assertRefused(
            {"server": {"workers": 2, "listen": "unix:/run/im.sock"}, "storage": shared},
            "'unix:/run/im.sock'",
            "tcp:",
        )
        self.assertRefused({"server": {"workers": 0}}, "[server].workers")
        self.assertRefused({"server": {"workers": 65}}, "[server].workers")

    def test_websocket(self) -> None:
        self.assertEqual(Config.embedded().server.websocket, "tcp:7001:interface=127.0.0.1")
        self.assertEqual(Config.embedded().server.websocket_origins, ())
        self.assertIsNone(parse_config({"server": {"websocket": ""}}).server.websocket)
        config = parse_config(
            {
                "server": {
                    "websocket": "tcp:7001:interface=127.0.0.1",
                    "websocket_origins": ["https://chat.example.com", "http://localhost:*"],
                }
            }
        )
        self.assertEqual(config.server.websocket, "tcp:7001:interface=127.0.0.1")
        self.assertEqual(
            config.server.websocket_origins, ("https://chat.example.com", "http://localhost:*")
        )
        self.assertRefused({"server": {"websocket": "bogus:1"}}, "[server].websocket")
        self.assertRefused(
            {"server": {"websocket_origins": "https://x.example"}}, "[server].websocket_origins"
        )
        self.assertRefused({"server": {"websocket_origins": [""]}}, "[server].websocket_origins")
        shared = {"sql": "mysql://im:pw@db/im", "redis": "redis://r:6379/0"}
        self.assertRefused(
            {
                "server": {"workers": 2, "websocket": "unix:/run/im-ws.sock"},
                "storage": shared,
            },
            "'unix:/run/im-ws.sock'",
            "tcp:",
        )

    def test_empty_file_is_the_embedded_default(self) -> None:
        self.assertEqual(parse_config({}), Config.embedded())

    def test_shipped_development_config_is_the_embedded_default(self) -> None:
        self.assertEqual(
            load_config(os.path.join(REPO, "conf", "imserver.toml")), Config.embedded()
        )

    def test_embedded_default(self) -> None:
        config = load_config(None)
        self.assertEqual(config.server.listen, ("tcp:7000:interface=127.0.0.1",))
        self.assertEqual(config.server.http, "tcp:7080:interface=127.0.0.1")
        self.assertEqual(config.storage.sql, SqliteTarget("imserver.db"))
        self.assertIsNone(config.storage.redis)
        config.check_deployable()

    def test_unknown_section_and_key(self) -> None:
        self.assertRefused({"servr": {}}, "[servr]")
        self.assertRefused({"server": {"nodeid": 3}}, "[server].nodeid")
        self.assertRefused({"server": 5}, "[server]")

    def test_bad_values_name_the_key(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"server": {"node_id": 1024}}, "[server].node_id"),
            ({"server": {"node_id": "1"}}, "[server].node_id"),
            ({"server": {"node_id": True}}, "[server].node_id"),
            ({"server": {"heartbeat_seconds": "30"}}, "[server].heartbeat_seconds"),
            ({"server": {"max_frame_bytes": 0}}, "[server].max_frame_bytes"),
            ({"server": {"listen": []}}, "[server].listen"),
            ({"server": {"listen": "bogus:1"}}, "[server].listen[0]"),
            ({"server": {"listen": ["tcp:1", 5]}}, "[server].listen[1]"),
            ({"auth": {"secret": "short"}}, "[auth].secret"),
            ({"storage": {"sql": "postgres://x/y"}}, "[storage].sql"),
            ({"storage": {"sql": "sqlite:"}}, "[storage].sql"),
            ({"storage": {"sql": "mysql://host"}}, "[storage].sql"),
            ({"storage": {"redis": "http://x"}}, "[storage].redis"),
            ({"storage": {"key_prefix": "a b"}}, "[storage].key_prefix"),
            ({"filter": {"action": "drop"}}, "[filter].action"),
            ({"filter": {"words_file": "/no/such/file"}}, "[filter].words_file"),
            ({"limits": {"send_burst": 0}}, "[limits].send_burst"),
        ]
        for raw, key in cases:
            self.assertRefused(raw, key)

    def test_listen_list(self) -> None:
        config = parse_config({"server": {"listen": ["tcp:1:interface=127.0.0.1", "unix:/tmp/s"]}})
        self.assertEqual(len(config.server.listen), 2)

    def test_http_can_be_disabled(self) -> None:
        self.assertIsNone(parse_config({"server": {"http": ""}}).server.http)
        self.assertIsNone(parse_config({"server": {"http": False}}).server.http)

    def test_urls(self) -> None:
        config = parse_config(
            {
                "storage": {
                    "sql": "mysql://im:p%40ss@db.example:3307/chat",
                    "redis": "redis://:pw@cache:6380/2",
                }
            }
        )
        self.assertEqual(config.storage.sql, MysqlTarget("db.example", 3307, "im", "p@ss", "chat"))
        self.assertEqual(config.storage.redis, RedisTarget("cache", 6380, 2, "pw"))
        self.assertNotIn("p@ss", repr(config))

    def test_config_file_errors(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[server\n")
        self.assertRaises(ConfigError, load_config, path)
        self.assertRaises(ConfigError, load_config, path + ".missing")


class DeployableTests(SynchronousTestCase):
    def test_dev_secret_refused_on_public_interfaces(self) -> None:
        for listen in ("tcp:7000", "tcp:7000:interface=0.0.0.0", "tcp:7000:interface=10.1.2.3"):
            config = parse_config({"server": {"listen": listen}})
            with self.assertRaises(ConfigError) as e:
                config.check_deployable()
            self.assertIn("[auth].secret", str(e.exception))

    def test_dev_secret_refused_when_only_http_is_public(self) -> None:
        config = parse_config({"server": {"http": "tcp:7080"}})
        self.assertRaises(ConfigError, config.check_deployable)

    def test_own_secrets_allowed_anywhere(self) -> None:
        parse_config(
            {
                "server": {"listen": "tcp:7000"},
                "auth": {"secret": "s" * 40, "admin_key": "k" * 20},
            }
        ).check_deployable()

    def test_loopback_detection(self) -> None:
        self.assertTrue(is_loopback("tcp:1:interface=127.0.0.1"))
        self.assertTrue(is_loopback("tcp:1:interface=localhost"))
        self.assertTrue(is_loopback(r"tcp6:1:interface=\:\:1"))
        self.assertTrue(is_loopback("unix:/run/im.sock"))
        self.assertFalse(is_loopback("tcp:1"))
        self.assertFalse(is_loopback(r"tcp6:1:interface=\:\:"))

    def test_production_example(self) -> None:
        """conf/imserver-production.toml is valid once its files exist, and its
        placeholders are refused."""
        with open(os.path.join(REPO, "conf", "imserver-production.toml")) as f:
            text = f.read()
        directory = self.mktemp()
        os.makedirs(directory)
        key, cert = write_self_signed(directory)
        words = os.path.join(directory, "words.txt")
        with open(words, "w") as f:
            f.write("badword\n")
        text = (
            text.replace("/etc/imserver/tls/key.pem", key)
            .replace("/etc/imserver/tls/cert.pem", cert)
            .replace("/etc/imserver/words.txt", words)
        )
        path = os.path.join(directory, "prod.toml")
        with open(path, "w") as f:
            f.write(text)
        config = load_config(path)
        self.assertIsInstance(config.storage.sql, MysqlTarget)
        self.assertIsNotNone(config.storage.redis)
        self.assertTrue(config.server.listen[0].startswith("ssl:"))
        with self.assertRaises(ConfigError) as e:
            config.check_deployable()
        self.assertIn("REPLACE-WITH", str(e.exception))


class TapOptionsTests(SynchronousTestCase):
    def test_config_errors_are_usage_errors(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[server]\nnode_id = 5000\n")
        options = tap.Options()
        with self.assertRaises(usage.UsageError) as e:
            options.parseOptions(["--config", path])
        self.assertIn("[server].node_id", str(e.exception))

    def test_worker_index(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                '[server]\nworkers = 2\n[storage]\nsql = "mysql://im:pw@db/im"\n'
                'redis = "redis://r:6379/0"\n'
            )
        options = tap.Options()
        options.parseOptions(["--config", path, "--worker-index", "1"])
        self.assertEqual(options["worker-index"], "1")
        for bad in ("2", "-1", "x"):
            with self.assertRaises(usage.UsageError) as e:
                tap.Options().parseOptions(["--config", path, "--worker-index", bad])
            self.assertIn("--worker-index must be in 0..1", str(e.exception))

    def test_no_config_is_the_embedded_default(self) -> None:
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["parsed"].auth.secret, DEV_SECRET)


class ListenBacklogTests(SynchronousTestCase):
    def test_shared_port_address(self) -> None:
        from imserver.listen import LISTEN_BACKLOG, reuse_port_address

        self.assertEqual(
            reuse_port_address("tcp:7000:interface=127.0.0.1"),
            (socket.AF_INET, "127.0.0.1", 7000, LISTEN_BACKLOG),
        )
        self.assertEqual(
            reuse_port_address("tcp:port=7000:backlog=64"),
            (socket.AF_INET, "0.0.0.0", 7000, 64),
        )
        self.assertEqual(
            reuse_port_address(r"tcp6:7000:interface=\:\:1"),
            (socket.AF_INET6, "::1", 7000, LISTEN_BACKLOG),
        )
        self.assertRaises(ValueError, reuse_port_address, "ssl:7443:privateKey=k.pem")

    def test_tcp_and_tls_listeners_get_a_large_backlog(self) -> None:
        from imserver.listen import LISTEN_BACKLOG, with_backlog

        self.assertEqual(
            with_backlog("tcp:7000:interface=127.0.0.1"),
            f"tcp:7000:interface=127.0.0.1:backlog={LISTEN_BACKLOG}",
        )
        self.assertEqual(
            with_backlog("ssl:7443:privateKey=k.pem"),
            f"ssl:7443:privateKey=k.pem:backlog={LISTEN_BACKLOG}",
        )
        self.assertEqual(with_backlog("tcp:7000:backlog=10"), "tcp:7000:backlog=10")
        self.assertEqual(with_backlog("unix:/run/im.sock"), "unix:/run/im.sock")
