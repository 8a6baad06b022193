// Runs the page's unit tests (test/*.test.ts): esbuild compiles each to a
// temporary directory, then `node --test` runs them.

import { build } from "esbuild";
import { spawnSync } from "node:child_process";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const tests = (await readdir(path.join(here, "test"))).filter((f) => f.endsWith(".test.ts"));
const out = await mkdtemp(path.join(tmpdir(), "imserver-web-test-"));
try {
  await build({
    absWorkingDir: here,
    entryPoints: tests.map((f) => `test/${f}`),
    outdir: out,
    outExtension: { ".js": ".mjs" },
    bundle: true,
    platform: "node",
    format: "esm",
    target: ["node20"],
    logLevel: "warning",
  });
  const files = tests.map((f) => path.join(out, f.replace(/\.ts$/, ".mjs")));
  const run = spawnSync(process.execPath, ["--test", ...files], { stdio: "inherit" });
  process.exitCode = run.status ?? 1;
} finally {
  await rm(out, { recursive: true, force: true });
}
