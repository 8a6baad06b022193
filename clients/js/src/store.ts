/**
 * Where a Client keeps what must survive a restart of the application: its
 * device name, its place in the stream (`seq`) and the unanswered sends.
 */

import type { OutboxEntry } from "./types.js";

export interface StoredState {
  device?: string;
  /** Whose state it is: another uid at auth discards the seq and the outbox. */
  uid?: number;
  seq?: number;
  outbox?: OutboxEntry[];
}

export interface Store {
  load(): StoredState | undefined | Promise<StoredState | undefined>;
  /** Called after changes; may return a promise: the next save waits for it. */
  save(state: StoredState): void | Promise<void>;
}

/** The default: nothing survives the process (a new device each time). */
export class MemoryStore implements Store {
  state: StoredState | undefined;

  constructor(initial?: StoredState) {
    this.state = initial;
  }

  load(): StoredState | undefined {
    return this.state === undefined ? undefined : clone(this.state);
  }

  save(state: StoredState): void {
    this.state = clone(state);
  }
}

/** JSON with bigint (`{"$bigint": "123"}`), for bodies that hold one. */
export function toJSON(state: StoredState): string {
  return JSON.stringify(state, (_k, v: unknown) =>
    typeof v === "bigint" ? { $bigint: v.toString() } : v,
  );
}

export function fromJSON(text: string): StoredState {
  return JSON.parse(text, (_k, v: unknown) => {
    if (
      typeof v === "object" &&
      v !== null &&
      Object.keys(v).length === 1 &&
      typeof (v as { $bigint?: unknown }).$bigint === "string"
    ) {
      return BigInt((v as { $bigint: string }).$bigint);
    }
    return v;
  }) as StoredState;
}

function clone(state: StoredState): StoredState {
  return fromJSON(toJSON(state));
}

/** The part of the Web Storage API the store uses. */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

/**
 * A browser store: one JSON entry in `localStorage` (or another Storage)
 * under `key`. Use one key per signed-in user: a store holds one user's
 * place in the stream and unsent messages (a Client signed in as another
 * uid discards them; another device name keeps them).
 */
export class LocalStorageStore implements Store {
  private readonly storage: StorageLike;

  constructor(
    readonly key: string = "imserver",
    storage?: StorageLike,
  ) {
    const s = storage ?? (globalThis as { localStorage?: StorageLike }).localStorage;
    if (s === undefined) throw new Error("no localStorage here: pass a Storage");
    this.storage = s;
  }

  load(): StoredState | undefined {
    const text = this.storage.getItem(this.key);
    if (text === null) return undefined;
    try {
      return fromJSON(text);
    } catch {
      return undefined;
    }
  }

  save(state: StoredState): void {
    try {
      this.storage.setItem(this.key, toJSON(state));
    } catch {
      // Quota or private mode: the client still works, without persistence.
    }
  }
}
