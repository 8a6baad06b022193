/**
 * The Node transports on real local sockets: a peer that accepts the TCP
 * connection but never answers (a TLS handshake, a WebSocket upgrade) is
 * given up after connectTimeout instead of hanging for ever.
 */

import assert from "node:assert/strict";
import * as net from "node:net";
import { test } from "node:test";

import { nodeConnector } from "../../src/node.js";
import { connectTcp } from "../../src/tcp.js";

const handlers = { message: () => undefined, close: () => undefined };

/** A TCP server that accepts and then says nothing. */
async function silentServer(): Promise<{ port: number; sockets: net.Socket[]; close(): void }> {
  const sockets: net.Socket[] = [];
  const server = net.createServer((socket) => void sockets.push(socket));
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const close = (): void => {
    for (const socket of sockets) socket.destroy();
    server.close();
  };
  // Without a connect timeout the client would wait for ever: hang up after
  // 5 s so that the test fails (a different error) instead of hanging.
  setTimeout(close, 5000).unref();
  return { port: (server.address() as net.AddressInfo).port, sockets, close };
}

test("tls:// to a peer that never finishes the handshake fails after connectTimeout", async () => {
  const server = await silentServer();
  try {
    const started = Date.now();
    await assert.rejects(
      connectTcp(`tls://127.0.0.1:${server.port}`, handlers, { connectTimeout: 0.2 }),
      /no connection within 0.2 s/,
    );
    assert.ok(Date.now() - started < 4000, "given up by the client, not by the server's hang-up");
  } finally {
    server.close();
  }
});

test("ws:// to a peer that never answers the upgrade fails after connectTimeout", async () => {
  const server = await silentServer();
  try {
    const connect = nodeConnector({ connectTimeout: 0.2 });
    const started = Date.now();
    await assert.rejects(connect(`ws://127.0.0.1:${server.port}/v1/ws`, handlers), /cannot connect/);
    assert.ok(Date.now() - started < 4000, "given up by the client, not by the server's hang-up");
    assert.equal(server.sockets.length, 1);
  } finally {
    server.close();
  }
});

test("tcp://: once connected, connectTimeout no longer applies", async () => {
  const server = await silentServer();
  let closed = false;
  try {
    const transport = await connectTcp(
      `tcp://127.0.0.1:${server.port}`,
      { message: () => undefined, close: () => void (closed = true) },
      { connectTimeout: 0.1 },
    );
    await new Promise((r) => setTimeout(r, 400));
    assert.equal(closed, false);
    transport.close();
  } finally {
    server.close();
  }
});
