// Builds the web chat into imserver/http/static (index.html, app.js, app.css).
//
//   node build.mjs              build into imserver/http/static
//   node build.mjs --out DIR    build into DIR
//   node build.mjs --check      build into a temporary directory and fail if
//                               it differs from what is committed
//
// The SDK (@imserver/client) is bundled from its TypeScript source in
// clients/js/src, and its one dependency (@msgpack/msgpack) from this
// package's node_modules, so the bundle depends on this package's lock file
// alone (not on whether clients/js has its own node_modules).

import { build } from "esbuild";
import { copyFile, mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const sdk = path.resolve(here, "../js/src/index.ts");
const committed = path.resolve(here, "../../imserver/http/static");
export const FILES = ["index.html", "app.js", "app.css"];

/** Resolve the SDK to its source, and bare imports from this package. */
const resolveHere = {
  name: "resolve-here",
  setup(b) {
    b.onResolve({ filter: /^@imserver\/client$/ }, () => ({ path: sdk }));
    b.onResolve({ filter: /^[^./]/ }, async (args) => {
      if (args.pluginData === "here") return undefined;
      const found = await b.resolve(args.path, {
        kind: args.kind,
        resolveDir: here,
        pluginData: "here",
      });
      return found.errors.length ? undefined : found;
    });
  },
};

export async function buildInto(out) {
  await mkdir(out, { recursive: true });
  await build({
    absWorkingDir: here,
    entryPoints: ["src/main.ts"],
    outfile: path.join(out, "app.js"),
    bundle: true,
    format: "iife",
    platform: "browser",
    target: ["es2022"],
    charset: "utf8",
    legalComments: "none",
    minify: true,
    sourcemap: false,
    logLevel: "warning",
    plugins: [resolveHere],
  });
  await copyFile(path.join(here, "src/index.html"), path.join(out, "index.html"));
  await copyFile(path.join(here, "src/app.css"), path.join(out, "app.css"));
}

async function check() {
  const out = await mkdtemp(path.join(tmpdir(), "imserver-web-"));
  try {
    await buildInto(out);
    const stale = [];
    for (const name of FILES) {
      const fresh = await readFile(path.join(out, name));
      const kept = await readFile(path.join(committed, name)).catch(() => null);
      if (kept === null || !fresh.equals(kept)) stale.push(name);
    }
    if (stale.length) {
      console.error(
        `imserver/http/static is not what clients/web builds (${stale.join(", ")}): run npm run build in clients/web and commit it`,
      );
      process.exit(1);
    }
    console.log("imserver/http/static is up to date");
  } finally {
    await rm(out, { recursive: true, force: true });
  }
}

const args = process.argv.slice(2);
if (args[0] === "--check") {
  await check();
} else {
  const out = args[0] === "--out" && args[1] ? path.resolve(args[1]) : committed;
  await buildInto(out);
  console.log(`built ${FILES.join(", ")} into ${path.relative(process.cwd(), out) || "."}`);
}
