/**
 * A real `twistd -n imserver` for the integration tests, on free loopback
 * ports with SQLite in a temporary directory (like tests/harness.py's
 * ServerProcess). twistd comes from $IMSERVER_TWISTD, else from
 * $IMSERVER_PYTHON (default python3) running twisted.scripts.twistd; the
 * checkout is put first on PYTHONPATH so the server is this checkout's.
 */

import { type ChildProcess, spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** dist/test/integration -> clients/js -> the repository. */
const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "..", "..");

export const SECRET = "js-test-secret-0123456789-abcdefghij";
export const ADMIN_KEY = "js-admin-key-0123456789";

export function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const srv = net.createServer();
    srv.once("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => ok(port));
    });
  });
}

function portOpen(port: number): Promise<boolean> {
  return new Promise((ok) => {
    const s = net.connect({ host: "127.0.0.1", port });
    s.once("connect", () => {
      s.destroy();
      ok(true);
    });
    s.once("error", () => ok(false));
  });
}

function b64url(data: Buffer | string): string {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 JWT as the server wants it: sub = the uid as a string, exp. */
export function mintToken(
  uid: number,
  options: { secret?: string; ttl?: number; device?: string } = {},
): string {
  const now = Math.floor(Date.now() / 1000);
  const claims: Record<string, unknown> = {
    sub: String(uid),
    iat: now,
    exp: now + (options.ttl ?? 3600),
  };
  if (options.device !== undefined) claims.device = options.device;
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", options.secret ?? SECRET)
    .update(`${head}.${body}`)
    .digest("base64url");
  return `${head}.${body}.${sig}`;
}

function twistdCommand(): string[] {
  const twistd = process.env.IMSERVER_TWISTD;
  if (twistd) return [twistd];
  const python = process.env.IMSERVER_PYTHON || "python3";
  // `python -m twisted` is `twist`; twistd is this entry point.
  return [python, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"];
}

export interface ServerOptions {
  /** Extra TOML lines per section, e.g. {server: ['heartbeat_seconds = 2']}. */
  extra?: Record<string, string[]>;
}

export class ServerProcess {
  readonly dir = mkdtempSync(join(tmpdir(), "imserver-js-"));
  port = 0;
  wsPort = 0;
  httpPort = 0;
  private proc: ChildProcess | undefined;
  private log = "";
  private exited: Promise<void> = Promise.resolve();

  constructor(private readonly options: ServerOptions = {}) {}

  get tcpUrl(): string {
    return `tcp://127.0.0.1:${this.port}`;
  }

  get wsUrl(): string {
    return `ws://127.0.0.1:${this.wsPort}/v1/ws`;
  }

  get output(): string {
    return this.log;
  }

  token(uid: number, options: { ttl?: number; device?: string } = {}): string {
    return mintToken(uid, options);
  }

  private writeConfig(): string {
    const sections: Record<string, string[]> = {
      server: [
        `listen = "tcp:${this.port}:interface=127.0.0.1"`,
        `http = "tcp:${this.httpPort}:interface=127.0.0.1"`,
        `websocket = "tcp:${this.wsPort}:interface=127.0.0.1"`,
      ],
      auth: [`secret = "${SECRET}"`, `admin_key = "${ADMIN_KEY}"`],
      storage: [`sql = "sqlite:${join(this.dir, "im.db")}"`],
    };
    for (const [name, lines] of Object.entries(this.options.extra ?? {})) {
      sections[name] = [...(sections[name] ?? []), ...lines];
    }
    const text = Object.entries(sections)
      .map(([name, lines]) => `[${name}]\n${lines.join("\n")}\n`)
      .join("\n");
    const path = join(this.dir, "imserver.toml");
    writeFileSync(path, text);
    return path;
  }

  /** Start (again, on the same ports and database); resolves once it listens. */
  async start(timeoutMs = 60_000): Promise<this> {
    if (this.port === 0) {
      this.port = await freePort();
      this.wsPort = await freePort();
      this.httpPort = await freePort();
    }
    const config = this.writeConfig();
    const [cmd, ...args] = twistdCommand();
    const env = { ...process.env };
    env.PYTHONPATH = REPO + (env.PYTHONPATH ? `:${env.PYTHONPATH}` : "");
    const offset = this.log.length;
    const proc = spawn(cmd!, [...args, "-n", "--pidfile=", "imserver", "--config", config], {
      cwd: this.dir,
      env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.proc = proc;
    // Never leave a server behind, whatever ends this test process.
    const reap = (): void => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    };
    process.once("exit", reap);
    proc.once("exit", () => process.removeListener("exit", reap));
    let exitCode: number | null | undefined;
    this.exited = new Promise((ok) => {
      proc.once("exit", (code) => {
        exitCode = code;
        ok();
      });
      proc.once("error", (e) => {
        this.log += `spawn failed: ${e.message}\n`;
        exitCode = -1;
        ok();
      });
    });
    proc.stdout!.on("data", (d: Buffer) => (this.log += d.toString()));
    proc.stderr!.on("data", (d: Buffer) => (this.log += d.toString()));
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (exitCode !== undefined) {
        throw new Error(`imserver exited early (${exitCode}):\n${this.log.slice(-4000)}`);
      }
      if (
        this.log.slice(offset).includes("ready (config") &&
        (await portOpen(this.port)) &&
        (await portOpen(this.wsPort))
      ) {
        return this;
      }
      if (Date.now() > deadline) {
        throw new Error(`imserver did not start in ${timeoutMs} ms:\n${this.log.slice(-4000)}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** SIGTERM (a graceful shutdown: goaway), then wait; SIGKILL after 20 s. */
  async stop(): Promise<void> {
    const proc = this.proc;
    if (proc === undefined || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill("SIGTERM");
    const timer = setTimeout(() => proc.kill("SIGKILL"), 20_000);
    await this.exited;
    clearTimeout(timer);
  }

  /** SIGKILL: a crash. */
  async kill(): Promise<void> {
    const proc = this.proc;
    if (proc === undefined || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill("SIGKILL");
    await this.exited;
  }

  async cleanup(): Promise<void> {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Poll until `predicate` holds (generous: the machine may be loaded). */
export async function waitFor(
  predicate: () => boolean,
  what: string,
  timeoutMs = 30_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
