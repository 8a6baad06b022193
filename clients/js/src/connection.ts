/**
 * The low-level connection: requests matched to replies by `id`, pushes
 * handed on as they come. No reconnect, no state: Client adds those.
 */

import { type Frame, decodeBody, encodeBody } from "./codec.js";
import { ImError } from "./errors.js";
import { type Timers, realTimers } from "./timers.js";
import type { Connector, Transport } from "./transport.js";

export interface ConnectionOptions {
  /** Every frame that is not a reply (pushes have no `id`). */
  onPush?: (frame: Frame) => void;
  /** Once, when the transport closes. */
  onClose?: (error?: Error) => void;
  timers?: Timers;
}

interface Pending {
  resolve(reply: Frame): void;
  reject(error: ImError): void;
  timer: unknown;
  /** The request's body size: see largestUnanswered. */
  size: number;
}

export class Connection {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private transport: Transport | undefined;
  private readonly timers: Timers;
  private closedError: ImError | undefined;
  private failed = false;
  /** `timers.now()` of the last frame sent / received: for heartbeats. */
  lastSent: number;
  lastReceived: number;
  /**
   * A request whose body is larger fails with `too_large` and is not sent
   * (the server would close the connection: `frame_too_large`).
   */
  maxRequestBytes: number | undefined;

  private constructor(private readonly options: ConnectionOptions) {
    this.timers = options.timers ?? realTimers;
    this.lastSent = this.lastReceived = this.timers.now();
  }

  /** Open a transport through `connector` and wrap it. */
  static async open(
    connector: Connector,
    url: string,
    options: ConnectionOptions = {},
  ): Promise<Connection> {
    const conn = new Connection(options);
    conn.transport = await connector(url, {
      message: (body) => conn.received(body),
      close: (error) => conn.fail(error),
    });
    conn.lastSent = conn.lastReceived = conn.timers.now();
    return conn;
  }

  get isOpen(): boolean {
    return !this.failed && this.transport !== undefined;
  }

  /**
   * Send `{t: op, id, ...fields}`; resolves with the reply's fields (without
   * `t` and `id`), rejects with an ImError (the server's code, `timeout`
   * after `timeoutMs`, `disconnected` if the connection closes first).
   */
  request(op: string, fields: Frame = {}, timeoutMs?: number): Promise<Frame> {
    if (this.failed) return Promise.reject(this.closedError);
    const id = this.nextId++;
    const frame: Frame = { t: op, id, ...fields };
    let body: Uint8Array;
    try {
      body = encodeBody(frame);
    } catch (e) {
      return Promise.reject(new ImError("invalid", (e as Error).message));
    }
    const limit = this.maxRequestBytes;
    if (limit !== undefined && body.length > limit) {
      return Promise.reject(new ImError("too_large", `a ${op} frame of ${body.length} bytes is over ${limit}`));
    }
    return new Promise<Frame>((resolve, reject) => {
      const entry: Pending = { resolve, reject, timer: undefined, size: body.length };
      if (timeoutMs !== undefined) {
        entry.timer = this.timers.setTimeout(() => {
          if (this.pending.delete(id)) {
            reject(new ImError("timeout", `no reply to ${op} within ${timeoutMs / 1000} s`));
          }
        }, timeoutMs);
      }
      this.pending.set(id, entry);
      this.sendBody(body);
    });
  }

  /** The body size of the largest request sent and not answered yet (0: none). */
  get largestUnanswered(): number {
    let largest = 0;
    for (const entry of this.pending.values()) largest = Math.max(largest, entry.size);
    return largest;
  }

  /** Send a frame that gets no reply handling (there is none of that kind in v1). */
  sendFrame(frame: Frame): void {
    this.sendBody(encodeBody(frame));
  }

  /** Close; what is in flight fails with `reason` (default `disconnected`). */
  close(reason?: ImError): void {
    if (reason !== undefined && this.closedError === undefined) this.closedError = reason;
    this.transport?.close();
    // Transports call back asynchronously or not at all once closed by us.
    this.fail(undefined);
  }

  private sendBody(body: Uint8Array): void {
    this.lastSent = this.timers.now();
    this.transport?.send(body);
  }

  private received(body: Uint8Array): void {
    this.lastReceived = this.timers.now();
    let frame: Frame;
    try {
      frame = decodeBody(body);
    } catch {
      // The server only sends maps; a frame we cannot read is dropped (a
      // lost event shows as a seq gap, which catch-up repairs).
      return;
    }
    const id = frame.id;
    if (id !== undefined && (frame.t === "ok" || frame.t === "error")) {
      // A reply; one whose request timed out (or was never ours) is dropped.
      const entry = typeof id === "number" ? this.pending.get(id) : undefined;
      if (entry !== undefined) {
        this.pending.delete(id as number);
        if (entry.timer !== undefined) this.timers.clearTimeout(entry.timer);
        if (frame.t === "ok") {
          const { t: _t, id: _id, ...result } = frame;
          entry.resolve(result);
        } else {
          entry.reject(
            new ImError(String(frame.code ?? "internal"), String(frame.message ?? frame.code)),
          );
        }
      }
      return;
    }
    this.options.onPush?.(frame);
  }

  private fail(error?: Error): void {
    if (this.failed) return;
    this.failed = true;
    this.closedError ??= new ImError("disconnected", error?.message ?? "the connection closed");
    for (const entry of this.pending.values()) {
      if (entry.timer !== undefined) this.timers.clearTimeout(entry.timer);
      entry.reject(this.closedError);
    }
    this.pending.clear();
    this.options.onClose?.(error);
  }
}
