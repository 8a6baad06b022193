/**
 * TCP framing: a 4-byte big-endian length, then that many bytes of body.
 * (A WebSocket message is one body: no prefix.)
 */

/** The server's limit is configurable up to 16 MiB; it never sends more. */
export const DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024;

export class FrameError extends Error {
  override name = "FrameError";
}

/** A body with its length prefix. */
export function encodeFrame(body: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length, false);
  out.set(body, 4);
  return out;
}

/**
 * Splits a byte stream into frame bodies, whatever the chunking. A length of
 * 0 or above `maxFrameBytes` throws: the stream cannot be resynchronised.
 */
export class FrameDecoder {
  private chunks: Uint8Array[] = [];
  private buffered = 0;
  private need = -1;

  constructor(readonly maxFrameBytes: number = DEFAULT_MAX_FRAME_BYTES) {}

  /** Feed bytes; returns the bodies completed by them, in order. */
  feed(chunk: Uint8Array): Uint8Array[] {
    const frames: Uint8Array[] = [];
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    for (;;) {
      if (this.need < 0) {
        if (this.buffered < 4) break;
        const head = this.take(4);
        const length = new DataView(head.buffer, head.byteOffset, 4).getUint32(0, false);
        if (length === 0 || length > this.maxFrameBytes) {
          throw new FrameError(`frame length ${length} outside 1..${this.maxFrameBytes}`);
        }
        this.need = length;
      }
      if (this.buffered < this.need) break;
      frames.push(this.take(this.need));
      this.need = -1;
    }
    return frames;
  }

  /** Bytes held for an incomplete frame. */
  get pending(): number {
    return this.buffered + (this.need >= 0 ? 4 : 0);
  }

  private take(n: number): Uint8Array {
    const first = this.chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    const out = new Uint8Array(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0]!;
      const use = Math.min(c.length, n - filled);
      out.set(c.subarray(0, use), filled);
      filled += use;
      if (use === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(use);
    }
    this.buffered -= n;
    return out;
  }
}
