/**
 * Time and chance, injected so that tests drive heartbeats, backoff and
 * batching without waiting (see test/unit/fakes.ts).
 */
export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  /** Milliseconds, monotonic enough for timeouts. */
  now(): number;
}

export const realTimers: Timers = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle as ReturnType<typeof setTimeout>),
  now: () => (globalThis.performance ? globalThis.performance.now() : Date.now()),
};

/** A random source in [0, 1): Math.random unless a test injects one. */
export type Random = () => number;
