/**
 * Fakes for the unit tests: a clock the test advances, and a server that
 * speaks frames through an in-memory transport (auth, catchup, sync, ack and
 * ping answered by default; any op can be scripted).
 */

import { type Frame, decodeBody, encodeBody } from "../../src/codec.js";
import type { Timers } from "../../src/timers.js";
import type { Connector, Transport, TransportHandlers } from "../../src/transport.js";

/** Let promise callbacks and queued microtasks run. */
export async function flush(rounds = 5): Promise<void> {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}

export class FakeClock implements Timers {
  private t = 1_000_000;
  private nextId = 1;
  private readonly pending = new Map<number, { at: number; fn: () => void }>();

  setTimeout(fn: () => void, ms: number): unknown {
    const id = this.nextId++;
    this.pending.set(id, { at: this.t + Math.max(0, ms), fn });
    return id;
  }

  clearTimeout(handle: unknown): void {
    this.pending.delete(handle as number);
  }

  now(): number {
    return this.t;
  }

  get timers(): number {
    return this.pending.size;
  }

  /** Move time forward by `ms`, firing due timers in order (and the promises they start). */
  async advance(ms: number): Promise<void> {
    const target = this.t + ms;
    await flush();
    for (;;) {
      let nextId: number | undefined;
      let nextAt = Infinity;
      for (const [id, timer] of this.pending) {
        if (timer.at < nextAt || (timer.at === nextAt && id < (nextId ?? Infinity))) {
          nextAt = timer.at;
          nextId = id;
        }
      }
      if (nextId === undefined || nextAt > target) break;
      const timer = this.pending.get(nextId)!;
      this.pending.delete(nextId);
      this.t = Math.max(this.t, timer.at);
      timer.fn();
      await flush();
    }
    this.t = target;
    await flush();
  }
}

export type Answer = Frame | { error: string; message?: string } | null;
export type OpHandler = (request: Frame, socket: FakeSocket) => Answer | undefined;

/** One connection as the server sees it. */
export class FakeSocket {
  readonly received: Frame[] = [];
  closed = false;

  constructor(
    private readonly server: FakeServer,
    private readonly handlers: TransportHandlers,
  ) {}

  /** Send a frame to the client (a push, or a reply built by hand). */
  push(frame: Frame): void {
    if (!this.closed) this.handlers.message(encodeBody(frame));
  }

  reply(request: Frame, fields: Frame = {}): void {
    this.push({ t: "ok", id: request.id, ...fields });
  }

  error(request: Frame, code: string, message = code): void {
    this.push({ t: "error", id: request.id, code, message });
  }

  /** The server closes the connection. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.handlers.close();
  }

  of(op: string): Frame[] {
    return this.received.filter((f) => f.t === op);
  }

  /** Called by the transport for every frame the client sends. */
  deliver(body: Uint8Array): void {
    const frame = decodeBody(body);
    this.received.push(frame);
    this.server.requests.push(frame);
    const op = String(frame.t);
    const custom = this.server.handlers[op]?.(frame, this);
    const answer = custom !== undefined ? custom : this.server.defaultAnswer(frame, this);
    if (answer === null) return; // left unanswered (or answered by hand)
    if ("error" in answer && typeof answer.error === "string") {
      this.error(frame, answer.error, (answer.message as string | undefined) ?? answer.error);
    } else {
      this.reply(frame, answer);
    }
  }
}

export class FakeServer {
  readonly sockets: FakeSocket[] = [];
  readonly requests: Frame[] = [];
  handlers: Record<string, OpHandler> = {};
  refuse = false;
  connects = 0;
  uid = 42;
  heartbeat = 30;
  /** The stream's head; `auth` answers seq = since (or head for a new device). */
  head = 0;
  /** Events for `catchup`, by seq; `pending` for `sync`. */
  events: Frame[] = [];
  pending: Frame[] = [];
  knownDevices = new Set<string>();

  get socket(): FakeSocket {
    return this.sockets[this.sockets.length - 1]!;
  }

  of(op: string): Frame[] {
    return this.requests.filter((f) => f.t === op);
  }

  readonly connector: Connector = async (_url, handlers) => {
    this.connects++;
    await Promise.resolve();
    if (this.refuse) throw new Error("connection refused");
    const socket = new FakeSocket(this, handlers);
    this.sockets.push(socket);
    let closing = false;
    const transport: Transport = {
      send: (body) => {
        if (socket.closed || closing) return;
        // As over a network: the server sees it a moment later.
        queueMicrotask(() => {
          if (!socket.closed) socket.deliver(body);
        });
      },
      close: () => {
        if (socket.closed || closing) return;
        closing = true;
        // What was sent before the close still arrives (a TCP FIN, a WebSocket close frame).
        queueMicrotask(() => {
          socket.closed = true;
          handlers.close();
        });
      },
    };
    return transport;
  };

  defaultAnswer(request: Frame, _socket: FakeSocket): Answer {
    switch (request.t) {
      case "auth": {
        const device = String(request.device ?? "default");
        const known = this.knownDevices.has(device);
        this.knownDevices.add(device);
        const since = Number(request.since ?? 0);
        const seq = known ? since : this.head;
        return {
          uid: this.uid,
          heartbeat: this.heartbeat,
          server_time: 1764400000000,
          device,
          seq,
          head: this.head,
          new_device: !known,
        };
      }
      case "catchup": {
        const after = Number(request.after ?? 0);
        const events = this.events.filter((e) => (e.seq as number) > after);
        return { events, seq: Math.max(after, this.head), more: false };
      }
      case "sync":
        return { msgs: this.pending, more: false };
      case "ack":
        return {};
      case "ping":
        return { server_time: 1764400000000 };
      default:
        return { error: "unknown_op" };
    }
  }
}

let nextMsgId = 493692073500680n;

/** A msg object as the server sends it. */
export function msg(fields: Partial<Frame> & { from: number; to: number }): Frame {
  nextMsgId += 8n;
  return {
    msg_id: nextMsgId,
    session_id: 493692073500001n,
    cid: `c-${nextMsgId}`,
    type: "text",
    body: "hello",
    ts: 1764400000000,
    sender: { nickname: "", avatar: "" },
    ...fields,
  };
}
