"""
The C{imserver} command.

    imserver token --uid N [--ttl S] [--device D] [--url] [--config PATH]
                                                       print a client token (--url: a web chat link)
    imserver migrate [--config PATH]                   apply schema migrations
    imserver run [--config PATH]                       same as twistd -n imserver
    imserver chat --uid N | --token T [--url URL]      chat in the terminal
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from imserver.config import Config, ConfigError, endpoint_args, load_config
from imserver.services.tokens import TokenService


def _config(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        raise SystemExit(f"imserver: {e}") from None


def cmd_token(args: argparse.Namespace) -> int:
    config = _config(args.config)
    if not 1 <= args.uid <= 2**63 - 1:
        raise SystemExit("imserver: --uid must be a positive int64")
    if args.ttl <= 0:
        raise SystemExit("imserver: --ttl must be positive")
    tokens = TokenService(config.auth.secret)
    try:
        token = tokens.mint(args.uid, now=time.time(), ttl_seconds=args.ttl, device=args.device)
    except ValueError as e:
        raise SystemExit(f"imserver: {e}") from None
    print(web_chat_url(config, token) if args.url else token)
    return 0


def web_chat_url(config: Config, token: str) -> str:
    """
    The web chat's address on the C{[server] http} listener with the token in
    the fragment (C{#token=}): the page signs in with it, and a fragment is
    never sent to the server, so the token stays out of access logs.
    """
    desc = config.server.http
    if not desc:
        raise SystemExit("imserver: --url needs an HTTP listener ([server] http)")
    kind, kwargs, positional = endpoint_args(desc)
    if kind not in ("tcp", "tcp6", "ssl"):
        raise SystemExit(f"imserver: --url needs a tcp:, tcp6: or ssl: [server] http, not {desc!r}")
    port = kwargs.get("port") or (positional[0] if positional else "")
    host = kwargs.get("interface", "")
    if not host and kind in ("tcp", "tcp6") and len(positional) > 1:
        host = positional[1]  # tcp:PORT:INTERFACE, as Twisted reads it
    # Every interface (the default): loopback is one of them.
    if not host:
        host = "::" if kind == "tcp6" else "0.0.0.0"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    scheme = "https" if kind == "ssl" else "http"
    return f"{scheme}://{host}:{port}/#token={quote(token, safe='')}"


def cmd_migrate(args: argparse.Namespace) -> int:
    from twisted.internet import task

    from imserver.storage.sql.database import Database
    from imserver.storage.sql.engines import create_engine
    from imserver.storage.sql.migrate import migrate

    config = _config(args.config)

    async def run(reactor: Any) -> None:
        db = Database(reactor, create_engine(config.storage.sql), name="migrate")
        try:
            applied = await migrate(db, int(reactor.seconds() * 1000))
        finally:
            db.close()
        print(f"applied migrations: {applied}" if applied else "schema is up to date")

    task.react(lambda reactor: _as_deferred(run(reactor)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "-n", "imserver"] + (["--config", args.config] if args.config else [])
    run()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """C{imserver chat}: the terminal client, with a dev token minted from the config."""
    from imserver.client.terminal import default_state_path, token_uid, url_from_endpoint

    token: str | Callable[[], str]
    if args.token:
        uid = token_uid(args.token)
        if args.uid is not None and args.uid != uid:
            raise SystemExit(f"imserver: the token is for uid {uid}, not {args.uid}")
        token = args.token
    elif args.uid is not None:
        uid = args.uid
    else:
        raise SystemExit("imserver: give --uid (a dev token is minted) or --token")
    if not 1 <= uid <= 2**63 - 1:
        raise SystemExit("imserver: --uid must be a positive int64")
    url = args.url
    if not args.token or not url:
        config = _config(args.config)
        if not args.token:
            tokens = TokenService(config.auth.secret)
            token = lambda: tokens.mint(uid, now=time.time(), ttl_seconds=86400)  # noqa: E731
        if not url:
            try:
                url = url_from_endpoint(config.server.listen[0])
            except (ValueError, IndexError) as e:
                raise SystemExit(f"imserver: [server] listen: {e}") from None
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise SystemExit("imserver: chat needs a terminal")

    from twisted.internet import task

    from imserver.client.terminal.main import chat

    state = args.state or default_state_path(uid, url)
    task.react(lambda reactor: chat(reactor, uid, url, token, state, args))
    return 0


def _as_deferred(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imserver", description="imserver administration")
    sub = parser.add_subparsers(dest="command", required=True)

    token = sub.add_parser("token", help="mint a client token with the configured secret")
    token.add_argument("--uid", type=int, required=True)
    token.add_argument("--ttl", type=int, default=86400, help="seconds (default 86400)")
    token.add_argument("--device", help="bind the token to this device (its `device` claim)")
    token.add_argument(
        "--url",
        action="store_true",
        help="print a link to the web chat ([server] http) that signs in with the token",
    )
    token.add_argument("--config", help="TOML config (default: the embedded one)")
    token.set_defaults(func=cmd_token)

    mig = sub.add_parser("migrate", help="apply pending schema migrations")
    mig.add_argument("--config", help="TOML config (default: the embedded one)")
    mig.set_defaults(func=cmd_migrate)

    run = sub.add_parser("run", help="run the server in the foreground (twistd -n imserver)")
    run.add_argument("--config", help="TOML config (default: the embedded one)")
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="chat in the terminal (imserver.client.terminal)")
    chat.add_argument("--uid", type=int, help="dev: mint a token with the config's secret")
    chat.add_argument("--token", help="a token (instead of --uid)")
    chat.add_argument("--url", help="tcp://host:port or ws://... (default: [server] listen)")
    chat.add_argument("--config", help="TOML config (default: the embedded one)")
    chat.add_argument("--device", help="device name (default: one kept in the state file)")
    chat.add_argument("--state", help="state file (default: ~/.local/state/imserver/...)")
    chat.add_argument("--nick", help="set this nickname once connected")
    chat.add_argument("--log", help="append the client's log to this file")
    chat.set_defaults(func=cmd_chat)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
