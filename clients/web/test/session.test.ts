import assert from "node:assert/strict";
import { test } from "node:test";

import { readToken } from "../src/session.ts";

function jwt(claims: Record<string, unknown>): string {
  const part = (o: unknown) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}.c2lnbmF0dXJl`;
}

const later = Math.floor(Date.now() / 1000) + 3600;

test("a token's uid, expiry and device", () => {
  const info = readToken(`  ${jwt({ sub: "42", exp: later, device: "laptop" })}\n`);
  assert.deepEqual(info, { token: jwt({ sub: "42", exp: later, device: "laptop" }), uid: 42, exp: later, device: "laptop" });
  assert.equal(readToken(jwt({ sub: "7", exp: later })).device, null);
});

test("what is not a usable token is refused before connecting", () => {
  assert.throws(() => readToken("not-a-token"), /three parts/);
  assert.throws(() => readToken("a.b.c"), /cannot be read/);
  assert.throws(() => readToken(jwt({ sub: "0", exp: later })), /names no user/);
  assert.throws(() => readToken(jwt({ sub: "x", exp: later })), /names no user/);
  assert.throws(() => readToken(jwt({ sub: "42", exp: 1000 })), /expired/);
});
