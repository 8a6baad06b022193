import assert from "node:assert/strict";
import { test } from "node:test";

import { Connection } from "../../src/connection.js";
import { ImError } from "../../src/errors.js";
import type { Frame } from "../../src/codec.js";
import { FakeClock, FakeServer, flush } from "./fakes.js";

test("replies are matched by id, whatever their order; pushes are handed on", async () => {
  const server = new FakeServer();
  server.handlers.history = () => null;
  server.handlers.unread = () => null;
  const pushes: Frame[] = [];
  const conn = await Connection.open(server.connector, "ws://x", { onPush: (f) => pushes.push(f) });
  const first = conn.request("history", { peer: 2 });
  const second = conn.request("unread");
  await flush();
  const [h, u] = server.socket.received;
  server.socket.push({ t: "typing", from: 2, active: true });
  server.socket.reply(u!, { total: 0, sessions: [] });
  server.socket.error(h!, "forbidden", "no");
  assert.deepEqual(await second, { total: 0, sessions: [] });
  await assert.rejects(first, (e: unknown) => e instanceof ImError && e.code === "forbidden" && e.message === "no");
  assert.deepEqual(pushes, [{ t: "typing", from: 2, active: true }]);
  assert.notEqual(h!.id, u!.id);
});

test("a request times out; a closed connection fails what is in flight", async () => {
  const clock = new FakeClock();
  const server = new FakeServer();
  server.handlers.ping = () => null;
  let closed = 0;
  const conn = await Connection.open(server.connector, "ws://x", { timers: clock, onClose: () => closed++ });
  const slow = assert.rejects(conn.request("ping", {}, 5000), (e: unknown) => e instanceof ImError && e.code === "timeout");
  const lost = assert.rejects(conn.request("ping"), (e: unknown) => e instanceof ImError && e.code === "disconnected");
  await clock.advance(4999);
  assert.equal(server.socket.closed, false);
  await clock.advance(1);
  await slow;
  server.socket.close();
  await lost;
  assert.equal(closed, 1);
  await assert.rejects(conn.request("ping"), (e: unknown) => e instanceof ImError && e.code === "disconnected");
});

test("maxRequestBytes: a larger request fails with too_large unsent; largestUnanswered tracks what is in flight", async () => {
  const server = new FakeServer();
  server.handlers.history = () => null;
  const conn = await Connection.open(server.connector, "ws://x");
  conn.maxRequestBytes = 100;
  await assert.rejects(conn.request("history", { cursor: "x".repeat(100) }), (e: unknown) => e instanceof ImError && e.code === "too_large");
  assert.equal(conn.largestUnanswered, 0);
  void conn.request("history", { cursor: "x".repeat(50) }).catch(() => undefined);
  void conn.request("history", { cursor: "x".repeat(20) }).catch(() => undefined);
  const largest = conn.largestUnanswered;
  assert.ok(largest > 50 && largest <= 100, String(largest));
  await flush();
  assert.equal(server.socket.received.length, 2);
  server.socket.reply(server.socket.received[0]!);
  await flush();
  assert.ok(conn.largestUnanswered > 20 && conn.largestUnanswered < 50);
  conn.close();
});
