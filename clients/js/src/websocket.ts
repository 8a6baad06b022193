/**
 * The WebSocket transport (docs/protocol.md, "WebSocket"): subprotocol
 * `imserver.v1`, one binary message per frame body. Works with the browser's
 * global WebSocket and with any class of the same shape (the `ws` package in
 * Node, see node.ts), so this module imports nothing from Node.
 */

import { type Connector, type Transport, type TransportHandlers, TransportError } from "./transport.js";

export const SUBPROTOCOL = "imserver.v1";

/** The part of the WebSocket API the transport uses. */
export interface WebSocketLike {
  binaryType: string;
  readonly protocol: string;
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code?: number; reason?: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketFactory = (url: string, protocols: string[]) => WebSocketLike;

function globalFactory(): WebSocketFactory {
  const WS = (globalThis as { WebSocket?: new (url: string, protocols: string[]) => WebSocketLike })
    .WebSocket;
  if (WS === undefined) {
    throw new TransportError(
      "no global WebSocket here: in Node use @imserver/client/node (the ws package)",
    );
  }
  return (url, protocols) => new WS(url, protocols);
}

function toBytes(data: unknown): Uint8Array | undefined {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (Array.isArray(data) && data.every((c) => c instanceof Uint8Array)) {
    // ws's "nodebuffer" fragments; not used with binaryType arraybuffer.
    const total = data.reduce((n: number, c: Uint8Array) => n + c.length, 0);
    const out = new Uint8Array(total);
    let at = 0;
    for (const c of data as Uint8Array[]) {
      out.set(c, at);
      at += c.length;
    }
    return out;
  }
  return undefined;
}

/** A Connector for ws:// and wss:// URLs. */
export function webSocketConnector(factory?: WebSocketFactory): Connector {
  return (url, handlers) => connectWebSocket(url, handlers, factory);
}

export function connectWebSocket(
  url: string,
  handlers: TransportHandlers,
  factory?: WebSocketFactory,
): Promise<Transport> {
  const make = factory ?? globalFactory();
  return new Promise<Transport>((resolve, reject) => {
    let ws: WebSocketLike;
    try {
      ws = make(url, [SUBPROTOCOL]);
    } catch (e) {
      reject(e instanceof Error ? e : new TransportError(String(e)));
      return;
    }
    ws.binaryType = "arraybuffer";
    let open = false;
    let closed = false;
    const finish = (error?: Error): void => {
      if (closed) return;
      closed = true;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      if (open) handlers.close(error);
      else reject(error ?? new TransportError(`cannot connect to ${url}`));
    };
    const transport: Transport = {
      send(body) {
        if (!closed && ws.readyState === 1) ws.send(body);
      },
      close() {
        if (closed) return;
        try {
          ws.close(1000);
        } catch {
          // already closing
        }
        finish();
      },
    };
    ws.onopen = () => {
      if (ws.protocol !== SUBPROTOCOL) {
        finish(new TransportError(`the server did not accept the ${SUBPROTOCOL} subprotocol`));
        ws.close(1002);
        return;
      }
      open = true;
      resolve(transport);
    };
    ws.onmessage = (ev) => {
      const bytes = toBytes(ev.data);
      if (bytes === undefined) {
        // The server sends binary messages only; a text one means a broken peer.
        finish(new TransportError("the server sent a text message"));
        ws.close(1003);
        return;
      }
      handlers.message(bytes);
    };
    ws.onerror = () => {
      // A close event follows an error in both the browser and ws.
      if (!open) finish(new TransportError(`cannot connect to ${url}`));
    };
    ws.onclose = (ev) => {
      finish(
        ev.code === 1000 || ev.code === undefined
          ? undefined
          : new TransportError(`WebSocket closed (${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`),
      );
    };
  });
}
