/**
 * End to end against a real `twistd -n imserver`, over TCP and WebSocket:
 * two clients chat; a server restart is caught up without duplicates; an
 * unanswered send is retried with the same cid; an oversized send fails with
 * too_large; a kicked device stays down.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import * as browser from "../../src/index.js";
import { Client, ImError, type MessageEvent, type StateEvent, nodeConnector } from "../../src/node.js";
import { FaultyConnector } from "./faults.js";
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

    test("a restart of the server: catch-up, no duplicates", async () => {
      const [ua, ub] = [newUid(), newUid()];
      const a = makeClient(url(), ua);
      const faults = new FaultyConnector(nodeConnector());
      const b = makeClient(url(), ub, { connector: faults.connector, device: "bob-laptop" });
      try {
        await a.client.start();
        await b.client.start();
        await a.client.waitLive(30);
        await b.client.waitLive(30);
        const m1 = await a.client.send(ub, "before the restart");
        await waitFor(() => b.messages.length === 1, "the first message");

        // Bob stays away while the server restarts and alice goes on.
        faults.refuse = true;
        await server.stop();
        await waitFor(() => a.client.state === "offline" && b.client.state === "offline", "both offline");
        await server.start();
        await a.client.waitLive(60);
        const m2 = await a.client.send(ub, "while you were away");
        const m3 = await a.client.send(ub, { text: "and again" });
        assert.equal(b.messages.length, 1);
        assert.notEqual(b.client.state, "live");

        faults.refuse = false;
        await b.client.waitLive(60);
        await waitFor(() => b.messages.length === 3, "bob catches up");
        assert.deepEqual(
          b.messages.map((e) => e.msg.msg_id),
          [m1.msg_id, m2.msg_id, m3.msg_id],
        );
        assert.deepEqual(
          b.messages.map((e) => e.replay),
          [false, true, true],
        );
        // Reconnected with since (catch-up), not as a new device.
        const auths = faults.sentOf("auth");
        assert.ok(auths.length >= 2);
        assert.ok((auths[auths.length - 1]!.since as number) > 0);

        // Live again: a new message arrives once, and nothing is repeated.
        const m4 = await a.client.send(ub, "live again");
        await waitFor(() => b.messages.length === 4, "the live message");
        assert.equal(b.messages[3]!.msg.msg_id, m4.msg_id);
        // Every message acked: nothing is pending for bob any more.
        await waitFor(() => faults.sentOf("ack").some((f) => (f.msg_ids as bigint[] | undefined)?.includes(m4.msg_id)), "the ack");
        let pending = -1;
        for (let i = 0; i < 100 && pending !== 0; i++) {
          pending = (await b.client.request<{ msgs: unknown[] }>("sync", {})).msgs.length;
          if (pending !== 0) await new Promise((r) => setTimeout(r, 100));
        }
        assert.equal(pending, 0);
      } finally {
        a.client.close();
        b.client.close();
      }
    });

    test("a send whose reply is lost is retried with the same cid", async () => {
      const [ua, ub] = [newUid(), newUid()];
      const faults = new FaultyConnector(nodeConnector());
      const a = makeClient(url(), ua, { connector: faults.connector });
      const b = makeClient(url(), ub);
      try {
        await a.client.start();
        await b.client.start();
        await a.client.waitLive(30);
        await b.client.waitLive(30);
        faults.loseReplyTo = "send";
        const sending = a.client.send(ub, "exactly once");
        assert.equal(a.client.outbox.length, 1);
        // Stored and delivered, but alice never heard: then her connection drops.
        await waitFor(() => b.messages.length === 1, "bob gets it");
        assert.equal(a.client.outbox.length, 1);
        faults.drop();
        const result = await sending;
        assert.equal(result.dup, true);
        const sends = faults.sentOf("send");
        assert.equal(sends.length, 2);
        assert.equal(sends[0]!.cid, sends[1]!.cid);
        assert.match(String(sends[0]!.cid), /^[^.]+\.[0-9a-z]{8}\.1$/);
        assert.ok(String(sends[0]!.cid).length <= 64);
        assert.equal(a.client.outbox.length, 0);
        const history = await b.client.history({ peer: ua });
        assert.equal(history.msgs.length, 1);
        assert.equal(history.msgs[0]!.msg_id, result.msg_id);

        // Sent while offline: kept in the outbox, sent once connected.
        faults.refuse = true;
        faults.drop();
        await waitFor(() => a.client.state === "offline", "alice offline");
        const later = a.client.send(ub, "from the outbox");
        assert.deepEqual(
          a.client.outbox.map((e) => e.body),
          ["from the outbox"],
        );
        faults.refuse = false;
        const sent = await later;
        assert.equal(sent.dup, false);
        await waitFor(() => b.messages.length === 2, "bob gets the second");
        assert.equal(b.messages[1]!.msg.body, "from the outbox");
      } finally {
        a.client.close();
        b.client.close();
      }
    });

    test("a send over the server's max_frame_bytes fails with too_large", { timeout: 30_000 }, async () => {
      const [ua, ub] = [newUid(), newUid()];
      // Set above the server's 65536: over TCP its frame_too_large lowers ours.
      const a = makeClient(url(), ua, transport === "tcp" ? { maxFrameBytes: 1_000_000 } : {});
      const b = makeClient(url(), ub);
      try {
        await a.client.start();
        await b.client.start();
        await a.client.waitLive(30);
        await b.client.waitLive(30);
        await assert.rejects(a.client.send(ub, "x".repeat(100_000)), (e: unknown) => e instanceof ImError && e.code === "too_large");
        assert.deepEqual(a.client.outbox, []);
        await a.client.waitLive(30);
        assert.equal((await a.client.send(ub, "small")).dup, false);
        if (transport === "tcp") {
          // The lowered limit refuses one as large locally, without losing the connection.
          const offline = a.states.filter((e) => e.state === "offline").length;
          await assert.rejects(a.client.send(ub, "x".repeat(100_000)), (e: unknown) => e instanceof ImError && e.code === "too_large");
          assert.equal(a.states.filter((e) => e.state === "offline").length, offline);
        }
      } finally {
        a.client.close();
        b.client.close();
      }
    });

    test("a kicked device does not reconnect", async () => {
      const ua = newUid();
      const faults = new FaultyConnector(nodeConnector());
      const first = makeClient(url(), ua, { connector: faults.connector, device: "phone" });
      const second = makeClient(url(), ua, { device: "phone" });
      const kicks: string[] = [];
      first.client.on("kick", (e) => kicks.push(e.reason));
      try {
        await first.client.start();
        await first.client.waitLive(30);
        const waiting = first.client.waitLive();
        await second.client.start();
        await second.client.waitLive(30);
        await waitFor(() => first.client.state === "kicked", "the kick");
        assert.deepEqual(kicks, ["replaced"]);
        assert.deepEqual(first.states[first.states.length - 1], { state: "kicked", reason: "replaced" });
        await waiting; // it was live already
        await assert.rejects(first.client.ping(), (e: unknown) => e instanceof ImError && e.code === "kicked");
        await assert.rejects(first.client.send(ua + 1, "x"), (e: unknown) => e instanceof ImError && e.code === "kicked");
        const connects = faults.connects;
        await new Promise((r) => setTimeout(r, 1500));
        assert.equal(faults.connects, connects);
        assert.equal(first.client.state, "kicked");
        assert.equal(second.client.state, "live");

        // logout_device from another device kicks too.
        const third = makeClient(url(), ua, { device: "desk" });
        await third.client.start();
        await third.client.waitLive(30);
        const out = await third.client.logoutDevice("phone");
        assert.equal(out.kicked, true);
        await waitFor(() => second.client.state === "kicked", "logged out");
        assert.equal(second.states[second.states.length - 1]!.reason, "logged_out");
        third.client.close();
      } finally {
        first.client.close();
        second.client.close();
      }
    });

    test("two devices of one user and a peer: own sends, edits, recalls, typing, presence", async () => {
      const [ua, ub] = [newUid(), newUid()];
      const phone = makeClient(url(), ua, { device: "phone" });
      const desk = makeClient(url(), ua, { device: "desk" });
      const b = makeClient(url(), ub);
      const all = [phone, desk, b];
      try {
        for (const r of all) await r.client.start();
        for (const r of all) await r.client.waitLive(30);
        const edits: unknown[] = [];
        const recalls: bigint[] = [];
        b.client.on("edit", (e) => edits.push(e.msg.body));
        desk.client.on("edit", (e) => edits.push(e.msg.body));
        b.client.on("recall", (e) => recalls.push(e.msg_id));
        const sent = await phone.client.send(ub, "from the phone");
        await waitFor(() => desk.messages.length === 1 && b.messages.length === 1, "both see it");
        assert.equal(desk.messages[0]!.msg.from, ua);
        assert.equal(desk.messages[0]!.msg.msg_id, sent.msg_id);
        assert.equal(phone.messages.length, 0);

        const edited = await phone.client.edit(sent.msg_id, "edited on the phone");
        assert.equal(typeof edited.edited, "number");
        await waitFor(() => edits.length === 2, "the edit reaches the peer and the other device");
        assert.deepEqual(edits, ["edited on the phone", "edited on the phone"]);

        const typing: unknown[] = [];
        b.client.on("typing", (e) => typing.push(e));
        await phone.client.typing(ub, true);
        await waitFor(() => typing.length === 1, "typing");
        assert.deepEqual(typing[0], { from: ua, active: true });

        const presence: unknown[] = [];
        b.client.on("presence", (e) => presence.push(e));
        const watched = await b.client.watch([ua]);
        assert.equal(watched.users[0]!.online, true);

        await phone.client.recall(sent.msg_id);
        await waitFor(() => recalls.length === 1, "the recall");
        assert.equal(recalls[0], sent.msg_id);
        const history = await b.client.history({ session_id: sent.session_id });
        assert.equal(history.msgs.length, 0);

        phone.client.close();
        desk.client.close();
        await waitFor(() => presence.some((p) => (p as { online: boolean }).online === false), "offline presence");
        const devices = await b.client.devices();
        assert.equal(devices.devices.length, 1);
      } finally {
        for (const r of all) r.client.close();
      }
    });

    test("a refused token fails, unless the token is a function", async () => {
      const ua = newUid();
      const bad = new Client({ url: url(), token: "not.a.token", backoffBase: 0.05 });
      await bad.start();
      await assert.rejects(bad.waitLive(30), (e: unknown) => e instanceof ImError && e.code === "auth_failed");
      assert.equal(bad.state, "failed");
      bad.close();

      let calls = 0;
      const renewing = new Client({
        url: url(),
        token: async () => (++calls < 3 ? "not.a.token" : server.token(ua)),
        backoffBase: 0.05,
        backoffMax: 0.2,
      });
      try {
        await renewing.start();
        await renewing.waitLive(30);
        assert.equal(calls, 3);
        assert.equal(renewing.uid, ua);
      } finally {
        renewing.close();
      }
    });
  });
}

describe("the browser entry point over the platform's WebSocket", () => {
  const skip = typeof (globalThis as { WebSocket?: unknown }).WebSocket !== "function" && "no global WebSocket in this node";
  test("chats with a Node client", { skip }, async () => {
    const [ua, ub] = [newUid(), newUid()];
    const a = new browser.Client({ url: server.wsUrl, token: async () => server.token(ua), backoffBase: 0.1 });
    const b = makeClient(server.tcpUrl, ub);
    const got: browser.MessageEvent[] = [];
    a.on("message", (e) => got.push(e));
    try {
      await a.start();
      await b.client.start();
      await a.waitLive(30);
      await b.client.waitLive(30);
      const sent = await a.send(ub, "from the browser API");
      await waitFor(() => b.messages.length === 1, "the node client gets it");
      assert.equal(b.messages[0]!.msg.msg_id, sent.msg_id);
      await b.client.send(ua, { text: "back", at: 2n ** 40n });
      await waitFor(() => got.length === 1, "the browser client gets the answer");
      assert.deepEqual(got[0]!.msg.body, { text: "back", at: 2 ** 40 });
      const reads: bigint[] = [];
      b.client.on("read", (e) => reads.push(e.msg_id));
      await a.read(got[0]!.msg.session_id, got[0]!.msg.msg_id);
      await waitFor(() => reads.length === 1, "the receipt");
      // A server restart: a goaway, then a reconnect and catch-up.
      await server.stop();
      await server.start();
      await a.waitLive(60);
      await b.client.waitLive(60);
      await b.client.send(ua, "after the restart");
      await waitFor(() => got.length === 2, "the message after the restart");
      assert.equal(got[1]!.msg.body, "after the restart");
    } finally {
      a.close();
      b.client.close();
    }
  });
});
