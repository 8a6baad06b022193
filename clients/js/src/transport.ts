/**
 * A transport carries frame bodies (msgpack maps, no length prefix) both
 * ways: TCP adds and strips the length prefix, a WebSocket sends one binary
 * message per body.
 */
export interface TransportHandlers {
  /** One frame body from the server. */
  message(body: Uint8Array): void;
  /** Called once when the transport is closed, by either side. */
  close(error?: Error): void;
}

export interface Transport {
  send(body: Uint8Array): void;
  close(): void;
}

/**
 * Opens a transport to `url`; resolves once it is open (then `handlers.close`
 * is called exactly once, later), rejects if it cannot be opened.
 */
export type Connector = (url: string, handlers: TransportHandlers) => Promise<Transport>;

export class TransportError extends Error {
  override name = "TransportError";
}
