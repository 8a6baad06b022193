"""
The layers stay visible (docs/architecture.md): imports point down only.

Read from the source (no imports run): each module's C{imserver.*} imports,
type-checking-only ones included, checked against the layer order. A new
edge that points up fails here with the file and the import.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import TestCase

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "imserver")

#: The layers, lowest first; a module may import its own layer and lower ones.
#: Modules at the package's top level that are not named are shared helpers
#: (errors, config, batching, ...): anything may import them, and they import
#: no layer.
LAYERS = ("wire", "storage", "services", "chat", "gateway", "http", "server")

#: What the layers below allow beyond the order (each with why).
ALLOWED = {
    # The HTTP API sits beside the gateway, not above it: it serves the web
    # chat's config (the WebSocket path, the origin check).
    ("http", "gateway"),
    # The metrics collector reads the assembled server (type-checking only);
    # everything that composes it is the server's.
    ("metrics", "server"),
}

#: The SDK and the terminal chat speak only the wire: a client must not pull
#: in the server.
CLIENT_MAY_IMPORT = {"client", "wire", "errors", "wstransport"}

#: Entry points: they may import anything.
ENTRY_POINTS = {"server", "cli", "tap", "supervisor", "__init__"}


def _edges() -> list[tuple[str, str, str]]:
    """(importing top-level name, imported top-level name, where) for each import."""
    edges = []
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, PACKAGE)
            source = relative.split(os.sep)[0].removesuffix(".py")
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    parts = module.split(".")
                    if parts[0] == "imserver" and len(parts) > 1 and parts[1] != source:
                        edges.append((source, parts[1], f"{relative}:{node.lineno}"))
    return edges


def _violations() -> list[str]:
    bad = []
    for source, target, where in _edges():
        if source in ENTRY_POINTS or (source, target) in ALLOWED:
            continue
        if source == "client":
            if target not in CLIENT_MAY_IMPORT:
                bad.append(f"{where}: the client imports imserver.{target}")
            continue
        if target in LAYERS and (
            source not in LAYERS or LAYERS.index(target) > LAYERS.index(source)
        ):
            bad.append(f"{where}: {source} imports imserver.{target} (points up)")
    return bad


class LayerTests(TestCase):
    def test_imports_point_down(self) -> None:
        self.assertEqual(_violations(), [])

    def test_the_check_sees_edges(self) -> None:
        # The walk finds what it checks: the gateway uses the wire and the
        # business layer, the server composes everything.
        edges = {(source, target) for source, target, _ in _edges()}
        self.assertIn(("gateway", "wire"), edges)
        self.assertIn(("gateway", "chat"), edges)
        self.assertIn(("server", "gateway"), edges)
        self.assertIn(("client", "wire"), edges)
