"""
Configuration: one TOML file, parsed once into frozen attrs objects.

Every setting is declared once, with its default and its parser, by
L{setting}. Unknown sections or keys and bad values raise L{ConfigError}
naming the key (C{[server].node_id}), so a typo is a clear start-up error,
never a silently ignored line. With no file, L{Config.embedded} is used: the
development default (SQLite in the working directory, in-process hot store,
loopback listeners), the same values as C{conf/imserver.toml}.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.endpoints import serverFromString

DEV_SECRET = "imserver-development-secret-do-not-deploy"
DEV_ADMIN_KEY = "imserver-development-admin-key"
PLACEHOLDER = "REPLACE-WITH"

T = TypeVar("T")
Parser = Callable[[Any, str], Any]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


def setting(default: Any, parse: Parser) -> Any:
    """Declare a config key: its default (already parsed) and its parser."""
    return attrs.field(default=default, metadata={"parse": parse})


# ---------------------------------------------------------------------------
# Value parsers: (raw TOML value, "[section].key") -> parsed value


def int_in(lo: int, hi: int) -> Parser:
    def parse(value: Any, key: str) -> int:
        if type(value) is not int:
            raise ConfigError(f"{key} must be an integer, not {value!r}")
        if not lo <= value <= hi:
            raise ConfigError(f"{key} must be in {lo}..{hi}, not {value}")
        return value

    return parse


def number_in(lo: float, hi: float) -> Parser:
    def parse(value: Any, key: str) -> float:
        if type(value) not in (int, float):
            raise ConfigError(f"{key} must be a number, not {value!r}")
        if not lo <= value <= hi:
            raise ConfigError(f"{key} must be in {lo}..{hi}, not {value}")
        return float(value)

    return parse


def text(min_len: int = 1, max_len: int = 4096, pattern: str | None = None) -> Parser:
    def parse(value: Any, key: str) -> str:
        if type(value) is not str:
            raise ConfigError(f"{key} must be a string, not {value!r}")
        if not min_len <= len(value) <= max_len:
            raise ConfigError(f"{key} must have {min_len}..{max_len} characters")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise ConfigError(f"{key} must match {pattern}, not {value!r}")
        return value

    return parse


def choice(*options: str) -> Parser:
    def parse(value: Any, key: str) -> str:
        if value not in options:
            raise ConfigError(f"{key} must be one of {', '.join(options)}, not {value!r}")
        assert isinstance(value, str)
        return value

    return parse


def optional(inner: Parser) -> Parser:
    """Accept C{false} or C{""} as "disabled" (None); anything else goes to C{inner}."""

    def parse(value: Any, key: str) -> Any:
        if value is False or value == "":
            return None
        return inner(value, key)

    return parse


def existing_file(value: Any, key: str) -> str:
    path = text()(value, key)
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no such file {path!r}")
    return path


def endpoint(value: Any, key: str) -> str:
    """A Twisted server endpoint description, checked by parsing it."""
    desc = text()(value, key)
    try:
        serverFromString(None, desc)
    except Exception as e:
        raise ConfigError(f"{key}: bad endpoint {desc!r}: {e}") from None
    return desc


def endpoints(value: Any, key: str) -> tuple[str, ...]:
    """One endpoint description or a non-empty list of them."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{key} must be an endpoint string or a non-empty list of them")
    return tuple(endpoint(item, f"{key}[{i}]") for i, item in enumerate(items))


def origins(value: Any, key: str) -> tuple[str, ...]:
    """A list of Origin patterns (C{https://chat.example.com}, C{*} wildcards); empty: any."""
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ConfigError(f"{key} must be a list of origin patterns (strings)")
    return tuple(value)


@attrs.frozen
class SqliteTarget:
    path: str

    @property
    def kind(self) -> str:
        return "sqlite"


@attrs.frozen
class MysqlTarget:
    host: str
    port: int
    user: str
    password: str = attrs.field(repr=False)
    database: str

    @property
    def kind(self) -> str:
        return "mysql"


SqlTarget = SqliteTarget | MysqlTarget


def sql_target(value: Any, key: str) -> SqlTarget:
    """C{sqlite:PATH} or C{mysql://user:password@host:port/db}."""
    url = text()(value, key)
    if url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        if not path:
            raise ConfigError(f"{key}: sqlite needs a path, as in sqlite:imserver.db")
        return SqliteTarget(path)
    parts = urlsplit(url)
    if parts.scheme != "mysql":
        raise ConfigError(f"{key} must be sqlite:PATH or mysql://user:password@host:port/db")
    database = parts.path.lstrip("/")
    if not parts.hostname or not database or "/" in database:
        raise ConfigError(f"{key}: a mysql URL needs a host and a database name")
    try:
        port = parts.port or 3306
    except ValueError:
        raise ConfigError(f"{key}: bad port in {url!r}") from None
    return MysqlTarget(
        host=parts.hostname,
        port=port,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        database=database,
    )


@attrs.frozen
class RedisTarget:
    """One Redis server at a fixed address (which may float: a VIP, a proxy)."""

    host: str
    port: int
    db: int
    password: str | None = attrs.field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "redis"


@attrs.frozen
class RedisSentinelTarget:
    """
    The master of a Sentinel-monitored Redis service, asked of the
    sentinels before every connection (see docs/scaling.md).
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    #: Of the data nodes (master and replicas).
    password: str | None = attrs.field(default=None, repr=False)
    #: Of the sentinels themselves, if they have C{requirepass}.
    sentinel_password: str | None = attrs.field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "sentinel"


AnyRedisTarget = RedisTarget | RedisSentinelTarget

REDIS_URL_FORMS = (
    "redis://[:password@]host[:port][/db] or "
    "redis+sentinel://[:password@]host[:port][,host[:port]...]/service[/db]"
)
SENTINEL_PORT = 26379


def redis_target(value: Any, key: str) -> AnyRedisTarget:
    """C{redis://[:password@]host[:port][/db]} or a C{redis+sentinel://} URL."""
    url = text()(value, key)
    if url.startswith("redis+sentinel:"):
        return _sentinel_target(url, key)
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ConfigError(f"{key} must be {REDIS_URL_FORMS}")
    try:
        port = parts.port or 6379
        db = int(parts.path.lstrip("/") or 0)
    except ValueError:
        raise ConfigError(f"{key}: bad port or db in {url!r}") from None
    return RedisTarget(
        host=parts.hostname,
        port=port,
        db=db,
        password=unquote(parts.password) if parts.password else None,
    )


def _sentinel_target(url: str, key: str) -> RedisSentinelTarget:
    # Not urlsplit: it reads one host only, and a comma-separated list is
    # the usual way to name several sentinels (redis-py, Lettuce, ...).
    rest = url[len("redis+sentinel:") :]
    if not rest.startswith("//"):
        raise ConfigError(f"{key} must be {REDIS_URL_FORMS}")
    rest, _, query = rest[2:].partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if user and not colon:
            secret = user  # redis+sentinel://password@... is accepted too
        password = unquote(secret) or None
    sentinels = tuple(
        _host_port(item, f"{key}: sentinel {item!r}") for item in hosts.split(",") if item
    )
    if not sentinels:
        raise ConfigError(f"{key}: name at least one sentinel, as in {REDIS_URL_FORMS}")
    if len(set(sentinels)) != len(sentinels):
        raise ConfigError(f"{key}: a sentinel is listed twice")
    service, _, db_text = path.partition("/")
    service = unquote(service)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", service):
        raise ConfigError(
            f"{key}: a redis+sentinel URL needs the monitored service's name after the "
            f"sentinels (letters, digits, _ . -), as in {REDIS_URL_FORMS}"
        )
    if not re.fullmatch(r"[0-9]{0,5}", db_text):
        raise ConfigError(f"{key}: bad db {db_text!r} (a number, after the service name)")
    sentinel_password = None
    for name, _, item in (p.partition("=") for p in query.split("&") if p):
        if name != "sentinel_password":
            raise ConfigError(f"{key}: unknown option {name!r} (known: sentinel_password)")
        sentinel_password = unquote(item) or None
    return RedisSentinelTarget(
        sentinels=sentinels,
        service=service,
        db=int(db_text or 0),
        password=password,
        sentinel_password=sentinel_password,
    )


def _host_port(item: str, what: str) -> tuple[str, int]:
    """C{host}, C{host:port} or C{[v6]:port}; the port defaults to Sentinel's."""
    match = re.fullmatch(
        r"\[([0-9A-Fa-f:.]+)\](?::([0-9]+))?|([A-Za-z0-9_.-]+)(?::([0-9]+))?", item
    )
    if match is None:
        raise ConfigError(f"{what} is not host[:port]")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or SENTINEL_PORT)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} is out of range")
    return host, port


# ---------------------------------------------------------------------------
# Sections

EMBEDDED_LISTEN = ("tcp:7000:interface=127.0.0.1",)
EMBEDDED_HTTP = "tcp:7080:interface=127.0.0.1"
EMBEDDED_WEBSOCKET = "tcp:7001:interface=127.0.0.1"


@attrs.frozen
class ServerConfig:
    listen: tuple[str, ...] = setting(EMBEDDED_LISTEN, endpoints)
    http: str | None = setting(EMBEDDED_HTTP, optional(endpoint))
    # WebSocket listener (path /v1/ws, subprotocol imserver.v1); absent or "": off.
    websocket: str | None = setting(EMBEDDED_WEBSOCKET, optional(endpoint))
    # Origins a browser may connect to the WebSocket from (patterns, * wildcards);
    # empty: any origin (auth is by token in the first frame, never by cookie).
    websocket_origins: tuple[str, ...] = setting((), origins)
    node_id: int = setting(1, int_in(0, 1023))
    max_frame_bytes: int = setting(65536, int_in(64, 16 * 1024 * 1024))
    heartbeat_seconds: float = setting(30.0, number_in(1, 3600))
    idle_timeout_seconds: float = setting(90.0, number_in(1, 86400))
    auth_timeout_seconds: float = setting(10.0, number_in(0.1, 3600))
    # Backpressure: bytes a connection may have queued beyond the transport's
    # own buffer while the client is not reading, before it is dropped.
    max_outbound_bytes: int = setting(1024 * 1024, int_in(4096, 1024**3))
    shutdown_seconds: float = setting(10.0, number_in(0, 600))
    # Worker processes on this machine, each its own node (node_id + index),
    # sharing the listening ports (SO_REUSEPORT). More than one needs MySQL
    # and Redis, and plain tcp: listeners.
    workers: int = setting(1, int_in(1, 64))
    # A cluster node's users stay "online" this long after it dies.
    presence_ttl_seconds: float = setting(30.0, number_in(2, 3600))
    # Abuse limits (docs/protocol.md, "Limits"). Requests one connection may
    # have being handled; past it the server stops reading that client.
    max_in_flight: int = setting(32, int_in(1, 100_000))
    # Requests other than send and ack admitted to the business layer at once,
    # node-wide, taken round-robin by connection so one flood cannot starve others.
    max_concurrent_requests: int = setting(64, int_in(1, 100_000))
    # Connections that have not authenticated yet: in total, and per source
    # address (IPv6 by /64; loopback counts only in the total; 0: no per-address cap).
    max_unauthenticated: int = setting(10_000, int_in(1, 10_000_000))
    max_unauthenticated_per_address: int = setting(256, int_in(0, 10_000_000))
    # How long a Python thread may hold the GIL while another waits for it
    # (sys.setswitchinterval; CPython's own default is 5 ms). The reactor
    # waits up to this long behind a SQL thread's Python (PyMySQL parsing).
    # Set by twistd's start-up only (the process is the server's alone).
    gil_switch_interval_ms: float = setting(5.0, number_in(0.05, 100))


@attrs.frozen
class AuthConfig:
    secret: str = setting(DEV_SECRET, text(min_len=32))
    admin_key: str = setting(DEV_ADMIN_KEY, text(min_len=16))


@attrs.frozen
class StorageConfig:
    sql: SqlTarget = setting(SqliteTarget("imserver.db"), sql_target)
    redis: AnyRedisTarget | None = setting(None, optional(redis_target))
    key_prefix: str = setting("im", text(max_len=32, pattern=r"[A-Za-z0-9_.-]+"))
    # The embedded hot store (no redis): bytes its message cache may hold
    # (profiles: a quarter of it more). Unused with Redis (maxmemory there).
    embedded_cache_bytes: int = setting(128 * 1024 * 1024, int_in(1024 * 1024, 1024**4))


@attrs.frozen
class FilterConfig:
    words_file: str | None = setting(None, optional(existing_file))
    action: str = setting("reject", choice("reject", "mask"))


@attrs.frozen
class LimitsConfig:
    send_per_second: float = setting(20.0, number_in(0.001, 1e6))
    send_burst: int = setting(40, int_in(1, 1_000_000))
    recall_seconds: int = setting(120, int_in(0, 10 * 365 * 86400))
    max_body_bytes: int = setting(32768, int_in(16, 16 * 1024 * 1024))
    # A message may be edited by its sender for this long after it was sent.
    edit_seconds: int = setting(900, int_in(0, 10 * 365 * 86400))
    # typing pushes per connection (a token bucket): beyond it, rate_limited.
    typing_per_second: float = setting(2.0, number_in(0.001, 1e6))
    typing_burst: int = setting(5, int_in(1, 1_000_000))
    # Every other op that changes state or asks about other users (presence,
    # watch, block, unblock, edit, hide, clear, mute): one bucket per connection.
    social_per_second: float = setting(10.0, number_in(0.001, 1e6))
    social_burst: int = setting(30, int_in(1, 1_000_000))
    # Users one user may block.
    max_blocks: int = setting(10_000, int_in(1, 10_000_000))


@attrs.frozen
class DevicesConfig:
    """Several devices per user (docs/protocol.md, "Devices")."""

    # Devices of one user online at once; a login beyond it kicks the least
    # recently active one (1: one connection per user, as before devices).
    max_online: int = setting(5, int_in(1, 1000))
    # A device not seen for this long is forgotten (its catch-up position
    # with it): one that comes back is told to rebuild from convs/history.
    forget_days: float = setting(30.0, number_in(1, 3650))


def http_url(value: Any, key: str) -> str:
    url = text()(value, key)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key} must be an http:// or https:// URL, not {url!r}")
    return url


@attrs.frozen
class NotifyConfig:
    """Offline notifications: a webhook called for messages not acked in time."""

    webhook: str | None = setting(None, optional(http_url))
    delay_seconds: float = setting(5.0, number_in(0, 86400))
    max_attempts: int = setting(8, int_in(1, 100))
    secret: str = setting("", text(min_len=0, max_len=4096))
    timeout_seconds: float = setting(10.0, number_in(0.1, 300))


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "storage": StorageConfig,
    "filter": FilterConfig,
    "limits": LimitsConfig,
    "notify": NotifyConfig,
    "devices": DevicesConfig,
}


@attrs.frozen
class Config:
    server: ServerConfig = attrs.field(factory=ServerConfig)
    auth: AuthConfig = attrs.field(factory=AuthConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)
    filter: FilterConfig = attrs.field(factory=FilterConfig)
    limits: LimitsConfig = attrs.field(factory=LimitsConfig)
    notify: NotifyConfig = attrs.field(factory=NotifyConfig)
    devices: DevicesConfig = attrs.field(factory=DevicesConfig)
    source: str = attrs.field(default="<embedded>", eq=False)

    @classmethod
    def embedded(cls) -> Config:
        """The development default: the same values as C{conf/imserver.toml}."""
        return cls()

    def __attrs_post_init__(self) -> None:
        server = self.server
        if server.workers > 1:
            last = server.node_id + server.workers - 1
            if last > 1023:
                raise ConfigError(
                    f"[server].workers: node ids {server.node_id}..{last} go past 1023;"
                    " lower [server].node_id or [server].workers"
                )
            if self.storage.redis is None or self.storage.sql.kind != "mysql":
                raise ConfigError(
                    "[server].workers > 1 needs [storage].redis and a mysql:// [storage].sql "
                    "(the embedded default cannot be shared between processes)"
                )
            for desc in (*server.listen, server.http, server.websocket):
                if desc is not None and endpoint_args(desc)[0] not in ("tcp", "tcp6"):
                    raise ConfigError(
                        f"[server].workers > 1 shares ports with SO_REUSEPORT: {desc!r} must be "
                        "a tcp: or tcp6: endpoint (terminate TLS in front of the workers)"
                    )

    def check_deployable(self) -> None:
        """
        Refuse placeholder secrets, and the development secrets anywhere but
        on loopback.

        @raise ConfigError: naming the key.
        """
        if self.notify.webhook is not None and len(self.notify.secret) < 16:
            raise ConfigError(
                "[notify].secret must have at least 16 characters when [notify].webhook is set"
            )
        for name, value in (
            ("[auth].secret", self.auth.secret),
            ("[auth].admin_key", self.auth.admin_key),
            ("[notify].secret", self.notify.secret),
        ):
            if value.startswith(PLACEHOLDER):
                raise ConfigError(f"refusing to start: {name} is still a {PLACEHOLDER} placeholder")
        dev = [
            name
            for name, value, default in (
                ("[auth].secret", self.auth.secret, DEV_SECRET),
                ("[auth].admin_key", self.auth.admin_key, DEV_ADMIN_KEY),
            )
            if value == default
        ]
        if not dev:
            return
        public = [
            d
            for d in (*self.server.listen, self.server.http, self.server.websocket)
            if d and not is_loopback(d)
        ]
        if public:
            raise ConfigError(
                f"refusing to start: {' and '.join(dev)} still hold the development value "
                f"but {public[0]!r} is not a loopback interface; set your own secrets"
            )


def load_config(path: str | None) -> Config:
    """Read and check a TOML file; None gives the embedded default."""
    if path is None:
        return Config.embedded()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path!r} is not valid TOML: {e}") from None
    return parse_config(raw, source=path)


def parse_config(raw: Mapping[str, Any], source: str = "<string>") -> Config:
    sections: dict[str, Any] = {}
    for name, table in raw.items():
        cls = SECTIONS.get(name)
        if cls is None:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        sections[name] = _load_section(cls, name, table)
    return Config(**sections, source=source)


def _load_section(cls: Any, name: str, table: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in attrs.fields(cls)}
    values = {}
    for key, value in table.items():
        field = fields.get(key)
        if field is None:
            raise ConfigError(f"unknown key [{name}].{key}")
        values[key] = field.metadata["parse"](value, f"[{name}].{key}")
    return cls(**values)


def endpoint_args(desc: str) -> tuple[str, dict[str, str], list[str]]:
    """
    Split C{type:arg:key=value} on unescaped colons (Twisted's syntax):
    the type, the keyword arguments and the positional ones.
    """
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", desc)]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return parts[0], kwargs, [p for p in parts[1:] if "=" not in p]


def is_loopback(desc: str) -> bool:
    """Whether a server endpoint only accepts local connections."""
    kind, kwargs, positional = endpoint_args(desc)
    if kind in ("unix", "systemd"):
        return kind == "unix"
    iface = kwargs.get("interface", "")
    if not iface and kind in ("tcp", "tcp6") and len(positional) > 1:
        iface = positional[1]  # tcp:PORT:INTERFACE, as Twisted reads it
    if iface == "localhost":
        return True
    try:
        return ipaddress.ip_address(iface).is_loopback
    except ValueError:
        return False
