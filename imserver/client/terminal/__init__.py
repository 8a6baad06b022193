"""
C{imserver chat}: a terminal chat client on L{imserver.client.Client}.

    imserver chat --uid 42                  # dev: mints its token from the config
    imserver chat --token T --url tcp://host:7000

The command line (config, dev tokens) is L{imserver.cli}'s: this package
speaks only the wire, through the SDK.

The pure part (L{model.ChatModel}: conversations, messages, input line, what
the screen shows) is apart from the terminal I/O (L{screen}) and from the
glue to the SDK (L{app.ChatApp}), so it is tested without a terminal.
"""

from __future__ import annotations

import os
import re


def url_from_endpoint(description: str) -> str:
    """C{tcp:7000:interface=127.0.0.1} (a server endpoint) -> C{tcp://127.0.0.1:7000}."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    kind, positional, named = parts[0], [], {}
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if eq:
            named[name] = value
        else:
            positional.append(part)
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"cannot connect to a {kind!r} listener: give --url")
    port = named.get("port") or (positional[0] if positional else "")
    if not port.isdigit():
        raise ValueError(f"no port in {description!r}: give --url")
    host = named.get("interface", "")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def token_uid(token: str) -> int:
    """The uid a token names (its C{sub}), read without checking the signature."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
        return int(claims["sub"])
    except (jwt.InvalidTokenError, KeyError, ValueError, TypeError):
        raise SystemExit("imserver: --token is not a token (no uid in it)") from None


def default_state_path(uid: int, url: str) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    where = re.sub(r"[^A-Za-z0-9.-]+", "_", url.split("://", 1)[-1]).strip("_")
    return os.path.join(base, "imserver", f"chat-{uid}-{where}.json")


__all__ = ["default_state_path", "token_uid", "url_from_endpoint"]
