import assert from "node:assert/strict";
import { test } from "node:test";

import { Model, type Msg } from "../src/model.ts";

const ME = 1;
const PEER = 2;
const SESSION = 9000000000000001n;

function msg(id: bigint, from: number, body = `m${id}`): Msg {
  return { msg_id: id, session_id: SESSION, from, to: from === ME ? PEER : ME, type: "text", body, ts: 1764400000000 };
}

test("a message is added once, whatever repeats it", () => {
  const m = new Model(ME);
  const [c, fresh] = m.addMessage(msg(10n, PEER));
  assert.equal(fresh, true);
  assert.equal(m.addMessage(msg(10n, PEER))[1], false);
  assert.equal(c.msgs.size, 1);
  assert.equal(c.unread, 1, "counted once");
  assert.equal(c.session, SESSION);
  assert.equal(m.bySessionId(SESSION), c);
});

test("unread: the server's count when it says, mine never count", () => {
  const m = new Model(ME);
  const [c] = m.addMessage(msg(10n, PEER), 5);
  assert.equal(c.unread, 5);
  m.addMessage(msg(11n, ME));
  assert.equal(c.unread, 5);
  m.addMessage(msg(12n, PEER));
  assert.equal(c.unread, 6);
  m.addMessage(msg(8n, PEER), undefined, false); // a history page
  assert.equal(c.unread, 6);
  assert.equal(m.totalUnread(), 6);
});

test("receipts: sent, delivered, read; positions never go back", () => {
  const m = new Model(ME);
  const [c] = m.addMessage(msg(10n, ME));
  m.addMessage(msg(11n, ME));
  m.addMessage(msg(12n, ME));
  assert.deepEqual([...c.msgs.values()].map((x) => c.status(x)), ["sent", "sent", "sent"]);
  m.applyDelivered(SESSION, 11n);
  m.applyRead(SESSION, PEER, 10n);
  assert.deepEqual([...c.msgs.values()].map((x) => c.status(x)), ["read", "delivered", "sent"]);
  m.applyDelivered(SESSION, 5n);
  m.applyRead(SESSION, PEER, 12n);
  assert.deepEqual([...c.msgs.values()].map((x) => c.status(x)), ["read", "read", "read"]);
  assert.equal(c.peerDelivered, 12n, "a read is a delivery too");
});

test("a read of mine (another device) sets my position and count", () => {
  const m = new Model(ME);
  const [c] = m.addMessage(msg(10n, PEER), 1);
  m.applyRead(SESSION, ME, 10n, 0);
  assert.equal(c.unread, 0);
  assert.equal(c.myRead, 10n);
  assert.equal(c.peerRead, 0n);
  assert.equal(m.applyRead(777n, ME, 1n), null, "an unknown session: the caller refreshes");
});

test("a convs page asked before a read does not bring the old count back", () => {
  const m = new Model(ME);
  const [c] = m.addMessage(msg(10n, PEER), 1);
  const epochs = m.readEpochs();
  c.readEpoch += 1; // a read was sent meanwhile
  c.unread = 0;
  const entry = {
    session_id: SESSION,
    peer: { uid: PEER, nickname: "bob", avatar: "" },
    last: msg(10n, PEER),
    last_msg_id: 10n,
    unread: 1,
    peer_read: 0n,
    peer_delivered: 0n,
  };
  m.applyConvs([entry], false, epochs);
  assert.equal(c.unread, 0);
  m.applyConvs([entry], false, m.readEpochs());
  assert.equal(c.unread, 1, "a fresh page is the authority");
  assert.equal(m.profiles.get(PEER)?.nickname, "bob");
});

test("a recall: shown as recalled, the preview falls back, history does not bring it back", () => {
  const m = new Model(ME);
  const [c] = m.addMessage(msg(10n, PEER, "first"));
  m.addMessage(msg(11n, PEER, "second"));
  m.applyRecall(SESSION, 11n);
  assert.equal(c.last?.body, "first");
  assert.ok(c.recalled.has(11n));
  assert.equal(m.addMessage(msg(11n, PEER))[1], false);
  assert.equal(c.newestFromPeer()?.msg_id, 10n);
  assert.equal(c.oldest(), 10n);
});

test("an edit replaces the message; an older copy does not", () => {
  const m = new Model(ME);
  const [c] = m.addMessage(msg(10n, PEER, "typo"));
  m.addMessage({ ...msg(10n, PEER, "fixed"), edited: 2 }, undefined, false);
  m.addMessage(msg(10n, PEER, "typo"), undefined, false);
  assert.equal(c.msgs.get(10n)?.body, "fixed");
});

test("conversations: new empty ones first, then the latest message first", () => {
  const m = new Model(ME);
  m.addMessage({ ...msg(10n, 3), session_id: 1n });
  m.addMessage({ ...msg(30n, 4), session_id: 2n });
  m.addMessage({ ...msg(20n, 5), session_id: 3n });
  m.conv(6);
  assert.deepEqual(m.ordered().map((c) => c.peer), [6, 4, 5, 3]);
});

test("a message from the peer ends its typing", () => {
  const m = new Model(ME);
  const c = m.conv(PEER);
  c.typingUntil = Date.now() + 6000;
  assert.ok(c.typing());
  m.addMessage(msg(10n, PEER));
  assert.ok(!c.typing());
});
