/**
 * The protocol test vectors (docs/vectors/, see its README): requests are
 * encoded byte for byte (by the codec and by the Client's methods), replies
 * and pushes decode to the vectors' values with ids as bigint, pushes reach
 * the right event, and the malformed bodies the server answers bad_frame are
 * refused by the decoder too.
 */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { Client } from "../../src/client.js";
import { CodecError, type Frame, decodeBody, encodeBody } from "../../src/codec.js";
import { encodeFrame } from "../../src/framing.js";
import type { Connector } from "../../src/transport.js";
import type { EventName } from "../../src/types.js";
import { FakeClock, FakeServer, flush } from "./fakes.js";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "..", "..");
const DIR = join(REPO, "docs", "vectors");

interface Vector {
  name: string;
  exact?: boolean;
  frame: unknown;
  hex: string;
  body_hex: string | null;
  reply?: { t: string; code: string; id?: number };
  state?: string;
}

function load(name: string): Vector[] {
  const file = JSON.parse(readFileSync(join(DIR, `${name}.json`), "utf8")) as { format: number; vectors: Vector[] };
  assert.equal(file.format, 1);
  return file.vectors;
}

/** The README's reader: $int -> bigint, $float -> number, $bin -> bytes. */
function value(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(value);
  if (v === null || typeof v !== "object") return v;
  const keys = Object.keys(v);
  const o = v as Record<string, unknown>;
  if (keys.length === 1 && keys[0] === "$int") return BigInt(o.$int as string);
  if (keys.length === 1 && keys[0] === "$float") return o.$float;
  if (keys.length === 1 && keys[0] === "$bin") return Uint8Array.from(Buffer.from(o.$bin as string, "hex"));
  return Object.fromEntries(keys.map((k) => [k, value(o[k])]));
}

const IDS = new Set(["msg_id", "session_id", "msg_ids", "last_msg_id", "up_to", "peer_read", "peer_delivered", "after"]);

/** What the SDK should give: ids (by field name, outside bodies) as bigint, the rest as in the vector. */
function expected(v: unknown, key?: string): unknown {
  if (key === "body") return v;
  if (key !== undefined && IDS.has(key)) {
    if (Array.isArray(v)) return v.map((x) => BigInt(x as number));
    return typeof v === "number" || typeof v === "bigint" ? BigInt(v) : v;
  }
  if (Array.isArray(v)) return v.map((x) => expected(x));
  if (v !== null && typeof v === "object" && !(v instanceof Uint8Array)) {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, expected(x, k)]));
  }
  return v;
}

const hex = (b: Uint8Array): string => Buffer.from(b).toString("hex");
const bytes = (h: string): Uint8Array => Uint8Array.from(Buffer.from(h, "hex"));

test("requests: the codec encodes every vector byte for byte", () => {
  const vectors = load("requests");
  assert.ok(vectors.length >= 30);
  for (const v of vectors) {
    assert.equal(v.exact, true);
    const frame = value(v.frame) as Frame;
    const body = encodeBody(frame);
    assert.equal(hex(body), v.body_hex, v.name);
    assert.equal(hex(encodeFrame(body)), v.hex, v.name);
  }
});

/** A live Client on a fake server that records the raw bodies it is sent. */
async function liveClient(): Promise<{ client: Client; raw: Uint8Array[]; server: FakeServer; clock: FakeClock }> {
  const server = new FakeServer();
  server.handlers = new Proxy(
    {},
    { get: (_t, op) => (op === "auth" || op === "catchup" || op === "sync" ? undefined : () => ({})) },
  );
  const raw: Uint8Array[] = [];
  const recording: Connector = async (url, handlers) => {
    const t = await server.connector(url, handlers);
    return {
      send: (body) => {
        raw.push(body);
        t.send(body);
      },
      close: () => t.close(),
    };
  };
  const clock = new FakeClock();
  const client = new Client({ url: "ws://x/v1/ws", token: "tok", device: "iphone-15", client: "app/2.3", connector: recording, timers: clock });
  await client.start();
  await clock.advance(0);
  assert.equal(client.state, "live");
  return { client, raw, server, clock };
}

type Call = (c: Client, f: Record<string, any>) => Promise<unknown>;

const CALLS: Record<string, Call> = {
  ping: (c) => c.ping(),
  send: (c, f) => c.send(f.to, f.body, f.type),
  read: (c, f) => c.read(f.session_id, f.msg_id),
  unread: (c) => c.unread(),
  convs: (c, f) => c.convs({ before: f.before, limit: f.limit }),
  history: (c, f) => c.history({ limit: f.limit, before: f.before, session_id: f.session_id, peer: f.peer }),
  recall: (c, f) => c.recall(f.msg_id),
  profile: (c, f) => c.profile(f.uids),
  set_profile: (c, f) => c.setProfile({ presence: f.presence, avatar: f.avatar, nickname: f.nickname }),
  devices: (c) => c.devices(),
  logout_device: (c, f) => c.logoutDevice(f.device),
  block: (c, f) => c.block(f.uid),
  unblock: (c, f) => c.unblock(f.uid),
  blocked: (c, f) => c.blocked({ limit: f.limit, after: f.after }),
  mute: (c, f) => c.mute(f.session_id, f.until),
  edit: (c, f) => c.edit(f.msg_id, f.body),
  hide: (c, f) => c.hide(f.msg_ids),
  clear: (c, f) => c.clear(f.session_id),
  presence: (c, f) => c.presence(f.uids),
  watch: (c, f) => c.watch(f.uids),
  typing: (c, f) => c.typing(f.to, f.active),
  offline_summary: (c) => c.request("offline_summary"),
};

test("requests: the Client's methods send the vectors' bytes (but for id and cid)", async () => {
  let checked = 0;
  for (const v of load("requests")) {
    const frame = value(v.frame) as Record<string, unknown>;
    const call = CALLS[frame.t as string];
    if (call === undefined || /^ping\/id-/.test(v.name)) continue;
    const { client, raw, clock } = await liveClient();
    const before = raw.length;
    const done = call(client, frame);
    await clock.advance(0);
    await done;
    const sent = raw.slice(before).map((b) => ({ b, f: decodeBody(b) }));
    const mine = sent.find((s) => s.f.t === frame.t);
    assert.ok(mine, v.name);
    const want: Frame = { ...frame, id: mine.f.id };
    if ("cid" in frame) want.cid = mine.f.cid;
    assert.equal(hex(mine.b), hex(encodeBody(want)), v.name);
    client.close();
    checked++;
  }
  assert.ok(checked >= 25, `${checked} checked`);
});

test("requests: auth, catchup and ack as the Client sends them have the vectors' field order", async () => {
  const vectors = new Map(load("requests").map((v) => [v.name, value(v.frame) as Frame]));
  const { raw, client, server, clock } = await liveClient();
  server.socket.push({ t: "msg", msg_id: 1n, session_id: 2n, from: 7, to: 42, cid: "c", type: "text", body: "x", ts: 1, seq: 1 });
  await clock.advance(1000);
  const frames = raw.map(decodeBody);
  const keys = (op: string): string[] => Object.keys(frames.find((f) => f.t === op)!);
  assert.deepEqual(keys("auth"), Object.keys(vectors.get("auth")!));
  assert.deepEqual(keys("catchup"), Object.keys(vectors.get("catchup")!));
  const ack = frames.find((f) => f.t === "ack")!;
  assert.deepEqual(Object.keys(ack), ["t", "id", "msg_ids", "seq"]);
  client.close();
});

test("replies and pushes decode to the vectors' values, ids as bigint", () => {
  for (const file of ["replies", "pushes"]) {
    const vectors = load(file);
    assert.ok(vectors.length >= 15);
    for (const v of vectors) {
      const decoded = decodeBody(bytes(v.body_hex!));
      assert.deepEqual(decoded, expected(value(v.frame)), `${file}: ${v.name}`);
      assert.deepEqual(decodeBody(bytes(v.hex.slice(8))), decoded);
      assert.equal(parseInt(v.hex.slice(0, 8), 16), v.body_hex!.length / 2);
    }
  }
});

const EVENT_OF: Record<string, EventName> = {
  msg: "message",
  read: "read",
  recall: "recall",
  edit: "edit",
  delivered: "delivered",
  hide: "hide",
  clear: "clear",
  mute: "mute",
  typing: "typing",
  presence: "presence",
  profile: "profile",
  block: "block",
  kick: "kick",
};

test("every push vector reaches its event (and the push event)", async () => {
  const seen = new Set<string>();
  for (const v of load("pushes")) {
    const frame = decodeBody(bytes(v.body_hex!));
    const t = frame.t as string;
    const name = EVENT_OF[t];
    const { client, server, clock } = await liveClient();
    const got: unknown[] = [];
    const pushes: unknown[] = [];
    if (name !== undefined) client.on(name, (e) => got.push(e));
    client.on("push", (e) => pushes.push(e));
    server.socket.push(frame);
    await clock.advance(0);
    await flush();
    assert.equal(pushes.length, 1, v.name);
    if (name !== undefined) {
      assert.equal(got.length, 1, `${v.name} -> ${name}`);
      const e = got[0] as Record<string, unknown>;
      if (name === "message" || name === "edit") {
        assert.equal((e.msg as Record<string, unknown>).msg_id, frame.msg_id, v.name);
      } else {
        for (const [k, x] of Object.entries(frame)) if (k !== "t") assert.deepEqual(e[k], x, `${v.name}.${k}`);
      }
      seen.add(t);
    }
    client.close();
  }
  for (const t of Object.keys(EVENT_OF)) assert.ok(seen.has(t), `no push vector for ${t}`);
});

test("malformed: what the server answers bad_frame, the decoder refuses too", () => {
  let refused = 0;
  for (const v of load("malformed")) {
    if (v.body_hex === null) continue;
    if (v.reply!.code === "bad_frame") {
      assert.throws(() => decodeBody(bytes(v.body_hex!)), CodecError, v.name);
      refused++;
    } else {
      assert.equal(typeof decodeBody(bytes(v.body_hex!)), "object", v.name);
    }
  }
  assert.ok(refused >= 8);
});
