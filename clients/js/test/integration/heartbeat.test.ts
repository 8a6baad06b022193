/**
 * Heartbeats against a real server with a short idle timeout: an idle
 * client pings every `heartbeat` seconds of the auth reply and is never
 * closed for idleness.
 */

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, nodeConnector } from "../../src/node.js";
import { FaultyConnector } from "./faults.js";
import { ServerProcess } from "./server.js";

const server = new ServerProcess({ extra: { server: ["heartbeat_seconds = 1", "idle_timeout_seconds = 4"] } });

before(async () => {
  await server.start();
});

after(async () => {
  await server.cleanup();
});

for (const transport of ["tcp", "ws"] as const) {
  test(`an idle client stays connected over ${transport}`, async () => {
    const faults = new FaultyConnector(nodeConnector());
    const client = new Client({
      url: transport === "tcp" ? server.tcpUrl : server.wsUrl,
      token: server.token(transport === "tcp" ? 1 : 2),
      connector: faults.connector,
    });
    try {
      await client.start();
      await client.waitLive(30);
      await new Promise((r) => setTimeout(r, 7000));
      assert.equal(client.state, "live");
      assert.equal(faults.connects, 1);
      assert.ok(faults.sentOf("ping").length >= 3, `${faults.sentOf("ping").length} pings`);
    } finally {
      client.close();
    }
  });
}
