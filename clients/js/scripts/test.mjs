// Runs the built tests (dist/test/**/*.test.js) with node's test runner, one
// file at a time (the end-to-end files start servers). Node 20 has its
// WHATWG WebSocket (the browser's API) behind a flag: it is turned on, so the
// browser entry point is tested over the platform's WebSocket too.
// Usage: node scripts/test.mjs [dir-or-file ...] (default: dist/test)
import { spawnSync } from "node:child_process";
import { readdirSync, statSync } from "node:fs";
import { join } from "node:path";

function walk(path) {
  if (!statSync(path).isDirectory()) return [path];
  return readdirSync(path).flatMap((name) => walk(join(path, name)));
}

const roots = process.argv.length > 2 ? process.argv.slice(2) : ["dist/test"];
const files = roots.flatMap(walk).filter((f) => f.endsWith(".test.js")).sort();
const args = [];
if (
  typeof globalThis.WebSocket !== "function" &&
  process.allowedNodeEnvironmentFlags.has("--experimental-websocket")
) {
  args.push("--experimental-websocket");
}
args.push("--test", "--test-concurrency=1", ...files);
const result = spawnSync(process.execPath, args, { stdio: "inherit" });
process.exit(result.status ?? 1);
