/**
 * The Client's behaviour (docs/sdk.md) on a fake server and a fake clock.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { Client, type ClientOptions } from "../../src/client.js";
import type { Frame } from "../../src/codec.js";
import { ImError } from "../../src/errors.js";
import type { Connector } from "../../src/transport.js";
import { LocalStorageStore, MemoryStore, type StoredState } from "../../src/store.js";
import type { ClientEvents, EventName, StateEvent } from "../../src/types.js";
import { FakeClock, FakeServer, flush, msg } from "./fakes.js";

interface Setup {
  clock: FakeClock;
  server: FakeServer;
  client: Client;
  events: { name: EventName; event: unknown }[];
  states: StateEvent[];
  of<K extends EventName>(name: K): ClientEvents[K][];
}

function setup(options: Partial<ClientOptions> = {}, server = new FakeServer()): Setup {
  const clock = new FakeClock();
  let r = 0;
  const client = new Client({
    url: "ws://fake/v1/ws",
    token: "tok",
    device: "dev1",
    connector: server.connector,
    timers: clock,
    // Deterministic "random": 0.5, then 0.25, 0.75, ... (cids stay valid).
    random: () => [0.5, 0.25, 0.75][r++ % 3]!,
    ...options,
  });
  const events: { name: EventName; event: unknown }[] = [];
  const names: EventName[] = [
    "message", "read", "recall", "edit", "delivered", "hide", "clear", "mute", "typing",
    "presence", "profile", "block", "kick", "reset", "state",
  ];
  for (const name of names) client.on(name, (event) => events.push({ name, event }));
  const states: StateEvent[] = [];
  client.on("state", (e) => states.push(e));
  return {
    clock,
    server,
    client,
    events,
    states,
    of: <K extends EventName>(name: K) =>
      events.filter((e) => e.name === name).map((e) => e.event as ClientEvents[K]),
  };
}

async function live(s: Setup): Promise<void> {
  await s.client.start();
  await s.clock.advance(0);
  assert.equal(s.client.state, "live");
}

test("start: auth with device, client and since, catch-up, sync, then live", async () => {
  const s = setup();
  await live(s);
  const auth = s.server.of("auth")[0]!;
  assert.equal(auth.token, "tok");
  assert.equal(auth.device, "dev1");
  assert.match(String(auth.client), /^imserver-js\//);
  assert.equal(auth.since, 0);
  assert.deepEqual(
    s.server.requests.map((f) => f.t),
    ["auth", "catchup", "sync"],
  );
  assert.deepEqual(
    s.states.map((e) => e.state),
    ["connecting", "syncing", "live"],
  );
  assert.equal(s.client.uid, 42);
  await s.client.waitLive();
});

test("the token may be an async function, called before every connect", async () => {
  let n = 0;
  const s = setup({ token: async () => `t${++n}` });
  await live(s);
  s.server.socket.close();
  await s.clock.advance(1000);
  assert.deepEqual(
    s.server.of("auth").map((f) => f.token),
    ["t1", "t2"],
  );
});

test("a token function that throws a non-Error (undefined, a string) is retried like a failed connect", async () => {
  const unhandled: unknown[] = [];
  const onUnhandled = (e: unknown): void => void unhandled.push(e);
  process.on("unhandledRejection", onUnhandled);
  try {
    let n = 0;
    const token = (): string => {
      n++;
      if (n === 1) throw undefined;
      if (n === 2) throw "no token today";
      return "tok";
    };
    const s = setup({ token, random: () => 0.5, backoffBase: 1 });
    await s.client.start();
    await s.clock.advance(0);
    assert.deepEqual(s.states[s.states.length - 1], { state: "offline", reason: "cannot connect", retry_in: 0.5 });
    await s.clock.advance(500);
    assert.equal(s.states[s.states.length - 1]!.reason, "no token today");
    await s.clock.advance(1000);
    assert.equal(s.client.state, "live");
    await flush();
    assert.deepEqual(unhandled, []);
  } finally {
    process.off("unhandledRejection", onUnhandled);
  }
});

test("reconnects with full-jitter backoff, reset once live", async () => {
  const server = new FakeServer();
  server.refuse = true;
  const s = setup({ random: () => 1 - Number.EPSILON, backoffBase: 0.5, backoffMax: 4 }, server);
  await s.client.start();
  await s.clock.advance(0);
  const delays: number[] = [];
  for (let i = 0; i < 6; i++) {
    const offline = s.states[s.states.length - 1]!;
    assert.equal(offline.state, "offline");
    delays.push(Math.round(offline.retry_in! * 100) / 100);
    await s.clock.advance(offline.retry_in! * 1000);
  }
  assert.deepEqual(delays, [0.5, 1, 2, 4, 4, 4]);
  server.refuse = false;
  await s.clock.advance(4000);
  assert.equal(s.client.state, "live");
  server.socket.close();
  await s.clock.advance(0);
  assert.equal(s.states[s.states.length - 1]!.retry_in! < 0.51, true);
});

test("full jitter: the delay is drawn from [0, min(max, base * 2**attempt)]", async () => {
  const server = new FakeServer();
  server.refuse = true;
  const s = setup({ random: () => 0.25, backoffBase: 1, backoffMax: 30 }, server);
  await s.client.start();
  await s.clock.advance(0);
  assert.equal(s.states[s.states.length - 1]!.retry_in, 0.25);
  await s.clock.advance(250);
  assert.equal(s.states[s.states.length - 1]!.retry_in, 0.5);
  await s.clock.advance(500);
  assert.equal(s.states[s.states.length - 1]!.retry_in, 1);
  assert.equal(server.connects, 3);
});

test("connect timeout: a transport that never opens is given up after requestTimeout, then retried", async () => {
  let attempts = 0;
  const connector: Connector = () => {
    attempts++;
    return new Promise<never>(() => undefined); // a black-holed host
  };
  const s = setup({ connector, requestTimeout: 5, random: () => 0.5, backoffBase: 1 });
  await s.client.start();
  await s.clock.advance(4999);
  assert.equal(s.client.state, "connecting");
  await s.clock.advance(1);
  assert.deepEqual(s.states[s.states.length - 1], { state: "offline", reason: "connect timeout", retry_in: 0.5 });
  assert.equal(attempts, 1);
  await s.clock.advance(500);
  assert.equal(attempts, 2);
  assert.equal(s.client.state, "connecting");
});

test("connect timeout: connectTimeout also bounds the token function; a transport opening late is closed", async () => {
  const server = new FakeServer();
  let release: (() => void) | undefined;
  let transports = 0;
  let closedLate = 0;
  const connector: Connector = async (url, handlers) => {
    if (++transports === 1) await new Promise<void>((r) => (release = r));
    const transport = await server.connector(url, handlers);
    if (transports > 1) return transport;
    return { send: (b) => transport.send(b), close: () => (closedLate++, transport.close()) };
  };
  let tokens = 0;
  const token = (): Promise<string> => (++tokens === 1 ? new Promise<string>(() => undefined) : Promise.resolve("tok"));
  const s = setup({ connector, token, connectTimeout: 2, random: () => 0.5, backoffBase: 1 });
  await s.client.start();
  await s.clock.advance(2000);
  assert.equal(s.states[s.states.length - 1]!.reason, "connect timeout");
  assert.equal(transports, 0);
  await s.clock.advance(500);
  assert.equal(transports, 1);
  await s.clock.advance(2000);
  assert.equal(s.states[s.states.length - 1]!.reason, "connect timeout");
  release!();
  await flush();
  assert.equal(closedLate, 1);
  assert.equal(server.of("auth").length, 0);
  await s.clock.advance(1000);
  assert.equal(s.client.state, "live");
  assert.equal(server.of("auth").length, 1);
});

test("heartbeat: a ping after heartbeat idle seconds; an unanswered ping closes and reconnects", async () => {
  const server = new FakeServer();
  server.heartbeat = 20;
  const s = setup({ pingTimeout: 5 }, server);
  await live(s);
  await s.clock.advance(19_000);
  assert.equal(server.of("ping").length, 0);
  await s.clock.advance(1000);
  assert.equal(server.of("ping").length, 1);
  // Answered: the next one 20 s later.
  await s.clock.advance(20_000);
  assert.equal(server.of("ping").length, 2);
  server.handlers.ping = () => null;
  await s.clock.advance(20_000);
  assert.equal(server.of("ping").length, 3);
  const first = server.socket;
  await s.clock.advance(4_900);
  assert.equal(first.closed, false);
  await s.clock.advance(200);
  assert.equal(first.closed, true);
  assert.equal(s.client.state === "offline" || s.client.state === "live", true);
  await s.clock.advance(1000);
  assert.equal(server.sockets.length, 2);
  assert.equal(s.client.state, "live");
});

test("heartbeat: nothing received for heartbeat + ping_timeout counts as dead", async () => {
  const server = new FakeServer();
  server.heartbeat = 10;
  const s = setup({ pingTimeout: 5, requestTimeout: 60 }, server);
  await live(s);
  // The client keeps sending (so it never pings), the server never answers.
  server.handlers.unread = () => null;
  for (let i = 0; i < 3; i++) {
    void s.client.unread().catch(() => undefined);
    await s.clock.advance(4000);
  }
  assert.equal(server.sockets[0]!.closed, false);
  void s.client.unread().catch(() => undefined);
  await s.clock.advance(3100);
  assert.equal(server.sockets[0]!.closed, true);
});

test("kick: the state turns kicked, nothing reconnects, requests fail with kicked", async () => {
  const s = setup();
  await live(s);
  const waiting = assert.rejects(s.client.request("devices"), (e: unknown) => e instanceof ImError && e.code === "kicked");
  s.server.handlers.devices = () => null;
  await flush();
  s.server.socket.push({ t: "kick", reason: "replaced" });
  s.server.socket.close();
  await s.clock.advance(0);
  await waiting.catch(() => undefined);
  assert.deepEqual(s.of("kick"), [{ reason: "replaced" }]);
  assert.deepEqual(s.states[s.states.length - 1], { state: "kicked", reason: "replaced" });
  await s.clock.advance(600_000);
  assert.equal(s.server.connects, 1);
  await assert.rejects(s.client.ping(), (e: unknown) => e instanceof ImError && e.code === "kicked");
  await assert.rejects(s.client.waitLive(), (e: unknown) => e instanceof ImError && e.code === "kicked");
  await assert.rejects(s.client.send(7, "x"), (e: unknown) => e instanceof ImError && e.code === "kicked");
});

test("auth_failed: failed with a string token, retried with a function", async () => {
  const server = new FakeServer();
  server.handlers.auth = () => ({ error: "auth_failed" });
  const s = setup({}, server);
  await s.client.start();
  await s.clock.advance(0);
  assert.equal(s.client.state, "failed");
  await s.clock.advance(60_000);
  assert.equal(server.connects, 1);
  await assert.rejects(s.client.waitLive(), (e: unknown) => e instanceof ImError && e.code === "auth_failed");

  const server2 = new FakeServer();
  let calls = 0;
  server2.handlers.auth = () => (++calls < 3 ? { error: "auth_failed" } : undefined);
  const t = setup({ token: () => "fresh" }, server2);
  await t.client.start();
  await t.clock.advance(10_000);
  assert.equal(t.client.state, "live");
  assert.equal(server2.connects, 3);
  assert.deepEqual(
    t.states.filter((e) => e.state === "offline").map((e) => e.reason),
    ["auth_failed", "auth_failed"],
  );
});

test("goaway: a quick reconnect (0..1 s) that does not count as an attempt", async () => {
  const s = setup({ random: () => 0.9, backoffBase: 10 });
  await live(s);
  s.server.socket.push({ t: "goaway", reason: "shutdown" });
  s.server.socket.close();
  await s.clock.advance(0);
  const offline = s.states[s.states.length - 1]!;
  assert.equal(offline.state, "offline");
  assert.equal(offline.retry_in, 0.9);
  await s.clock.advance(900);
  assert.equal(s.client.state, "live");
  // Still the first attempt: a plain drop now waits base * 2**0 at most.
  s.server.socket.close();
  await s.clock.advance(0);
  assert.equal(s.states[s.states.length - 1]!.retry_in, 9);
});

test("catch-up after a reconnect: since, replayed events, ack {seq} per page; held pushes after", async () => {
  const server = new FakeServer();
  const s = setup({}, server);
  await live(s);
  // Live: msg seq 1 arrives.
  const m1 = msg({ from: 7, to: 42 });
  server.socket.push({ t: "msg", ...m1, seq: 1, unread: 1, total_unread: 1 });
  await s.clock.advance(1000);
  assert.equal(s.client.seq, 1);
  server.socket.close();
  // While away: seq 2 (msg), 3 (read) and 4 (recall) in two pages.
  const m2 = msg({ from: 7, to: 42 });
  server.head = 4;
  server.events = [
    { t: "msg", ...m1, seq: 1 },
    { t: "msg", ...m2, seq: 2 },
    { t: "read", session_id: m1.session_id, by: 7, msg_id: m1.msg_id, seq: 3 },
    { t: "recall", msg_id: m2.msg_id, session_id: m2.session_id, by: 7, seq: 4 },
  ];
  server.handlers.catchup = (req, sock) => {
    const after = Number(req.after);
    const page = server.events.filter((e) => (e.seq as number) > after).slice(0, 2);
    const seq = page.length ? (page[page.length - 1]!.seq as number) : after;
    // A push that arrives during catch-up waits until live.
    sock.push({ t: "typing", from: 7, active: true });
    return { events: page, seq, more: seq < 4 };
  };
  server.pending = [m1, m2];
  await s.clock.advance(1000);
  assert.equal(s.client.state, "live");
  const auth = server.of("auth")[1]!;
  assert.equal(auth.since, 1);
  const catchups = server.sockets[1]!.of("catchup");
  assert.deepEqual(
    catchups.map((f) => Number(f.after)),
    [1, 3],
  );
  const acks = server.sockets[1]!.of("ack");
  assert.deepEqual(
    acks.slice(0, 2).map((f) => f.seq),
    [3, 4],
  );
  // Then the ids sync returned again (still pending on the server), without a seq.
  assert.deepEqual(
    acks.slice(2).map((f) => f.seq),
    [undefined],
  );
  assert.deepEqual(
    s.of("message").map((e) => [e.msg.msg_id, e.replay]),
    [
      [m1.msg_id, false],
      [m2.msg_id, true],
    ],
  );
  assert.equal(s.of("read")[0]!.replay, true);
  assert.equal(s.of("recall")[0]!.msg_id, m2.msg_id);
  // The typing pushes came after the replayed events.
  const order = s.events.filter((e) => e.name !== "state").map((e) => e.name);
  assert.deepEqual(order.slice(-2), ["typing", "typing"]);
  assert.equal(order.indexOf("typing") > order.indexOf("recall"), true);
  assert.equal(s.client.seq, 4);
  // m2 came twice (catch-up and sync): emitted once, and acked.
  await s.clock.advance(1000);
  const ids = server.of("ack").flatMap((f) => (f.msg_ids as bigint[] | undefined) ?? []);
  assert.equal(ids.includes(m2.msg_id as bigint), true);
});

test("reset: the event, then the client goes on from the head", async () => {
  const store = new MemoryStore({ device: "dev1", seq: 50 });
  const server = new FakeServer();
  server.head = 10;
  server.handlers.auth = (req) => ({
    uid: 42, heartbeat: 30, server_time: 1, device: req.device, seq: 10, head: 10, new_device: false, reset: true,
  });
  const s = setup({ store }, server);
  await live(s);
  assert.equal(server.of("auth")[0]!.since, 50);
  assert.equal(s.of("reset").length, 1);
  assert.equal(s.client.seq, 10);
  assert.equal(Number(server.of("catchup")[0]!.after), 10);
});

test("de-duplication: by seq, by msg_id, edits by (msg_id, edited)", async () => {
  const s = setup();
  await live(s);
  const m = msg({ from: 7, to: 42 });
  const sock = s.server.socket;
  sock.push({ t: "msg", ...m, seq: 1 });
  sock.push({ t: "msg", ...m, seq: 1 });
  sock.push({ t: "msg", ...m }); // a replay without seq
  sock.push({ t: "edit", ...m, body: "v2", edited: 5, seq: 3 });
  sock.push({ t: "edit", ...m, body: "v1", edited: 4 }); // older, late
  sock.push({ t: "edit", ...m, body: "v2", edited: 5 }); // a repeated edit
  sock.push({ t: "recall", msg_id: m.msg_id, session_id: m.session_id, by: 7, seq: 2 });
  sock.push({ t: "recall", msg_id: m.msg_id, session_id: m.session_id, by: 7 }); // repeated recall
  await s.clock.advance(0);
  assert.equal(s.of("message").length, 1);
  assert.deepEqual(
    s.of("edit").map((e) => e.msg.body),
    ["v2"],
  );
  assert.equal(s.of("recall").length, 1);
  assert.equal(s.client.seq, 3);
});

test("an edit that overtakes its message: the message shows the newer body", async () => {
  const s = setup();
  await live(s);
  const m = msg({ from: 42, to: 7, body: "old" });
  s.server.socket.push({ t: "edit", ...m, body: "new", edited: 9, seq: 2 });
  s.server.socket.push({ t: "msg", ...m, seq: 1 });
  await s.clock.advance(0);
  assert.equal(s.of("message")[0]!.msg.body, "new");
});

test("acks: batched by time (1 s) with the contiguous seq; 100 ids go at once", async () => {
  const s = setup();
  await live(s);
  const sock = s.server.socket;
  const ms = [msg({ from: 7, to: 42 }), msg({ from: 7, to: 42 }), msg({ from: 42, to: 7 })];
  ms.forEach((m, i) => sock.push({ t: "msg", ...m, seq: i + 1 }));
  await s.clock.advance(900);
  assert.equal(sock.of("ack").length, 0);
  await s.clock.advance(100);
  // Only messages to me are acked; my own (from another device) are not.
  assert.deepEqual(sock.of("ack"), [{ t: "ack", id: sock.of("ack")[0]!.id, msg_ids: [ms[0]!.msg_id, ms[1]!.msg_id], seq: 3 }]);
  for (let i = 0; i < 100; i++) sock.push({ t: "msg", ...msg({ from: 7, to: 42 }), seq: 4 + i });
  await s.clock.advance(0);
  assert.equal(sock.of("ack").length, 2);
  assert.equal((sock.of("ack")[1]!.msg_ids as bigint[]).length, 100);
});

test("handlers run before the ack; a throwing handler does not stop the client", async () => {
  const errors: unknown[] = [];
  const s = setup({ onHandlerError: (e) => errors.push(e) });
  s.client.on("message", () => {
    throw new Error("app bug");
  });
  await live(s);
  s.server.socket.push({ t: "msg", ...msg({ from: 7, to: 42 }), seq: 1 });
  await s.clock.advance(1000);
  assert.equal(errors.length, 1);
  assert.equal(s.server.of("ack").length, 1);
  assert.equal(s.of("message").length, 1);
});

test("a seq gap open 3 s runs catchup {after: seq}; only the contiguous seq is acked", async () => {
  const server = new FakeServer();
  const s = setup({}, server);
  await live(s);
  const m1 = msg({ from: 7, to: 42 });
  const m2 = msg({ from: 7, to: 42 });
  const m3 = msg({ from: 7, to: 42 });
  server.socket.push({ t: "msg", ...m1, seq: 1 });
  server.socket.push({ t: "msg", ...m3, seq: 3 });
  await s.clock.advance(1000);
  assert.equal(s.client.seq, 1);
  assert.equal(server.of("ack")[0]!.seq, 1);
  server.head = 3;
  server.events = [
    { t: "msg", ...m2, seq: 2 },
    { t: "msg", ...m3, seq: 3 },
  ];
  await s.clock.advance(1900);
  assert.equal(server.of("catchup").length, 1);
  await s.clock.advance(100);
  assert.deepEqual(
    server.of("catchup").map((f) => Number(f.after)),
    [0, 1],
  );
  assert.equal(s.client.seq, 3);
  assert.deepEqual(
    s.of("message").map((e) => e.msg.msg_id),
    [m1.msg_id, m3.msg_id, m2.msg_id],
  );
});

test("a stream event of an unknown type counts for the seq (no gap) and is still a push", async () => {
  const s = setup();
  await live(s);
  const pushes: string[] = [];
  s.client.on("push", (f) => pushes.push(String(f.t)));
  s.server.socket.push({ t: "pin", session_id: 1n, seq: 1 });
  s.server.socket.push({ t: "read", session_id: 1n, by: 7, msg_id: 1n, seq: 2 });
  s.server.socket.push({ t: "pin", session_id: 1n, seq: 1 });
  await s.clock.advance(1500);
  assert.equal(s.client.seq, 2);
  const acks = s.server.of("ack");
  assert.equal(acks[acks.length - 1]?.seq, 2);
  assert.equal(s.server.of("catchup").length, 1);
  assert.deepEqual(pushes, ["pin", "read", "pin"]);
  assert.equal(s.of("read").length, 1);
});

test("a seq gap open at a reconnect starts no second catch-up on the new connection", async () => {
  const server = new FakeServer();
  const s = setup({ random: () => 0.5, backoffBase: 1 }, server);
  await live(s);
  s.server.socket.push({ t: "read", session_id: 1n, by: 7, msg_id: 1n, seq: 2 }); // seq 1 missing
  await s.clock.advance(1000);
  // The new connection's catch-up is left unanswered: it stays syncing.
  server.handlers.catchup = () => null;
  s.server.socket.close();
  await s.clock.advance(500);
  assert.equal(s.client.state, "syncing");
  assert.equal(s.server.socket.of("catchup").length, 1);
  await s.clock.advance(5000);
  assert.equal(s.server.socket.of("catchup").length, 1);
});

test("a sync push runs catch-up and sync again without reconnecting", async () => {
  const s = setup();
  await live(s);
  const m = msg({ from: 7, to: 42 });
  s.server.pending = [m];
  s.server.socket.push({ t: "sync" });
  await s.clock.advance(0);
  assert.equal(s.server.connects, 1);
  assert.equal(s.server.of("catchup").length, 2);
  assert.equal(s.server.of("sync").length, 2);
  assert.equal(s.of("message")[0]!.replay, true);
});

test("sync pages follow `after`, including a page of skipped entries", async () => {
  const server = new FakeServer();
  const m1 = msg({ from: 7, to: 42 });
  const m2 = msg({ from: 7, to: 42 });
  server.handlers.sync = (req) => {
    if (req.after === undefined) return { msgs: [m1], more: true };
    if (req.after === m1.msg_id) return { msgs: [], more: true, after: 999n };
    return { msgs: [m2], more: false };
  };
  const s = setup({}, server);
  await live(s);
  assert.deepEqual(
    server.of("sync").map((f) => f.after),
    [undefined, m1.msg_id, 999n],
  );
  assert.equal(s.of("message").length, 2);
});

test("outbox: one send at a time per peer, peers in parallel, cids <device>.<random>.<n>", async () => {
  const s = setup();
  await live(s);
  s.server.handlers.send = () => null;
  const a1 = s.client.send(7, "a1");
  const a2 = s.client.send(7, "a2", "note");
  const b1 = s.client.send(8, { x: 1 });
  await s.clock.advance(0);
  let sends = s.server.of("send");
  assert.deepEqual(
    sends.map((f) => f.body),
    ["a1", { x: 1 }],
  );
  assert.match(String(sends[0]!.cid), /^dev1\.[0-9a-z]{8}\.1$/);
  assert.match(String(sends[1]!.cid), /^dev1\.[0-9a-z]{8}\.3$/);
  assert.equal(s.client.outbox.length, 3);
  s.server.socket.reply(sends[0]!, { msg_id: 11n, session_id: 5n, ts: 1, dup: false, seq: 1 });
  await s.clock.advance(0);
  assert.deepEqual(await a1, { msg_id: 11n, session_id: 5n, ts: 1, dup: false, seq: 1 });
  sends = s.server.of("send");
  assert.equal(sends[2]!.body, "a2");
  assert.equal(sends[2]!.type, "note");
  assert.equal(s.client.seq, 1);
  s.server.socket.reply(sends[2]!, { msg_id: 12n, session_id: 5n, ts: 2, dup: false, seq: 2 });
  s.server.socket.reply(sends[1]!, { msg_id: 13n, session_id: 6n, ts: 3, dup: false, seq: 3 });
  assert.equal((await a2).msg_id, 12n);
  assert.equal((await b1).msg_id, 13n);
  assert.equal(s.client.outbox.length, 0);
  assert.equal(s.client.seq, 3);
});

test("outbox: a long device name still gives a cid of at most 64 characters", async () => {
  const s = setup({ device: "d".repeat(64) });
  await live(s);
  s.server.handlers.send = () => ({ msg_id: 1n, session_id: 1n, ts: 1, dup: false });
  await s.client.send(7, "x");
  const cid = String(s.server.of("send")[0]!.cid);
  assert.equal(cid.length <= 64, true);
});

test("outbox: retried with the same cid after unavailable/internal/rate_limited and a lost connection", async () => {
  const server = new FakeServer();
  const answers: (string | null)[] = ["unavailable", "internal", "rate_limited", null];
  server.handlers.send = () => {
    const a = answers.shift();
    if (a === undefined) return { msg_id: 20n, session_id: 5n, ts: 1, dup: true };
    return a === null ? null : { error: a };
  };
  const s = setup({ requestTimeout: 1000 }, server);
  await live(s);
  const sending = s.client.send(7, "hi");
  await s.clock.advance(0);
  await s.clock.advance(60_000);
  assert.equal(server.of("send").length, 4); // the fourth is unanswered
  server.socket.close();
  await s.clock.advance(60_000);
  const result = await sending;
  assert.equal(result.dup, true);
  const cids = new Set(server.of("send").map((f) => f.cid));
  assert.equal(server.of("send").length, 5);
  assert.equal(cids.size, 1);
});

test("outbox: other errors reject at once, and the next message goes", async () => {
  const server = new FakeServer();
  server.handlers.send = (req) => (req.body === "bad" ? { error: "forbidden", message: "blocked" } : { msg_id: 1n, session_id: 1n, ts: 1, dup: false });
  const s = setup({}, server);
  await live(s);
  const bad = s.client.send(7, "bad");
  const good = s.client.send(7, "good");
  await assert.rejects(bad, (e: unknown) => e instanceof ImError && e.code === "forbidden" && e.message === "blocked");
  assert.equal((await good).dup, false);
  assert.equal(server.of("send").length, 2);
});

test("outbox: kept in the store across restarts; close() rejects with closed", async () => {
  const store = new MemoryStore();
  const server = new FakeServer();
  server.handlers.send = () => null;
  const s = setup({ store }, server);
  await live(s);
  const sending = s.client.send(7, "persist me");
  const closed = assert.rejects(sending, (e: unknown) => e instanceof ImError && e.code === "closed");
  await s.clock.advance(0);
  s.client.close();
  await closed;
  assert.equal(s.client.state, "closed");
  await flush();
  assert.deepEqual(
    store.state?.outbox?.map((e) => e.body),
    ["persist me"],
  );
  const cid = store.state!.outbox![0]!.cid;

  const server2 = new FakeServer();
  const t = setup({ store }, server2);
  await live(t);
  assert.equal(server2.of("send")[0]!.cid, cid);
  await flush();
  assert.deepEqual(store.state?.outbox, []);
});

test("outbox: close() in the same tick as send() still leaves the entry in the store", async () => {
  const store = new MemoryStore();
  const server = new FakeServer();
  server.handlers.send = () => null;
  const s = setup({ store }, server);
  await live(s);
  s.client.send(7, "persist me").catch(() => undefined);
  s.client.close();
  await flush();
  assert.deepEqual(store.state?.outbox?.map((e) => e.body), ["persist me"]);
  assert.equal(store.state?.device, "dev1");
});

test("outbox: a kick right after a seq push (one pending save) keeps the stored outbox", async () => {
  const store = new MemoryStore();
  const server = new FakeServer();
  server.handlers.send = () => null;
  const s = setup({ store }, server);
  await live(s);
  s.client.send(7, "persist me").catch(() => undefined);
  await s.clock.advance(0);
  assert.deepEqual(store.state?.outbox?.map((e) => e.body), ["persist me"]);
  // Both in one chunk: the msg schedules a save, the kick terminates before it runs.
  s.server.socket.push({ t: "msg", ...msg({ from: 7, to: 42 }), seq: 1 });
  s.server.socket.push({ t: "kick", reason: "replaced" });
  await flush();
  assert.equal(s.client.state, "kicked");
  assert.deepEqual(store.state?.outbox?.map((e) => e.body), ["persist me"]);
  assert.equal(store.state?.seq, 1);
});

test("close() before the store is loaded does not overwrite it", async () => {
  let release!: () => void;
  const stored = { device: "dev1", seq: 5, outbox: [{ cid: "dev1.x.1", to: 7, body: "older" }] };
  const saves: unknown[] = [];
  const store = {
    load: () => new Promise<typeof stored>((r) => (release = () => r(stored))),
    save: (state: unknown) => void saves.push(state),
  };
  const s = setup({ store });
  const started = s.client.start();
  const sending = s.client.send(7, "during load");
  s.client.close();
  await assert.rejects(sending, (e: unknown) => e instanceof ImError && e.code === "closed");
  release();
  await started.catch(() => undefined);
  await flush();
  assert.deepEqual(saves, []);
});

test("outbox: send() right after a start() not awaited goes after the stored outbox, with the stored device", async () => {
  const saves: StoredState[] = [];
  const store = new MemoryStore({ device: "phone", seq: 0, outbox: [{ cid: "phone.old.1", to: 7, body: "older" }] });
  const save = store.save.bind(store);
  store.save = (state) => {
    saves.push(state);
    save(state);
  };
  const server = new FakeServer();
  server.handlers.send = () => ({ msg_id: 1n, session_id: 1n, ts: 1, dup: false });
  const s = setup({ store, device: undefined }, server);
  void s.client.start();
  const sending = s.client.send(7, "newer");
  await s.clock.advance(0);
  await sending;
  await flush();
  assert.deepEqual(server.of("send").map((f) => f.body), ["older", "newer"]);
  assert.equal(server.of("send")[0]!.cid, "phone.old.1");
  assert.match(String(server.of("send")[1]!.cid), /^phone\./);
  assert.ok(saves.length > 0);
  for (const state of saves) assert.equal(state.device, "phone");
});

test("an async store gets one save at a time, the latest state last", async () => {
  let running = 0;
  let most = 0;
  const written: StoredState[] = [];
  const finish: (() => void)[] = [];
  const store = {
    load: () => undefined,
    save: (state: StoredState) =>
      new Promise<void>((resolve) => {
        most = Math.max(most, ++running);
        // The first save is slow, the later ones quick: unchained, the first would land last.
        finish.push(() => {
          running--;
          written.push(state);
          resolve();
        });
      }),
  };
  const server = new FakeServer();
  server.handlers.send = () => null;
  const s = setup({ store }, server);
  await live(s);
  s.client.send(7, "one").catch(() => undefined);
  await flush();
  s.client.send(7, "two").catch(() => undefined);
  await flush();
  s.client.send(7, "three").catch(() => undefined);
  await flush();
  while (finish.length > 0) {
    finish.pop()!();
    await flush();
  }
  assert.equal(most, 1);
  assert.deepEqual(written[written.length - 1]!.outbox!.map((e) => e.body), ["one", "two", "three"]);
});

test("requests wait for the connection, up to requestTimeout", async () => {
  const server = new FakeServer();
  server.refuse = true;
  const s = setup({ requestTimeout: 5, random: () => 0.99, backoffBase: 1, backoffMax: 1 }, server);
  await s.client.start();
  const timedOut = assert.rejects(s.client.unread(), (e: unknown) => e instanceof ImError && e.code === "timeout");
  await s.clock.advance(5000);
  await timedOut;
  server.handlers.unread = () => ({ total: 0, sessions: [] });
  const answered = s.client.unread();
  server.refuse = false;
  await s.clock.advance(5000);
  assert.deepEqual(await answered, { total: 0, sessions: [] });
});

test("a request in flight when the connection drops fails with disconnected", async () => {
  const s = setup();
  await live(s);
  s.server.handlers.devices = () => null;
  const req = assert.rejects(s.client.devices(), (e: unknown) => e instanceof ImError && e.code === "disconnected");
  await s.clock.advance(0);
  s.server.socket.close();
  await req;
});

test("the store keeps device and seq; a LocalStorageStore round-trips bigints", async () => {
  const data = new Map<string, string>();
  const storage = { getItem: (k: string) => data.get(k) ?? null, setItem: (k: string, v: string) => void data.set(k, v) };
  const store = new LocalStorageStore("im:42", storage);
  const s = setup({ store, device: undefined });
  await live(s);
  const device = s.client.device!;
  assert.match(device, /^js-[0-9a-z]{16}$/);
  s.server.socket.push({ t: "msg", ...msg({ from: 7, to: 42 }), seq: 1 });
  s.server.handlers.send = () => null;
  void s.client.send(7, { n: 12345678901234567890n }).catch(() => undefined);
  await s.clock.advance(0);
  const saved = JSON.parse(data.get("im:42")!);
  assert.equal(saved.device, device);
  assert.equal(saved.seq, 1);
  assert.deepEqual(store.load()?.outbox?.[0]?.body, { n: 12345678901234567890n });
  s.client.close();

  const t = setup({ store, device: undefined });
  await live(t);
  assert.equal(t.client.device, device);
  assert.equal(t.server.of("auth")[0]!.since, 1);
});

test("on() returns an unsubscribe function; push sees every frame", async () => {
  const s = setup();
  const pushes: Frame[] = [];
  s.client.on("push", (f) => pushes.push(f));
  const typing: unknown[] = [];
  const off = s.client.on("typing", (e) => typing.push(e));
  await live(s);
  s.server.socket.push({ t: "typing", from: 7, active: true });
  s.server.socket.push({ t: "future_thing", x: 1 });
  await s.clock.advance(0);
  off();
  s.server.socket.push({ t: "typing", from: 7, active: false });
  await s.clock.advance(0);
  assert.deepEqual(typing, [{ from: 7, active: true }]);
  assert.deepEqual(
    pushes.map((f) => f.t),
    ["typing", "future_thing", "typing"],
  );
});

test("every op is a camelCase method sending the wire op", async () => {
  const s = setup();
  await live(s);
  s.server.handlers = new Proxy({}, { get: () => () => ({}) });
  const c = s.client;
  await c.read(1n, 2n);
  await c.unread();
  await c.convs({ limit: 5, before: 9n });
  await c.history({ peer: 7, before: 3n, limit: 2 });
  await c.recall(2n);
  await c.profile([7]);
  await c.setProfile({ nickname: "n" });
  await c.devices();
  await c.logoutDevice("old");
  await c.block(7);
  await c.unblock(7);
  await c.blocked({ limit: 10 });
  await c.mute(1n, 0);
  await c.edit(2n, "b");
  await c.hide([2n]);
  await c.clear(1n);
  await c.presence([7]);
  await c.watch([7]);
  await c.typing(7, true);
  await c.ping();
  await c.request("future_op", { x: 1 });
  const ops = s.server.requests.map((f) => f.t).slice(3);
  assert.deepEqual(ops, [
    "read", "unread", "convs", "history", "recall", "profile", "set_profile", "devices",
    "logout_device", "block", "unblock", "blocked", "mute", "edit", "hide", "clear",
    "presence", "watch", "typing", "ping", "future_op",
  ]);
  const history = s.server.of("history")[0]!;
  // (The fake decodes requests as replies: only reply fields are ids there.)
  assert.deepEqual({ ...history, id: 0 }, { t: "history", id: 0, peer: 7, before: 3, limit: 2 });
});

test("watch is repeated after a reconnect", async () => {
  const s = setup();
  await live(s);
  s.server.handlers.watch = (req) => ({ users: (req.uids as number[]).map((uid) => ({ uid, online: true, last_seen: 1 })) });
  await s.client.watch([7, 8]);
  s.server.socket.close();
  await s.clock.advance(1000);
  assert.deepEqual(s.server.sockets[1]!.of("watch")[0]!.uids, [7, 8]);
  assert.equal(s.of("presence").length, 2);
});

test("close() sends the acks still batched before it closes", async () => {
  const s = setup();
  await live(s);
  const m = msg({ from: 7, to: 42 });
  s.server.socket.push({ t: "msg", ...m, seq: 1 });
  await s.clock.advance(100);
  assert.equal(s.server.of("ack").length, 0);
  s.client.close();
  await flush();
  const acks = s.server.of("ack");
  assert.equal(acks.length, 1);
  assert.deepEqual(acks[0]!.msg_ids, [m.msg_id]);
  assert.equal(acks[0]!.seq, 1);
  assert.equal(s.server.socket.closed, true);
  assert.deepEqual(s.states[s.states.length - 1], { state: "closed" });
});

test("a late reply is not a push", async () => {
  const s = setup({ requestTimeout: 1 });
  await live(s);
  const pushes: unknown[] = [];
  s.client.on("push", (e) => pushes.push(e));
  s.server.handlers.unread = () => null;
  const late = assert.rejects(s.client.unread(), (e: unknown) => e instanceof ImError && e.code === "timeout");
  await s.clock.advance(1000);
  await late;
  const req = s.server.of("unread")[0]!;
  s.server.socket.reply(req, { total: 0, sessions: [] });
  await flush();
  assert.deepEqual(pushes, []);
});

test("close() from a handler: the rest of a re-watch reply's presence is not emitted", async () => {
  const s = setup();
  await live(s);
  s.server.handlers.watch = (req) => ({ users: (req.uids as number[]).map((uid) => ({ uid, online: true, last_seen: 1 })) });
  await s.client.watch([7, 8]);
  s.client.on("presence", () => s.client.close());
  s.server.socket.close();
  await s.clock.advance(1000);
  assert.equal(s.client.state, "closed");
  assert.equal(s.of("presence").length, 1);
});

test("a refused watch is not kept: the reconnect re-watches the last accepted set", async () => {
  const s = setup();
  await live(s);
  s.server.handlers.watch = (req) =>
    (req.uids as number[]).includes(9) ? { error: "bad_request" } : { users: [] };
  await s.client.watch([7]);
  await assert.rejects(s.client.watch([7, 9]), (e: unknown) => e instanceof ImError && e.code === "bad_request");
  s.server.socket.close();
  await s.clock.advance(1000);
  assert.equal(s.client.state, "live");
  assert.deepEqual(s.server.sockets[1]!.of("watch")[0]!.uids, [7]);
});

test("too_large: a send over maxFrameBytes fails at once, unsent and not in the outbox or the store", async () => {
  const store = new MemoryStore();
  const s = setup({ store, maxFrameBytes: 200 });
  await live(s);
  const big = s.client.send(7, "x".repeat(200));
  assert.deepEqual(s.client.outbox, []); // never queued, not even for a moment
  await assert.rejects(big, (e: unknown) => e instanceof ImError && e.code === "too_large");
  // Offline too: refused at once, not kept until a connection.
  s.server.refuse = true;
  s.server.socket.close();
  await s.clock.advance(0);
  assert.equal(s.client.state, "offline");
  await assert.rejects(s.client.send(7, "y".repeat(200)), (e: unknown) => e instanceof ImError && e.code === "too_large");
  assert.deepEqual(s.client.outbox, []);
  s.server.refuse = false;
  await s.clock.advance(60_000);
  assert.equal(s.client.state, "live");
  s.server.handlers.send = () => ({ msg_id: 1n, session_id: 1n, ts: 1, dup: false });
  await s.client.send(7, "x".repeat(100));
  await flush();
  assert.equal(s.server.of("send").length, 1);
  assert.deepEqual(store.state?.outbox, []);
});

test("too_large: the default limit is 65536 bytes", async () => {
  const s = setup();
  await live(s);
  await assert.rejects(s.client.send(7, "x".repeat(65536)), (e: unknown) => e instanceof ImError && e.code === "too_large");
  assert.equal(s.server.of("send").length, 0);
});

test("frame_too_large from the server lowers the limit: the send fails with too_large on the next connection", async () => {
  const server = new FakeServer();
  server.handlers.send = (req, sock) => {
    if (String(req.body).length > 300) {
      sock.push({ t: "error", code: "frame_too_large", message: "frame length over 300" });
      sock.close();
      return null;
    }
    return { msg_id: 1n, session_id: 1n, ts: 1, dup: false };
  };
  const s = setup({}, server);
  await live(s);
  const big = s.client.send(7, "x".repeat(500));
  const refused = assert.rejects(big, (e: unknown) => e instanceof ImError && e.code === "too_large");
  await s.clock.advance(1000);
  await refused;
  assert.equal(s.client.state, "live");
  assert.equal(server.sockets.length, 2);
  assert.equal(server.sockets[1]!.of("send").length, 0);
  assert.deepEqual(s.client.outbox, []);
  // Smaller ones still go; one just over the lowered limit is refused locally.
  await s.client.send(7, "x".repeat(200));
  await assert.rejects(s.client.send(7, "x".repeat(499)), (e: unknown) => e instanceof ImError && e.code === "too_large");
  assert.equal(server.of("send").length, 2);
});

test("a failed ack on a live connection is sent again after a growing delay", async () => {
  const server = new FakeServer();
  let fails = 2;
  server.handlers.ack = () => (fails-- > 0 ? { error: "internal" } : {});
  const s = setup({}, server);
  await live(s);
  const m = msg({ from: 7, to: 42 });
  server.socket.push({ t: "msg", ...m, seq: 1 });
  await s.clock.advance(1000);
  assert.equal(server.of("ack").length, 1);
  await s.clock.advance(1999);
  assert.equal(server.of("ack").length, 1);
  await s.clock.advance(1); // 2 s after the first failure
  assert.equal(server.of("ack").length, 2);
  await s.clock.advance(4000); // then 4 s
  const acks = server.of("ack");
  assert.equal(acks.length, 3);
  assert.deepEqual(acks.map((a) => [a.msg_ids, a.seq]), [[[m.msg_id], 1], [[m.msg_id], 1], [[m.msg_id], 1]]);
  await s.clock.advance(60_000);
  assert.equal(server.of("ack").length, 3);
  assert.equal(server.sockets.length, 1);
});

test("a message arriving after our own newer edit of it shows the edited body", async () => {
  const s = setup();
  await live(s);
  const m = msg({ from: 42, to: 7, body: "old" });
  s.server.handlers.edit = () => ({ edited: 7, seq: 1 });
  await s.client.edit(m.msg_id as bigint, "mine");
  s.server.socket.push({ t: "msg", ...m, seq: 2 });
  s.server.socket.push({ t: "edit", ...m, body: "older", edited: 6, seq: 3 });
  await s.clock.advance(0);
  assert.deepEqual(s.of("message").map((e) => [e.msg.body, e.msg.edited]), [["mine", 7]]);
  assert.equal(s.of("edit").length, 0);
});

async function unhandledDuring(body: () => Promise<void>): Promise<unknown[]> {
  const unhandled: unknown[] = [];
  const onUnhandled = (e: unknown): void => void unhandled.push(e);
  process.on("unhandledRejection", onUnhandled);
  try {
    await body();
    await flush(10);
  } finally {
    process.off("unhandledRejection", onUnhandled);
  }
  return unhandled;
}

for (const stop of ["kick", "close"] as const) {
  test(`${stop}: no outbox retry timer is left; unawaited sends raise no unhandledRejection, awaited ones reject`, async () => {
    const server = new FakeServer();
    server.handlers.send = () => ({ error: "unavailable" });
    const s = setup({ backoffMax: 1000, backoffBase: 100 }, server);
    let awaited: Promise<void> | undefined;
    const unhandled = await unhandledDuring(async () => {
      await live(s);
      void s.client.send(7, "retried, not awaited");
      const waited = s.client.send(8, "retried, awaited");
      awaited = assert.rejects(waited, (e: unknown) => e instanceof ImError && e.code === (stop === "kick" ? "kicked" : "closed"));
      await s.clock.advance(0);
      assert.equal(server.of("send").length, 2); // both now wait in a retry delay
      if (stop === "kick") server.socket.push({ t: "kick", reason: "logged out" });
      else s.client.close();
      await flush();
      await awaited;
    });
    assert.deepEqual(unhandled, []);
    assert.equal(s.client.state, stop === "kick" ? "kicked" : "closed");
    assert.equal(s.clock.timers, 0);
    await s.clock.advance(1_000_000);
    assert.equal(server.of("send").length, 2);
  });
}

test("close() before the store is loaded: an unawaited early send raises no unhandledRejection", async () => {
  let release: ((v: StoredState | undefined) => void) | undefined;
  const store = { load: () => new Promise<StoredState | undefined>((r) => (release = r)), save: () => undefined };
  const s = setup({ store });
  const unhandled = await unhandledDuring(async () => {
    void s.client.start().catch(() => undefined);
    void s.client.send(7, "early");
    s.client.close();
    release!(undefined);
  });
  assert.deepEqual(unhandled, []);
});

for (const op of ["catchup", "sync"] as const) {
  test(`a ${op} page unanswered for requestTimeout while syncing drops the connection and reconnects`, async () => {
    const server = new FakeServer();
    let stuck = true;
    server.handlers[op] = () => (stuck ? ((stuck = false), null) : undefined);
    const s = setup({ requestTimeout: 5, random: () => 0.5, backoffBase: 1 }, server);
    await s.client.start();
    await s.clock.advance(4999);
    assert.equal(s.client.state, "syncing");
    await s.clock.advance(1);
    assert.equal(s.states[s.states.length - 1]!.state, "offline");
    assert.match(String(s.states[s.states.length - 1]!.reason), /timeout|within/);
    assert.equal(server.sockets[0]!.closed, true);
    await s.clock.advance(500);
    assert.equal(s.client.state, "live");
    assert.equal(server.sockets.length, 2);
  });
}

test("a page of a live resync (sync push) unanswered for requestTimeout drops the connection and reconnects", async () => {
  const server = new FakeServer();
  const s = setup({ requestTimeout: 5, random: () => 0.5, backoffBase: 1 }, server);
  await live(s);
  server.handlers.sync = () => null;
  server.socket.push({ t: "sync" });
  await s.clock.advance(4999);
  assert.equal(s.client.state, "live");
  assert.equal(server.sockets.length, 1);
  server.handlers.sync = () => undefined;
  await s.clock.advance(1);
  await s.clock.advance(500);
  assert.equal(server.sockets[0]!.closed, true);
  assert.equal(server.sockets.length, 2);
  assert.equal(s.client.state, "live");
});

test("LocalStorageStore: another device name keeps the stored seq and outbox; another uid discards them", async () => {
  const data = new Map<string, string>();
  const storage = { getItem: (k: string) => data.get(k) ?? null, setItem: (k: string, v: string) => void data.set(k, v) };
  const store = new LocalStorageStore("im:42", storage);
  const first = new FakeServer();
  first.handlers.send = () => null;
  const s = setup({ store, device: "old-device" }, first);
  await live(s);
  first.socket.push({ t: "read", session_id: 1n, by: 7, msg_id: 1n, seq: 1 });
  void s.client.send(7, "kept").catch(() => undefined);
  await s.clock.advance(0);
  const cid = first.of("send")[0]!.cid;
  s.client.close();
  await flush();
  assert.equal(JSON.parse(data.get("im:42")!).uid, 42);

  // The same user on another device name: the outbox goes, same cid; since is kept.
  const second = new FakeServer();
  second.knownDevices.add("new-device");
  second.handlers.send = () => null;
  const t = setup({ store, device: "new-device" }, second);
  await live(t);
  assert.equal(second.of("auth")[0]!.since, 1);
  assert.deepEqual(second.of("send").map((f) => f.cid), [cid]);
  t.client.close();
  await flush();
  assert.deepEqual(store.load()?.outbox?.map((e) => e.cid), [cid]);

  // Another user with that store: nothing of the first one's is sent; its seq is gone.
  const third = new FakeServer();
  third.uid = 99;
  third.head = 5;
  third.handlers.send = () => ({ msg_id: 3n, session_id: 3n, ts: 1, dup: false });
  const u = setup({ store, device: "new-device" }, third);
  await live(u);
  assert.equal(u.client.seq, 5);
  assert.deepEqual(u.client.outbox, []);
  await u.client.send(8, "mine");
  assert.deepEqual(third.of("send").map((f) => f.body), ["mine"]);
  await flush();
  const saved = store.load()!;
  assert.equal(saved.uid, 99);
  assert.deepEqual(saved.outbox, []);
  assert.equal(saved.seq, 5);
});
