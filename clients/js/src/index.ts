/**
 * @imserver/client: the browser-safe entry point (WebSocket transport).
 * Node adds TCP: import from "@imserver/client/node".
 */

export { Client, VERSION, type ClientOptions, type TokenSource } from "./client.js";
export { Connection, type ConnectionOptions } from "./connection.js";
export { CodecError, ID_FIELDS, decodeBody, encodeBody, normalize, type Frame } from "./codec.js";
export { ImError } from "./errors.js";
export { DEFAULT_MAX_FRAME_BYTES, FrameDecoder, FrameError, encodeFrame } from "./framing.js";
export {
  LocalStorageStore,
  MemoryStore,
  fromJSON,
  toJSON,
  type StorageLike,
  type Store,
  type StoredState,
} from "./store.js";
export { realTimers, type Random, type Timers } from "./timers.js";
export {
  TransportError,
  type Connector,
  type Transport,
  type TransportHandlers,
} from "./transport.js";
export {
  SUBPROTOCOL,
  connectWebSocket,
  webSocketConnector,
  type WebSocketFactory,
  type WebSocketLike,
} from "./websocket.js";
export type * from "./types.js";
