/**
 * End to end against a real `twistd -n imserver`, over TCP and WebSocket:
 * two clients chat; a server restart is caught up without duplicates; an
 * unanswered send is retried with the same cid; a kicked device stays down.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client, ImError, type MessageEvent, type StateEvent } from "../../src/node.js";
import { ServerProcess, waitFor } from "./server.js";

const server = new ServerProcess();

before(async () => {
  await server.start();
});

after(async () => {
  await server.cleanup();
});

let nextUid = 1000;

function newUid(): number {
  return nextUid++;
}

interface Recorder {
  client: Client;
  messages: MessageEvent[];
  states: StateEvent[];
}

function makeClient(url: string, uid: number, extra: Partial<ConstructorParameters<typeof Client>[0]> = {}): Recorder {
  const client = new Client({ url, token: server.token(uid), backoffBase: 0.1, backoffMax: 1, ...extra });
  const rec: Recorder = { client, messages: [], states: [] };
  client.on("message", (e) => rec.messages.push(e));
  client.on("state", (e) => rec.states.push(e));
  return rec;
}

for (const transport of ["tcp", "ws"] as const) {
  const url = (): string => (transport === "tcp" ? server.tcpUrl : server.wsUrl);

  describe(`over ${transport}`, () => {
    test("two clients chat", async () => {
      const [ua, ub] = [newUid(), newUid()];
      const a = makeClient(url(), ua);
      const b = makeClient(url(), ub);
      try {
        await a.client.start();
        await b.client.start();
        await a.client.waitLive(30);
        await b.client.waitLive(30);
        assert.equal(a.client.uid, ua);
        assert.equal(b.client.state, "live");

        const sent = await a.client.send(ub, "hello bob");
        assert.equal(typeof sent.msg_id, "bigint");
        assert.equal(typeof sent.session_id, "bigint");
        assert.equal(sent.dup, false);
        await waitFor(() => b.messages.length === 1, "bob gets the message");
        const got = b.messages[0]!;
        assert.equal(got.msg.msg_id, sent.msg_id);
        assert.equal(got.msg.body, "hello bob");
        assert.equal(got.msg.from, ua);
        assert.equal(got.replay, false);
        assert.equal(got.unread, 1);

        const reply = await b.client.send(ua, { text: "hi alice", n: 2 }, "card");
        await waitFor(() => a.messages.length === 1, "alice gets the answer");
        assert.deepEqual(a.messages[0]!.msg.body, { text: "hi alice", n: 2 });
        assert.equal(a.messages[0]!.msg.type, "card");

        const reads: bigint[] = [];
        a.client.on("read", (e) => reads.push(e.msg_id));
        const read = await b.client.read(sent.session_id, sent.msg_id);
        assert.equal(read.unread, 0);
        await waitFor(() => reads.length === 1, "alice sees the read receipt");
        assert.equal(reads[0], sent.msg_id);

        const convs = await a.client.convs();
        assert.equal(convs.convs.length, 1);
        assert.equal(convs.convs[0]!.peer.uid, ub);
        assert.equal(convs.convs[0]!.last_msg_id, reply.msg_id);
        const history = await a.client.history({ peer: ub });
        assert.deepEqual(
          history.msgs.map((m) => m.msg_id),
          [reply.msg_id, sent.msg_id],
        );
        assert.equal(history.peer_read, sent.msg_id);

        const profile = await a.client.setProfile({ nickname: "alice" });
        assert.equal(profile.user.nickname, "alice");
        assert.deepEqual((await b.client.profile([ua])).users, [{ uid: ua, nickname: "alice", avatar: "" }]);
        const unread = await a.client.unread();
        assert.equal(unread.total, 1);

        await assert.rejects(a.client.send(ua, "me"), (e: unknown) => e instanceof ImError && e.code === "invalid");
        await assert.rejects(
          a.client.read(sent.session_id + 1n, sent.msg_id),
          (e: unknown) => e instanceof ImError && (e.code === "not_found" || e.code === "forbidden"),
        );
      } finally {
        a.client.close();
        b.client.close();
      }
    });
  });
}
