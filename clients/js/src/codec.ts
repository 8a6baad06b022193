/**
 * The frame body codec: one msgpack map with string keys.
 *
 * Ids (`msg_id`, `session_id` and the fields that hold them) are `bigint`
 * in the SDK (docs/sdk.md, "Ids in JavaScript"): msgpack does not say which
 * integers are ids, so decoding reads int64 values as bigint and then
 * normalises by field name; every other integer becomes a `number` when it is
 * safe. Encoding writes every integer in its shortest msgpack form, as the
 * server does, so the bytes match the protocol's test vectors.
 */

import { Decoder, Encoder, type ExtensionCodecType } from "@msgpack/msgpack";

/** Fields whose values (or, for arrays, elements) are ids: bigint in JS. */
export const ID_FIELDS: ReadonlySet<string> = new Set([
  "msg_id",
  "session_id",
  "msg_ids",
  "last_msg_id",
  "up_to",
  "peer_read",
  "peer_delivered",
]);

/**
 * Fields that are ids in replies and pushes only: `after` of a `sync` reply
 * is a msg_id, while the `after` of `catchup` (a seq) and of `blocked` (a
 * uid) are requests, never decoded.
 */
const DECODED_ID_FIELDS: ReadonlySet<string> = new Set([...ID_FIELDS, "after"]);

/** Application data: kept as sent, never normalised by field name. */
const OPAQUE_FIELDS: ReadonlySet<string> = new Set(["body"]);

export type Frame = Record<string, unknown>;

/** A frame body that is not one msgpack map with string keys. */
export class CodecError extends Error {
  override name = "CodecError";
}

/** The protocol has no extension types (the timestamp -1 included). */
const noExtensions: ExtensionCodecType<undefined> = {
  tryToEncode: () => null,
  decode: (_data, extType) => {
    throw new CodecError(`msgpack extension type ${extType} is not part of the protocol`);
  },
};

const decoder = new Decoder({
  useBigInt64: true,
  extensionCodec: noExtensions,
  mapKeyConverter: (key: unknown) => {
    if (typeof key !== "string") throw new CodecError("map keys must be strings");
    return key;
  },
});
const encoder = new Encoder({ useBigInt64: true, ignoreUndefined: true });

const INT32_MIN = -0x80000000;
const UINT32_MAX = 0xffffffff;

function toId(value: unknown): unknown {
  if (typeof value === "number" && Number.isInteger(value)) return BigInt(value);
  return value;
}

function plain(value: unknown): unknown {
  if (typeof value === "bigint") {
    return value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER)
      ? Number(value)
      : value;
  }
  if (Array.isArray(value)) return value.map(plain);
  if (isMap(value)) {
    const out: Frame = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}

function isMap(value: unknown): value is Frame {
  return (
    typeof value === "object" &&
    value !== null &&
    !Array.isArray(value) &&
    !(value instanceof Uint8Array)
  );
}

/** Normalise a decoded value: ids to bigint by field name, other integers to number. */
export function normalize(value: unknown, key?: string): unknown {
  if (key !== undefined && OPAQUE_FIELDS.has(key)) return plain(value);
  if (key !== undefined && DECODED_ID_FIELDS.has(key)) {
    if (Array.isArray(value)) return value.map(toId);
    return toId(value);
  }
  if (typeof value === "bigint") return plain(value);
  if (Array.isArray(value)) return value.map((v) => normalize(v));
  if (isMap(value)) {
    const out: Frame = {};
    for (const [k, v] of Object.entries(value)) out[k] = normalize(v, k);
    return out;
  }
  return value;
}

/**
 * Prepare a value for the bigint-aware encoder: integers within 32 bits as
 * numbers (fixint..uint32/int32), wider ones as bigint (uint64/int64), which
 * is msgpack's shortest form; without this the encoder writes a wide
 * `number` as a float, which the server refuses for an integer field.
 */
function wire(value: unknown): unknown {
  if (typeof value === "bigint") {
    return value >= BigInt(INT32_MIN) && value <= BigInt(UINT32_MAX) ? Number(value) : value;
  }
  if (typeof value === "number") {
    if (Number.isInteger(value) && (value < INT32_MIN || value > UINT32_MAX)) {
      if (!Number.isSafeInteger(value)) {
        throw new CodecError(`integer ${value} is not exact as a number: pass a bigint`);
      }
      return BigInt(value);
    }
    return value;
  }
  if (Array.isArray(value)) return value.map(wire);
  if (value instanceof Uint8Array) return value;
  if (typeof value === "object" && value !== null) {
    const out: Frame = {};
    for (const [k, v] of Object.entries(value)) {
      if (v !== undefined) out[k] = wire(v);
    }
    return out;
  }
  return value;
}

/** Encode a frame body (a map) to msgpack bytes, without the length prefix. */
export function encodeBody(frame: Frame): Uint8Array {
  return encoder.encode(wire(frame));
}

/** Decode a frame body; a CodecError if it is not a msgpack map with string keys. */
export function decodeBody(bytes: Uint8Array): Frame {
  let value: unknown;
  try {
    value = decoder.decode(bytes);
  } catch (e) {
    if (e instanceof CodecError) throw e;
    throw new CodecError(`not one msgpack value: ${(e as Error).message}`);
  }
  if (!isMap(value) || value instanceof Map) {
    throw new CodecError("a frame body must be a msgpack map");
  }
  return normalize(value) as Frame;
}
