/**
 * The high-level Client (docs/sdk.md): one connection per device that
 * reconnects by itself, catches up after every connect, de-duplicates,
 * acks in batches and keeps an outbox whose sends are retried with the same
 * cid. Browser-safe: the transport comes from a Connector (WebSocket by
 * default here; node.ts adds TCP and the ws package).
 */

import { type Frame, encodeBody } from "./codec.js";
import { Connection } from "./connection.js";
import { ImError, RETRIED_CODES } from "./errors.js";
import { Lru } from "./lru.js";
import { MemoryStore, type Store, type StoredState } from "./store.js";
import { type Random, type Timers, realTimers } from "./timers.js";
import { type Connector, TransportError } from "./transport.js";
import type {
  AuthResult,
  Body,
  ClientEvents,
  ConvsResult,
  Device,
  EventName,
  HistoryResult,
  Msg,
  OutboxEntry,
  PresenceSetting,
  PresenceState,
  ProfileResult,
  ReadResult,
  SendResult,
  SetProfileResult,
  State,
  StateEvent,
  UnreadResult,
  User,
} from "./types.js";
import { webSocketConnector } from "./websocket.js";

export const VERSION = "0.1.0";

export type TokenSource = string | (() => string | Promise<string>);

export interface ClientOptions {
  /** `ws://host:port/v1/ws`, `wss://...`; `tcp://host:port` with @imserver/client/node. */
  url: string;
  /** A token, or a function called before every connect (it may mint a new one). */
  token: TokenSource;
  /** The device name (1..64 chars); default: the store's, else a random id. */
  device?: string;
  /** Shown by `devices`; default `imserver-js/<version>`. */
  client?: string;
  /** Keeps device, seq and the outbox; default in memory. */
  store?: Store;
  /** Seconds (default 15): a request waits at most this long, for the connection and the reply. */
  requestTimeout?: number;
  /**
   * Seconds (default: requestTimeout) to get the token and open the transport;
   * then the attempt is given up and retried after the backoff delay.
   */
  connectTimeout?: number;
  /** Seconds (default 10): a ping unanswered this long means a dead connection. */
  pingTimeout?: number;
  /** Seconds (default 0.5 and 30): reconnect delays, full jitter. */
  backoffBase?: number;
  backoffMax?: number;
  /** Opens transports; default: WebSocket (global). */
  connector?: Connector;
  /** For tests: time and randomness. */
  timers?: Timers;
  random?: Random;
  /** Acks are sent after this many seconds (default 1) or ids (default 100). */
  ackDelay?: number;
  ackBatch?: number;
  /** Seconds a seq gap may stay open before a catch-up (default 3). */
  gapTimeout?: number;
  /** Page size of catch-up and sync (default 100). */
  pageLimit?: number;
  /**
   * Bytes (default 65536): the server's `max_frame_bytes` (its config; the
   * client cannot ask it). A send or request whose frame body is larger fails
   * with `too_large` without being sent: the server would close the
   * connection, and a send would be retried for ever. A `frame_too_large`
   * from the server (TCP) lowers it below the largest request then in flight.
   */
  maxFrameBytes?: number;
  /** Called with an exception thrown by an event handler (default console.error). */
  onHandlerError?: (error: unknown, event: EventName) => void;
}

type Handler<K extends EventName> = (event: ClientEvents[K]) => void;

interface OutboxItem {
  entry: OutboxEntry;
  resolve?: (result: SendResult) => void;
  reject?: (error: ImError) => void;
  inFlight: boolean;
  retryTimer: unknown;
  tries: number;
  /** Marks the send's promise handled: a kick or close rejects it, awaited or not. */
  quiet?: () => void;
}

interface Waiter {
  resolve(conn: Connection): void;
  reject(error: ImError): void;
  timer: unknown;
}

const TERMINAL: ReadonlySet<State> = new Set(["kicked", "failed", "closed"]);
const MAX_ACK_IDS = 500;
/** The largest request id: a send's size is checked with it (the real id is never longer). */
const ID_BOUND = 0xffffffff;

function defaultConnector(url: string): Connector {
  if (/^wss?:/i.test(url)) return webSocketConnector();
  throw new TransportError(
    `${url}: this entry point speaks WebSocket (ws://, wss://); for tcp:// use @imserver/client/node`,
  );
}

/** The fields given, in the protocol's order (so frames are the vectors' bytes). */
function pick<T extends object>(from: T, keys: (keyof T & string)[]): Frame {
  const out: Frame = {};
  for (const key of keys) if (from[key] !== undefined) out[key] = from[key];
  return out;
}

/** A reason for the state event from anything thrown (a token function may throw undefined). */
function reasonOf(e: unknown, fallback: string): string {
  if (e instanceof Error) return e.message || fallback;
  return e === undefined || e === null ? fallback : String(e);
}

function randomId(random: Random, length: number): string {
  const alphabet = "0123456789abcdefghijklmnopqrstuvwxyz";
  let out = "";
  for (let i = 0; i < length; i++) out += alphabet[Math.floor(random() * alphabet.length)];
  return out;
}

export class Client {
  private readonly opts: ClientOptions;
  private readonly timers: Timers;
  private readonly random: Random;
  private readonly store: Store;
  private readonly handlers = new Map<EventName, Set<Handler<never>>>();

  private _state: State = "offline";
  private _uid: number | undefined;
  private _device: string | undefined;
  /** The highest contiguous seq; `above` holds the seqs seen beyond a gap. */
  private _seq = 0;
  private readonly above = new Set<number>();
  private ackedSeq = 0;

  private readonly seenMsgs = new Lru<bigint, true>(10_000);
  private readonly edits = new Lru<bigint, { edited: number; msg: Msg }>(10_000);
  private readonly recalled = new Lru<bigint, true>(10_000);

  private conn: Connection | undefined;
  private authed = false;
  /** Bumped on every connect and terminal state: callbacks of older ones are ignored. */
  private gen = 0;
  private started = false;
  /** Settles once the store is loaded, the device known and the stored outbox queued. */
  private loaded: Promise<void> | undefined;
  private isLoaded = false;
  /** Sends made while the store loads: queued after the stored outbox, in order. */
  private early: { add(): void; reject(error: unknown): void; quiet(): void }[] = [];
  private attempt = 0;
  private heartbeat = 30;
  private holding = false;
  private held: Frame[] = [];
  private goingAway = false;
  private pingInFlight = false;
  /** Acks failed in a row on this connection: the retry waits longer each time. */
  private ackFailures = 0;
  private resyncChain: Promise<void> = Promise.resolve();

  private reconnectTimer: unknown;
  private heartbeatTimer: unknown;
  private ackTimer: unknown;
  private gapTimer: unknown;
  private goawayTimer: unknown;

  private readonly pendingAcks = new Set<bigint>();
  private readonly outboxes = new Map<number, OutboxItem[]>();
  private readonly cidPrefix: string;
  private cidCounter = 0;
  private waiters: Waiter[] = [];
  private liveWaiters: { resolve(): void; reject(e: ImError): void }[] = [];
  private watched: number[] | undefined;
  private saveScheduled = false;
  private saving = false;
  private nextSave: StoredState | undefined;
  /** The outbox as it was when the client turned terminal: saved from then on. */
  private keptOutbox: OutboxEntry[] | undefined;
  private terminalError: ImError | undefined;
  /** The known frame limit: lowered by a `frame_too_large` from the server. */
  private maxFrameBytes: number;
  /** The uid the stored state belongs to (saved once authenticated). */
  private savedUid: number | undefined;

  constructor(options: ClientOptions) {
    if (!options.url) throw new TypeError("Client needs a url");
    if (options.token === undefined) throw new TypeError("Client needs a token");
    if (options.connector === undefined) defaultConnector(options.url);
    this.opts = options;
    this.timers = options.timers ?? realTimers;
    this.random = options.random ?? Math.random;
    this.store = options.store ?? new MemoryStore();
    this.cidPrefix = randomId(this.random, 8);
    this.maxFrameBytes = options.maxFrameBytes ?? 65536;
    if (options.device !== undefined) this.checkDevice(options.device);
  }

  // ---- properties ------------------------------------------------------

  get state(): State {
    return this._state;
  }

  /** The signed-in uid, once authenticated. */
  get uid(): number | undefined {
    return this._uid;
  }

  get device(): string | undefined {
    return this._device;
  }

  /** The last contiguous seq of this device's stream. */
  get seq(): number {
    return this._seq;
  }

  /** The sends not answered yet, oldest first per peer. */
  get outbox(): OutboxEntry[] {
    const out: OutboxEntry[] = [];
    for (const queue of this.outboxes.values()) for (const item of queue) out.push(item.entry);
    return out;
  }

  // ---- lifecycle -------------------------------------------------------

  /** Load the store and connect (and keep connecting). Resolves once connecting began. */
  async start(): Promise<void> {
    if (this.started) return this.loaded;
    if (TERMINAL.has(this._state)) throw this.terminalError ?? new ImError("closed");
    this.started = true;
    this.loaded = this.load();
    try {
      await this.loaded;
    } catch (e) {
      // A store that cannot load: start() may be called again.
      this.started = false;
      this.loaded = undefined;
      for (const send of this.early.splice(0)) send.reject(e);
      throw e;
    }
    if (TERMINAL.has(this._state)) return;
    this.connectNow();
  }

  private async load(): Promise<void> {
    const stored: StoredState = (await this.store.load()) ?? {};
    if (TERMINAL.has(this._state)) return;
    this._device = this.opts.device ?? stored.device ?? `js-${randomId(this.random, 16)}`;
    // The state is the user's, not the device's: another device name keeps the
    // seq and the outbox (cids are unique strings); only another uid, known
    // at auth, discards them.
    if (typeof stored.seq === "number") this._seq = this.ackedSeq = stored.seq;
    if (typeof stored.uid === "number") this.savedUid = stored.uid;
    for (const entry of stored.outbox ?? []) this.enqueue({ entry, inFlight: false, retryTimer: undefined, tries: 0 });
    // Then the sends made meanwhile: their cids need the device.
    this.isLoaded = true;
    for (const send of this.early.splice(0)) send.add();
    this.saveSoon();
  }

  /** Resolves when the state is `live` (at once if it is); rejects once it cannot be. */
  waitLive(timeout?: number): Promise<void> {
    if (this._state === "live") return Promise.resolve();
    if (TERMINAL.has(this._state)) return Promise.reject(this.terminalError ?? new ImError("closed"));
    return new Promise<void>((resolve, reject) => {
      let timer: unknown;
      const waiter = {
        resolve: () => {
          if (timer !== undefined) this.timers.clearTimeout(timer);
          resolve();
        },
        reject: (e: ImError) => {
          if (timer !== undefined) this.timers.clearTimeout(timer);
          reject(e);
        },
      };
      if (timeout !== undefined) {
        timer = this.timers.setTimeout(() => {
          this.liveWaiters = this.liveWaiters.filter((w) => w !== waiter);
          reject(new ImError("timeout", `not live within ${timeout} s`));
        }, timeout * 1000);
      }
      this.liveWaiters.push(waiter);
    });
  }

  /** Stop for good: pending requests and sends reject with `closed` (the store keeps the outbox). */
  close(): void {
    if (this._state === "closed") return;
    const conn = this.conn;
    if (conn !== undefined && this.authed) this.flushAcks(true);
    this.terminate("closed", new ImError("closed", "the client was closed"));
  }

  // ---- events ----------------------------------------------------------

  /** Subscribe; returns a function that unsubscribes. */
  on<K extends EventName>(name: K, handler: Handler<K>): () => void {
    let set = this.handlers.get(name);
    if (set === undefined) {
      set = new Set();
      this.handlers.set(name, set);
    }
    set.add(handler as Handler<never>);
    return () => {
      this.handlers.get(name)?.delete(handler as Handler<never>);
    };
  }

  private emit<K extends EventName>(name: K, event: ClientEvents[K]): void {
    // Once closed (e.g. by a handler mid catch-up page) nothing more is emitted but that state change.
    if (this._state === "closed" && name !== "state") return;
    const set = this.handlers.get(name);
    if (set === undefined) return;
    for (const handler of [...set]) {
      try {
        (handler as Handler<K>)(event);
      } catch (e) {
        if (this.opts.onHandlerError) this.opts.onHandlerError(e, name);
        else console.error(`imserver client: a ${name} handler threw`, e);
      }
    }
  }

  private setState(state: State, extra: Omit<StateEvent, "state"> = {}): void {
    if (state === this._state && state !== "offline") return;
    this._state = state;
    this.emit("state", { state, ...extra });
  }

  // ---- connecting ------------------------------------------------------

  private get requestTimeoutMs(): number {
    return (this.opts.requestTimeout ?? 15) * 1000;
  }

  private get connectTimeoutMs(): number {
    return (this.opts.connectTimeout ?? this.opts.requestTimeout ?? 15) * 1000;
  }

  /** `promise`, or a `connect timeout` error at `deadline` (then `late` gets what it yields). */
  private within<T>(promise: Promise<T>, deadline: number, late?: (value: T) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let expired = false;
      const timer = this.timers.setTimeout(
        () => {
          expired = true;
          reject(new TransportError("connect timeout"));
        },
        Math.max(0, deadline - this.timers.now()),
      );
      promise.then(
        (value) => {
          if (expired) late?.(value);
          else {
            this.timers.clearTimeout(timer);
            resolve(value);
          }
        },
        (e: unknown) => {
          if (expired) return;
          this.timers.clearTimeout(timer);
          reject(e);
        },
      );
    });
  }

  /** Connect; a bug that escapes connect() must not leave an unhandled rejection and a stuck state. */
  private connectNow(): void {
    this.connect().catch((e: unknown) => {
      if (!TERMINAL.has(this._state)) this.scheduleReconnect(reasonOf(e, "cannot connect"));
    });
  }

  private async connect(): Promise<void> {
    const gen = ++this.gen;
    this.reconnectTimer = undefined;
    this.setState("connecting");
    this.authed = false;
    this.holding = true;
    this.held = [];
    this.goingAway = false;
    let token: string;
    let conn: Connection;
    // A black-holed host, or a proxy that takes the TCP connection but never
    // finishes the upgrade, would otherwise leave the state connecting for ever.
    const deadline = this.timers.now() + this.connectTimeoutMs;
    try {
      const source = this.opts.token;
      token =
        typeof source === "function" ? await this.within(Promise.resolve().then(() => source()), deadline) : source;
      if (gen !== this.gen) return;
      const connector = this.opts.connector ?? defaultConnector(this.opts.url);
      const opening = Connection.open(connector, this.opts.url, {
        timers: this.timers,
        onPush: (frame) => {
          if (gen === this.gen) this.pushed(frame);
        },
        onClose: (error) => {
          if (gen === this.gen) this.connectionLost(error?.message ?? "connection closed");
        },
      });
      // One that opens after all is closed at once.
      conn = await this.within(opening, deadline, (late) => late.close());
    } catch (e) {
      if (gen === this.gen) this.scheduleReconnect(reasonOf(e, "cannot connect"));
      return;
    }
    if (gen !== this.gen) {
      conn.close();
      return;
    }
    this.conn = conn;
    conn.maxRequestBytes = this.maxFrameBytes;
    let auth: AuthResult;
    try {
      auth = (await conn.request(
        "auth",
        {
          token,
          device: this._device,
          client: this.opts.client ?? `imserver-js/${VERSION}`,
          since: this._seq,
        },
        this.requestTimeoutMs,
      )) as unknown as AuthResult;
    } catch (e) {
      if (gen !== this.gen) return;
      const error = e as ImError;
      if (error.code === "auth_failed" && typeof this.opts.token !== "function") {
        this.terminate("failed", error);
        return;
      }
      this.scheduleReconnect(error.code === "auth_failed" ? "auth_failed" : error.message);
      return;
    }
    if (gen !== this.gen) return;
    this.authed = true;
    this.ackFailures = 0;
    this._uid = auth.uid;
    const otherUser = this.savedUid !== undefined && this.savedUid !== auth.uid;
    if (otherUser) {
      // Another user's state: its seq and its unsent messages are not ours
      // (the since sent was theirs: go on from this user's head).
      this.discardRestored();
      this._seq = this.ackedSeq = typeof auth.head === "number" ? auth.head : auth.seq;
      this.above.clear();
    }
    if (this.savedUid !== auth.uid) {
      this.savedUid = auth.uid;
      this.saveSoon();
    }
    this.heartbeat = typeof auth.heartbeat === "number" && auth.heartbeat > 0 ? auth.heartbeat : 30;
    if (auth.reset) {
      this._seq = this.ackedSeq = auth.seq;
      this.above.clear();
      this.stopGapTimer();
      this.saveSoon();
      this.emit("reset", {});
      if (gen !== this.gen) return;
    } else if (!otherUser && auth.seq !== this._seq) {
      // A new device starts at the head; a known one where it asked (since).
      this._seq = this.ackedSeq = auth.seq;
      this.above.clear();
      this.saveSoon();
    }
    this.scheduleHeartbeat();
    this.setState("syncing");
    try {
      await this.catchUp(conn, gen);
      await this.syncPending(conn, gen);
    } catch (e) {
      if (gen === this.gen) this.scheduleReconnect(reasonOf(e, "catch-up failed"));
      return;
    }
    if (gen !== this.gen) return;
    this.attempt = 0;
    this.holding = false;
    this.setState("live");
    const held = this.held;
    this.held = [];
    for (const frame of held) {
      if (gen !== this.gen) return;
      this.dispatch(frame, false);
    }
    for (const w of this.waiters.splice(0)) {
      this.timers.clearTimeout(w.timer);
      w.resolve(conn);
    }
    for (const w of this.liveWaiters.splice(0)) w.resolve();
    if (this.watched !== undefined && this.watched.length > 0) this.rewatch(conn);
    this.pumpOutbox();
    if (this.pendingAcks.size > 0 || this._seq > this.ackedSeq) this.flushAcks();
  }

  private connectionLost(reason: string): void {
    if (TERMINAL.has(this._state)) return;
    this.scheduleReconnect(reason, this.goingAway);
  }

  /** Drop the connection (if any) and connect again after the backoff delay. */
  private scheduleReconnect(reason: string, quick = false): void {
    if (TERMINAL.has(this._state)) return;
    this.gen++;
    const conn = this.conn;
    this.conn = undefined;
    this.authed = false;
    this.pingInFlight = false;
    this.stopTimer("heartbeatTimer");
    this.stopTimer("goawayTimer");
    // The next connection's catch-up covers the gap; a timer left running
    // would start a second catch-up on it while it syncs.
    this.stopGapTimer();
    conn?.close();
    const base = this.opts.backoffBase ?? 0.5;
    const max = this.opts.backoffMax ?? 30;
    let delay: number;
    if (quick) {
      delay = this.random();
    } else {
      delay = this.random() * Math.min(max, base * 2 ** this.attempt);
      this.attempt++;
    }
    this.setState("offline", { reason, retry_in: delay });
    this.stopTimer("reconnectTimer");
    this.reconnectTimer = this.timers.setTimeout(() => {
      this.connectNow();
    }, delay * 1000);
  }

  private terminate(state: "kicked" | "failed" | "closed", error: ImError): void {
    this.gen++;
    this.terminalError = error;
    const conn = this.conn;
    this.conn = undefined;
    this.authed = false;
    for (const name of ["reconnectTimer", "heartbeatTimer", "ackTimer", "gapTimer", "goawayTimer"] as const) {
      this.stopTimer(name);
    }
    for (const queue of this.outboxes.values()) {
      for (const item of queue) {
        if (item.retryTimer !== undefined) this.timers.clearTimeout(item.retryTimer);
        item.retryTimer = undefined;
      }
    }
    this.setState(state, state === "closed" ? {} : { reason: state === "kicked" ? error.message : error.code });
    conn?.close(error);
    for (const w of this.waiters.splice(0)) {
      this.timers.clearTimeout(w.timer);
      w.reject(error);
    }
    for (const w of this.liveWaiters.splice(0)) w.reject(error);
    // Sends made while the store loaded: never stored (that would overwrite it).
    for (const send of this.early.splice(0)) {
      send.quiet();
      send.reject(error);
    }
    // The entries stay in the store: the next Client that loads it sends them.
    // Saved now, before the queues are cleared: a save still pending from this
    // tick would otherwise read the empty outbox and wipe the stored one.
    this.keptOutbox = this.outbox;
    this.saveNow();
    // A send nobody awaited must not turn into an unhandledRejection here:
    // the stop is reported by the state event, and the entry stays stored.
    for (const queue of this.outboxes.values()) {
      for (const item of queue) {
        item.quiet?.();
        item.reject?.(error);
      }
    }
    this.outboxes.clear();
  }

  private stopTimer(
    name: "reconnectTimer" | "heartbeatTimer" | "ackTimer" | "gapTimer" | "goawayTimer",
  ): void {
    const handle = this[name];
    if (handle !== undefined) this.timers.clearTimeout(handle);
    this[name] = undefined;
  }

  private stopGapTimer(): void {
    this.stopTimer("gapTimer");
  }

  // ---- heartbeat -------------------------------------------------------

  private scheduleHeartbeat(): void {
    this.stopTimer("heartbeatTimer");
    const conn = this.conn;
    if (conn === undefined) return;
    const hb = this.heartbeat * 1000;
    const pt = (this.opts.pingTimeout ?? 10) * 1000;
    const now = this.timers.now();
    const nextPing = this.pingInFlight ? Infinity : conn.lastSent + hb;
    const dead = conn.lastReceived + hb + pt;
    const delay = Math.max(10, Math.min(nextPing, dead) - now);
    this.heartbeatTimer = this.timers.setTimeout(() => {
      this.heartbeatTimer = undefined;
      this.heartbeatTick(conn);
    }, delay);
  }

  private heartbeatTick(conn: Connection): void {
    if (conn !== this.conn) return;
    const hb = this.heartbeat * 1000;
    const pt = (this.opts.pingTimeout ?? 10) * 1000;
    const now = this.timers.now();
    if (now - conn.lastReceived >= hb + pt) {
      conn.close();
      return;
    }
    if (!this.pingInFlight && now - conn.lastSent >= hb) {
      this.pingInFlight = true;
      conn.request("ping", {}, pt).then(
        () => {
          if (conn !== this.conn) return;
          this.pingInFlight = false;
          this.scheduleHeartbeat();
        },
        () => {
          // No answer in time (or the connection went): it is dead.
          if (conn === this.conn) this.pingInFlight = false;
          conn.close();
        },
      );
    }
    this.scheduleHeartbeat();
  }

  // ---- catch-up and sync -----------------------------------------------

  private get pageLimit(): number {
    return this.opts.pageLimit ?? 100;
  }

  private async catchUp(conn: Connection, gen: number): Promise<void> {
    for (;;) {
      const page = await conn.request(
        "catchup",
        { after: this._seq, limit: this.pageLimit },
        this.requestTimeoutMs,
      );
      if (gen !== this.gen) return;
      const events = Array.isArray(page.events) ? (page.events as Frame[]) : [];
      for (const event of events) {
        this.dispatch(event, true);
        if (gen !== this.gen) return;
      }
      if (typeof page.seq === "number") this.advanceTo(page.seq);
      this.flushAcks();
      if (page.more !== true) return;
    }
  }

  private async syncPending(conn: Connection, gen: number): Promise<void> {
    let after: bigint | undefined;
    for (;;) {
      const fields: Frame = { limit: this.pageLimit };
      if (after !== undefined) fields.after = after;
      const page = await conn.request("sync", fields, this.requestTimeoutMs);
      if (gen !== this.gen) return;
      const msgs = Array.isArray(page.msgs) ? (page.msgs as Frame[]) : [];
      for (const msg of msgs) {
        this.dispatch({ t: "msg", ...msg }, true);
        if (gen !== this.gen) return;
      }
      if (page.more !== true) return;
      const last = msgs.length > 0 ? (msgs[msgs.length - 1]!.msg_id as bigint) : undefined;
      const next = typeof page.after === "bigint" ? page.after : last;
      if (next === undefined || next === after) return;
      after = next;
    }
  }

  /** Catch-up and sync again on the live connection (a `sync` push, a seq gap). */
  private resync(withSync: boolean): void {
    const conn = this.conn;
    const gen = this.gen;
    if (conn === undefined) return;
    this.resyncChain = this.resyncChain
      .then(async () => {
        if (gen !== this.gen) return;
        await this.catchUp(conn, gen);
        if (withSync) await this.syncPending(conn, gen);
      })
      .catch(() => {
        // A failed page: the connection is closed, and the reconnect catches up.
        if (gen === this.gen) conn.close();
      });
  }

  // ---- seq bookkeeping ---------------------------------------------------

  /** Record a seq; false if it was seen already (at or below the contiguous seq, or beyond a gap). */
  private markSeq(seq: number): boolean {
    if (seq <= this._seq || this.above.has(seq)) return false;
    this.above.add(seq);
    const before = this._seq;
    while (this.above.has(this._seq + 1)) {
      this.above.delete(this._seq + 1);
      this._seq++;
    }
    if (this.above.size === 0) this.stopGapTimer();
    else if (this.gapTimer === undefined) {
      this.gapTimer = this.timers.setTimeout(() => {
        this.gapTimer = undefined;
        if (this.above.size > 0 && this._state === "live") this.resync(false);
      }, (this.opts.gapTimeout ?? 3) * 1000);
    }
    if (this._seq !== before) this.seqAdvanced();
    return true;
  }

  private advanceTo(seq: number): void {
    if (seq <= this._seq) return;
    this._seq = seq;
    for (const s of [...this.above]) if (s <= seq) this.above.delete(s);
    while (this.above.has(this._seq + 1)) {
      this.above.delete(this._seq + 1);
      this._seq++;
    }
    if (this.above.size === 0) this.stopGapTimer();
    this.seqAdvanced();
  }

  private seqAdvanced(): void {
    this.saveSoon();
    if (this._state === "live") this.scheduleAck();
  }

  private ownSeq(reply: Frame): void {
    if (typeof reply.seq === "number") this.markSeq(reply.seq);
  }

  // ---- pushes and events -----------------------------------------------

  private pushed(frame: Frame): void {
    this.emit("push", frame as ClientEvents["push"]);
    const t = frame.t;
    if (t === "kick") {
      const reason = String(frame.reason ?? "kicked");
      this.emit("kick", { reason });
      this.terminate("kicked", new ImError("kicked", reason));
      return;
    }
    if (t === "error" && frame.code === "frame_too_large") {
      // The server closes now. The largest frame in flight is over its limit
      // (the one it refused is): lower ours, so that one fails with too_large
      // on the next connection instead of closing it too.
      const largest = this.conn?.largestUnanswered ?? 0;
      if (largest > 0 && largest <= this.maxFrameBytes) {
        this.maxFrameBytes = largest - 1;
        if (this.conn !== undefined) this.conn.maxRequestBytes = this.maxFrameBytes;
      }
      return;
    }
    if (t === "goaway") {
      this.goingAway = true;
      const conn = this.conn;
      // The server closes right after; close ourselves if it does not.
      this.stopTimer("goawayTimer");
      this.goawayTimer = this.timers.setTimeout(() => {
        if (conn === this.conn) conn?.close();
      }, 5000);
      return;
    }
    if (this.holding) this.held.push(frame);
    else this.dispatch(frame, false);
  }

  /** Handle one event, pushed or replayed; de-duplicates. */
  private dispatch(frame: Frame, replay: boolean): void {
    const t = frame.t;
    if (typeof t !== "string") return;
    // Any stream event counts for the contiguous seq, known or not (one this
    // SDK does not know yet would otherwise hold back every ack {seq}).
    if (typeof frame.seq === "number" && !this.markSeq(frame.seq)) {
      if (t === "msg") this.ackIfMine(frame as unknown as Msg);
      return;
    }
    switch (t) {
      case "msg":
        return this.onMsg(frame, replay);
      case "edit":
        return this.onEdit(frame, replay);
      case "read": {
        const { t: _t, ...rest } = frame;
        return this.emit("read", { ...(rest as unknown as ClientEvents["read"]), replay });
      }
      case "recall": {
        const msgId = frame.msg_id as bigint;
        if (this.recalled.has(msgId)) return;
        this.recalled.set(msgId, true);
        const { t: _t, ...rest } = frame;
        return this.emit("recall", { ...(rest as unknown as ClientEvents["recall"]), replay });
      }
      case "hide":
      case "clear":
      case "mute": {
        const { t: _t, ...rest } = frame;
        return this.emit(t, { ...rest, replay } as never);
      }
      case "delivered":
      case "typing":
      case "presence":
      case "profile":
      case "block": {
        const { t: _t, ...rest } = frame;
        return this.emit(t, rest as never);
      }
      case "sync":
        return this.resync(true);
      default:
        return;
    }
  }

  private onMsg(frame: Frame, replay: boolean): void {
    const { t: _t, unread, total_unread, seq, ...fields } = frame;
    let msg = fields as unknown as Msg;
    if (typeof msg.msg_id !== "bigint") return;
    if (this.seenMsgs.has(msg.msg_id)) {
      this.ackIfMine(msg);
      return;
    }
    this.seenMsgs.set(msg.msg_id, true);
    const edit = this.edits.get(msg.msg_id);
    if (edit !== undefined && edit.edited > (msg.edited ?? 0)) {
      // An edit overtook the message: show the newer version.
      msg = { ...msg, body: edit.msg.body, edited: edit.edited };
    } else if (msg.edited !== undefined) {
      this.edits.set(msg.msg_id, { edited: msg.edited, msg });
    }
    const event: ClientEvents["message"] = { msg, replay };
    if (unread !== undefined) event.unread = unread as number;
    if (total_unread !== undefined) event.total_unread = total_unread as number;
    if (seq !== undefined) event.seq = seq as number;
    this.emit("message", event);
    this.ackIfMine(msg);
  }

  private onEdit(frame: Frame, replay: boolean): void {
    const { t: _t, seq, ...fields } = frame;
    const msg = fields as unknown as Msg;
    const edited = msg.edited ?? 0;
    const known = this.edits.get(msg.msg_id);
    if (known !== undefined && known.edited >= edited) return;
    this.edits.set(msg.msg_id, { edited, msg });
    const event: ClientEvents["edit"] = { msg, replay };
    if (seq !== undefined) event.seq = seq as number;
    this.emit("edit", event);
  }

  // ---- acks --------------------------------------------------------------

  private ackIfMine(msg: Msg): void {
    if (this._uid === undefined || msg.to !== this._uid || msg.from === this._uid) return;
    if (typeof msg.msg_id !== "bigint") return;
    this.pendingAcks.add(msg.msg_id);
    if (this.pendingAcks.size >= (this.opts.ackBatch ?? 100)) this.flushAcks();
    else this.scheduleAck();
  }

  private scheduleAck(delay = this.opts.ackDelay ?? 1): void {
    if (this.ackTimer !== undefined) return;
    this.ackTimer = this.timers.setTimeout(() => {
      this.ackTimer = undefined;
      this.flushAcks();
    }, delay * 1000);
  }

  /** Send what is to ack now: msg_ids (500 a frame) and the contiguous seq. */
  private flushAcks(final = false): void {
    this.stopTimer("ackTimer");
    const conn = this.conn;
    if (conn === undefined || !this.authed) return;
    do {
      const ids = [...this.pendingAcks].slice(0, MAX_ACK_IDS);
      const seq = this._seq;
      if (ids.length === 0 && seq <= this.ackedSeq) return;
      const fields: Frame = {};
      if (ids.length > 0) fields.msg_ids = ids;
      if (seq > this.ackedSeq) fields.seq = seq;
      for (const id of ids) this.pendingAcks.delete(id);
      const before = this.ackedSeq;
      this.ackedSeq = Math.max(this.ackedSeq, seq);
      if (final) {
        conn.sendFrame({ t: "ack", id: 0x7fffffff, ...fields });
        continue;
      }
      conn.request("ack", fields, this.requestTimeoutMs).then(
        () => {
          if (conn === this.conn) this.ackFailures = 0;
        },
        (e: ImError) => {
          // Not acked: again later on this connection if it is still up (else
          // on the next one: the server may resend them meanwhile).
          for (const id of ids) this.pendingAcks.add(id);
          if (this.ackedSeq === seq) this.ackedSeq = before;
          if (conn !== this.conn || !this.authed || !RETRIED_CODES.has(e.code)) return;
          this.ackFailures++;
          const base = this.opts.ackDelay ?? 1;
          this.scheduleAck(Math.min(this.opts.backoffMax ?? 30, base * 2 ** this.ackFailures));
        },
      );
    } while (this.pendingAcks.size > 0);
  }

  // ---- the store -------------------------------------------------------

  /** Save once, at the end of this tick: many changes, one write. */
  private saveSoon(): void {
    if (this.saveScheduled) return;
    this.saveScheduled = true;
    queueMicrotask(() => {
      if (this.saveScheduled) this.saveNow();
    });
  }

  /** Save the state as it is now (cancels a pending saveSoon). */
  private saveNow(): void {
    this.saveScheduled = false;
    // The device is set once the store is loaded; before, a save would overwrite it.
    if (this._device === undefined) return;
    // Once terminal the queues are empty, but what was unanswered stays stored.
    const state: StoredState = {
      device: this._device,
      ...(this.savedUid !== undefined ? { uid: this.savedUid } : {}),
      seq: this._seq,
      outbox: this.keptOutbox ?? this.outbox,
    };
    this.write(state);
  }

  /**
   * One save at a time: while an async one runs, only the latest state waits
   * (written when it ends), so an older snapshot can never finish last.
   */
  private write(state: StoredState): void {
    if (this.saving) {
      this.nextSave = state;
      return;
    }
    this.saving = true;
    const done = (): void => {
      this.saving = false;
      const next = this.nextSave;
      this.nextSave = undefined;
      if (next !== undefined) this.write(next);
    };
    let result: void | Promise<void>;
    try {
      result = this.store.save(state);
    } catch (e) {
      console.error("imserver client: store.save failed", e);
      return done();
    }
    if (result && typeof (result as Promise<void>).then === "function") {
      (result as Promise<void>).then(done, (e: unknown) => {
        console.error("imserver client: store.save failed", e);
        done();
      });
    } else {
      done();
    }
  }

  // ---- the outbox ------------------------------------------------------

  private newCid(): string {
    const n = String(++this.cidCounter);
    const room = 64 - this.cidPrefix.length - n.length - 2;
    const device = (this._device ?? "js").slice(0, room);
    return `${device}.${this.cidPrefix}.${n}`;
  }

  private enqueue(item: OutboxItem): void {
    let queue = this.outboxes.get(item.entry.to);
    if (queue === undefined) {
      queue = [];
      this.outboxes.set(item.entry.to, queue);
    }
    queue.push(item);
  }

  private pumpOutbox(): void {
    if (this._state !== "live" || this.conn === undefined) return;
    for (const queue of this.outboxes.values()) {
      const head = queue[0];
      if (head !== undefined && !head.inFlight && head.retryTimer === undefined) this.sendItem(head);
    }
  }

  private sendItem(item: OutboxItem): void {
    const conn = this.conn;
    if (conn === undefined) return;
    item.inFlight = true;
    conn.request("send", this.sendFields(item.entry), this.requestTimeoutMs).then(
      (reply) => {
        item.inFlight = false;
        this.removeItem(item);
        this.ownSeq(reply);
        if (typeof reply.msg_id === "bigint") this.seenMsgs.set(reply.msg_id, true);
        item.resolve?.(reply as unknown as SendResult);
        this.pumpOutbox();
      },
      (e: ImError) => {
        item.inFlight = false;
        if (!this.isQueued(item)) return;
        if (e.code === "disconnected" && conn !== this.conn) return; // sent again once live
        if (RETRIED_CODES.has(e.code)) {
          item.tries++;
          const base = this.opts.backoffBase ?? 0.5;
          const max = this.opts.backoffMax ?? 30;
          const delay = this.random() * Math.min(max, base * 2 ** item.tries);
          item.retryTimer = this.timers.setTimeout(() => {
            item.retryTimer = undefined;
            this.pumpOutbox();
          }, delay * 1000);
          return;
        }
        this.removeItem(item);
        item.reject?.(e);
        this.pumpOutbox();
      },
    );
  }

  /** An error if the server could not read this send (it would close the connection). */
  private checkSize(entry: OutboxEntry): ImError | undefined {
    let size: number;
    try {
      size = encodeBody({ t: "send", id: ID_BOUND, ...this.sendFields(entry) }).length;
    } catch (e) {
      return new ImError("invalid", `the body cannot be encoded: ${reasonOf(e, "invalid")}`);
    }
    if (size > this.maxFrameBytes) {
      return new ImError("too_large", `a send frame of ${size} bytes is over maxFrameBytes (${this.maxFrameBytes})`);
    }
    return undefined;
  }

  private sendFields(entry: OutboxEntry): Frame {
    const { to, cid, body, type } = entry;
    const fields: Frame = { to, cid };
    if (type !== undefined) fields.type = type;
    fields.body = body;
    return fields;
  }

  /** Forget the entries loaded from the store (nobody waits on them): another user's. */
  private discardRestored(): void {
    for (const [peer, queue] of [...this.outboxes]) {
      const kept = queue.filter((item) => item.resolve !== undefined || item.inFlight);
      if (kept.length > 0) this.outboxes.set(peer, kept);
      else this.outboxes.delete(peer);
    }
    this.saveSoon();
  }

  private isQueued(item: OutboxItem): boolean {
    return this.outboxes.get(item.entry.to)?.includes(item) ?? false;
  }

  private removeItem(item: OutboxItem): void {
    const queue = this.outboxes.get(item.entry.to);
    if (queue === undefined) return;
    const i = queue.indexOf(item);
    if (i >= 0) queue.splice(i, 1);
    if (queue.length === 0) this.outboxes.delete(item.entry.to);
    this.saveSoon();
  }

  /**
   * Send a message: queued in the outbox, sent when live, one at a time per
   * peer, retried with the same cid. Resolves with the send's result.
   */
  send(to: number, body: Body, type?: string): Promise<SendResult> {
    if (TERMINAL.has(this._state)) return Promise.reject(this.terminalError ?? new ImError("closed"));
    if (!this.started) return Promise.reject(new ImError("closed", "call start() first"));
    const promise = new Promise<SendResult>((resolve, reject) => {
      // Called only at a kick or close, once `promise` is set.
      const quiet = (): void => void promise.catch(() => undefined);
      const add = (): void => {
        const entry: OutboxEntry = { cid: this.newCid(), to, body };
        if (type !== undefined) entry.type = type;
        const refused = this.checkSize(entry);
        if (refused !== undefined) return reject(refused);
        this.enqueue({ entry, resolve, reject, inFlight: false, retryTimer: undefined, tries: 0, quiet });
        this.saveSoon();
        this.pumpOutbox();
      };
      // Queued at once once loaded (a close() in the same tick still stores it).
      if (this.isLoaded) add();
      else this.early.push({ add, reject, quiet });
    });
    return promise;
  }

  // ---- requests ----------------------------------------------------------

  private waitConnection(deadline: number): Promise<Connection> {
    if (this._state === "live" && this.conn !== undefined) return Promise.resolve(this.conn);
    if (TERMINAL.has(this._state)) return Promise.reject(this.terminalError ?? new ImError("closed"));
    return new Promise<Connection>((resolve, reject) => {
      const waiter: Waiter = { resolve, reject, timer: undefined };
      waiter.timer = this.timers.setTimeout(
        () => {
          this.waiters = this.waiters.filter((w) => w !== waiter);
          reject(new ImError("timeout", "not connected within the request timeout"));
        },
        Math.max(0, deadline - this.timers.now()),
      );
      this.waiters.push(waiter);
    });
  }

  /** Any op: waits for the connection, then resolves with the reply's fields. */
  async request<T = Frame>(op: string, fields: Frame = {}): Promise<T> {
    const deadline = this.timers.now() + this.requestTimeoutMs;
    const conn = await this.waitConnection(deadline);
    const reply = await conn.request(op, fields, Math.max(1, deadline - this.timers.now()));
    return reply as unknown as T;
  }

  ping(): Promise<{ server_time: number }> {
    return this.request("ping");
  }

  async read(session_id: bigint, msg_id: bigint): Promise<ReadResult> {
    const reply = await this.request<ReadResult>("read", { session_id, msg_id });
    this.ownSeq(reply as unknown as Frame);
    return reply;
  }

  unread(): Promise<UnreadResult> {
    return this.request("unread");
  }

  convs(options: { limit?: number; before?: bigint } = {}): Promise<ConvsResult> {
    return this.request("convs", pick(options, ["limit", "before"]));
  }

  history(
    options: { peer?: number; session_id?: bigint; before?: bigint; limit?: number },
  ): Promise<HistoryResult> {
    return this.request("history", pick(options, ["peer", "session_id", "before", "limit"]));
  }

  async recall(msg_id: bigint): Promise<{ seq?: number }> {
    const reply = await this.request<{ seq?: number }>("recall", { msg_id });
    this.recalled.set(msg_id, true);
    this.ownSeq(reply as Frame);
    return reply;
  }

  profile(uids: number[]): Promise<ProfileResult> {
    return this.request("profile", { uids });
  }

  setProfile(fields: {
    nickname?: string;
    avatar?: string;
    presence?: PresenceSetting;
  }): Promise<SetProfileResult> {
    return this.request("set_profile", pick(fields, ["nickname", "avatar", "presence"]));
  }

  devices(): Promise<{ devices: Device[] }> {
    return this.request("devices");
  }

  logoutDevice(device: string): Promise<{ kicked: boolean }> {
    return this.request("logout_device", { device });
  }

  block(uid: number): Promise<Record<string, never>> {
    return this.request("block", { uid });
  }

  unblock(uid: number): Promise<Record<string, never>> {
    return this.request("unblock", { uid });
  }

  blocked(options: { after?: number; limit?: number } = {}): Promise<{ uids: number[]; more: boolean }> {
    return this.request("blocked", pick(options, ["after", "limit"]));
  }

  async mute(session_id: bigint, until: number): Promise<{ muted_until: number; seq?: number }> {
    const reply = await this.request<{ muted_until: number; seq?: number }>("mute", { session_id, until });
    this.ownSeq(reply as Frame);
    return reply;
  }

  async edit(msg_id: bigint, body: Body): Promise<{ edited: number; seq?: number }> {
    const reply = await this.request<{ edited: number; seq?: number }>("edit", { msg_id, body });
    this.ownSeq(reply as Frame);
    const known = this.edits.get(msg_id);
    if (known === undefined || known.edited < reply.edited) {
      // Our own edit is not pushed back to us; remember its version.
      const msg = { ...(known?.msg ?? ({} as Msg)), msg_id, body, edited: reply.edited };
      this.edits.set(msg_id, { edited: reply.edited, msg });
    }
    return reply;
  }

  async hide(msg_ids: bigint[]): Promise<{ seq?: number }> {
    const reply = await this.request<{ seq?: number }>("hide", { msg_ids });
    this.ownSeq(reply as Frame);
    return reply;
  }

  async clear(session_id: bigint): Promise<{ up_to: bigint; seq?: number }> {
    const reply = await this.request<{ up_to: bigint; seq?: number }>("clear", { session_id });
    this.ownSeq(reply as Frame);
    return reply;
  }

  presence(uids: number[]): Promise<{ users: PresenceState[] }> {
    return this.request("presence", { uids });
  }

  /**
   * Watch these users' presence (replaces the set); watched again after every reconnect.
   * The set is kept only once the server accepted it, so a refused watch is not repeated.
   */
  async watch(uids: number[]): Promise<{ users: PresenceState[] }> {
    const wanted = [...uids];
    const reply = await this.request<{ users: PresenceState[] }>("watch", { uids: wanted });
    this.watched = wanted;
    return reply;
  }

  typing(to: number, active: boolean): Promise<Record<string, never>> {
    return this.request("typing", { to, active });
  }

  private rewatch(conn: Connection): void {
    const uids = this.watched ?? [];
    conn.request("watch", { uids }, this.requestTimeoutMs).then(
      (reply) => {
        for (const user of (reply.users as PresenceState[] | undefined) ?? []) this.emit("presence", user);
      },
      () => {
        // The connection went; the next one watches again.
      },
    );
  }

  private checkDevice(device: string): void {
    if (typeof device !== "string" || device.length < 1 || device.length > 64) {
      throw new TypeError("device must have 1..64 characters");
    }
  }
}

export type { User };
