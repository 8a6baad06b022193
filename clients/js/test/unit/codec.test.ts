import assert from "node:assert/strict";
import { test } from "node:test";

import { CodecError, decodeBody, encodeBody } from "../../src/codec.js";
import { FrameDecoder, FrameError, encodeFrame } from "../../src/framing.js";

const hex = (b: Uint8Array): string => Buffer.from(b).toString("hex");
const bytes = (h: string): Uint8Array => new Uint8Array(Buffer.from(h.replace(/\s+/g, ""), "hex"));

test("a request encodes byte for byte as in docs/protocol.md", () => {
  assert.equal(hex(encodeFrame(encodeBody({ t: "ping", id: 1 }))), "0000000c82a174a470696e67a2696401");
});

test("a reply with a uint64 time decodes to numbers", () => {
  const body = bytes("83 a174 a26f6b a26964 01 ab7365727665725f74696d65 cf0000019ace6f6c00");
  assert.deepEqual(decodeBody(body), { t: "ok", id: 1, server_time: 1764400000000 });
});

test("ids are bigint by field name, at any depth; other integers are numbers", () => {
  const frame = decodeBody(
    encodeBody({
      t: "ok",
      id: 3,
      msgs: [{ msg_id: 493692073500680n, session_id: 5, from: 1, to: 2, ts: 1764400000000 }],
      peer_read: 0,
      convs: [{ last_msg_id: 7, last: null, peer: { uid: 2 } }],
      msg_ids: [1, 2n],
      up_to: 9,
      after: 11,
    }),
  );
  const m = (frame.msgs as Record<string, unknown>[])[0]!;
  assert.equal(m.msg_id, 493692073500680n);
  assert.equal(m.session_id, 5n);
  assert.equal(m.from, 1);
  assert.equal(m.ts, 1764400000000);
  assert.equal(frame.peer_read, 0n);
  assert.equal((frame.convs as Record<string, unknown>[])[0]!.last_msg_id, 7n);
  assert.deepEqual(frame.msg_ids, [1n, 2n]);
  assert.equal(frame.up_to, 9n);
  assert.equal(frame.after, 11n);
  assert.equal(frame.id, 3);
});

test("a body is application data: kept as it is", () => {
  const frame = decodeBody(encodeBody({ t: "msg", body: { msg_id: 5, big: 2n ** 60n, list: [1] } }));
  assert.deepEqual(frame.body, { msg_id: 5, big: 2n ** 60n, list: [1] });
});

test("integers are written in their shortest form; wide ones as ints, never floats", () => {
  assert.equal(hex(encodeBody({ a: 1n })), "81a16101");
  assert.equal(hex(encodeBody({ a: 300 })), "81a161cd012c");
  assert.equal(hex(encodeBody({ a: 1764400000000 })), "81a161cf0000019ace6f6c00");
  assert.equal(hex(encodeBody({ a: 493692073500680n })), "81a161cf0001c102a4ab6008");
  assert.equal(hex(encodeBody({ a: -1 })), "81a161ff");
  assert.equal(hex(encodeBody({ a: -(2 ** 40) })), "81a161d3ffffff0000000000");
  assert.equal(hex(encodeBody({ a: 2n ** 63n - 1n })), "81a161cf7fffffffffffffff");
  assert.equal(hex(encodeBody({ a: 1.5 })), "81a161cb3ff8000000000000");
  assert.equal(hex(encodeBody({ a: undefined, b: "é" })), "81a162a2c3a9");
  assert.throws(() => encodeBody({ a: 2 ** 60 }), CodecError);
});

test("a body that is not one map is refused", () => {
  assert.throws(() => decodeBody(bytes("91 01")), CodecError);
  assert.throws(() => decodeBody(bytes("80 80")), CodecError);
  assert.throws(() => decodeBody(bytes("c1")), CodecError);
  assert.throws(() => decodeBody(bytes("")), CodecError);
});

test("the frame decoder splits a stream however it is chunked", () => {
  const stream = new Uint8Array([
    ...encodeFrame(encodeBody({ t: "a" })),
    ...encodeFrame(encodeBody({ t: "b", n: 1 })),
    ...encodeFrame(encodeBody({ t: "c" })),
  ]);
  for (const size of [1, 2, 3, 5, 7, stream.length]) {
    const decoder = new FrameDecoder();
    const out: string[] = [];
    for (let i = 0; i < stream.length; i += size) {
      for (const f of decoder.feed(stream.subarray(i, i + size))) out.push(String(decodeBody(f).t));
    }
    assert.deepEqual(out, ["a", "b", "c"], `chunks of ${size}`);
    assert.equal(decoder.pending, 0);
  }
});

test("the frame decoder refuses a length of 0 or above its maximum", () => {
  assert.throws(() => new FrameDecoder().feed(bytes("00000000")), FrameError);
  const d = new FrameDecoder(10);
  assert.deepEqual(d.feed(bytes("0000000a")), []);
  assert.throws(() => new FrameDecoder(10).feed(bytes("0000000b")), FrameError);
});
