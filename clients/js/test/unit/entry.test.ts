/**
 * The browser entry point imports nothing from Node: walk its import graph
 * in the built files and look for node: modules and the ws package.
 */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const SRC = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "src");

function imports(file: string): string[] {
  const text = readFileSync(file, "utf8");
  return [...text.matchAll(/(?:^|\n)\s*(?:import|export)[^"']*?from\s*["']([^"']+)["']/g)].map((m) => m[1]!);
}

function graph(entry: string): { files: Set<string>; packages: Set<string> } {
  const files = new Set<string>();
  const packages = new Set<string>();
  const todo = [join(SRC, entry)];
  while (todo.length > 0) {
    const file = todo.pop()!;
    if (files.has(file)) continue;
    files.add(file);
    for (const spec of imports(file)) {
      if (spec.startsWith(".")) todo.push(resolve(dirname(file), spec));
      else packages.add(spec);
    }
  }
  return { files, packages };
}

test("@imserver/client (index.js) is browser-safe", () => {
  const { files, packages } = graph("index.js");
  assert.ok(files.size >= 8);
  assert.deepEqual([...packages], ["@msgpack/msgpack"]);
});

test("@imserver/client/node adds node:net, node:tls and ws", () => {
  const { packages } = graph("node.js");
  assert.deepEqual([...packages].sort(), ["@msgpack/msgpack", "node:net", "node:tls", "ws"]);
});

test("the package's exports map points at the built entry points", async () => {
  const pkg = JSON.parse(readFileSync(join(SRC, "..", "..", "package.json"), "utf8"));
  assert.equal(pkg.name, "@imserver/client");
  assert.equal(pkg.type, "module");
  assert.equal(pkg.exports["."].default, "./dist/src/index.js");
  assert.equal(pkg.exports["./node"].default, "./dist/src/node.js");
  const core = await import("../../src/index.js");
  const node = await import("../../src/node.js");
  for (const name of ["Client", "ImError", "MemoryStore", "LocalStorageStore", "Connection", "encodeBody", "decodeBody"]) {
    assert.ok(name in core, name);
    assert.ok(name in node, name);
  }
  assert.ok("nodeConnector" in node && "connectTcp" in node);
  assert.ok(!("nodeConnector" in core));
  assert.throws(() => new core.Client({ url: "tcp://127.0.0.1:7000", token: "t" }), /node/);
});
