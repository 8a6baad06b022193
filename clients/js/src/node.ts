/**
 * The Node entry point: everything of the browser-safe one, plus TCP
 * (`tcp://`, `tls://` via node:net/node:tls) and WebSocket through the `ws`
 * package (Node 20 has no global WebSocket). `Client` here picks the
 * transport from the URL.
 */

import WebSocket from "ws";

import { Client as CoreClient, type ClientOptions } from "./client.js";
import { connectTcp, type TcpOptions } from "./tcp.js";
import { type Connector, TransportError } from "./transport.js";
import { type WebSocketLike, webSocketConnector } from "./websocket.js";

export * from "./index.js";
export { connectTcp, type TcpOptions } from "./tcp.js";

export interface NodeConnectorOptions extends TcpOptions {
  /** Extra options for the ws package (headers, origin, ca, handshakeTimeout, ...). */
  ws?: WebSocket.ClientOptions;
}

/** A Connector for tcp://, tls://, ws:// and wss:// URLs. */
export function nodeConnector(options: NodeConnectorOptions = {}): Connector {
  const ws = webSocketConnector(
    (url, protocols) =>
      new WebSocket(url, protocols, {
        maxPayload: options.maxFrameBytes ?? 16 * 1024 * 1024,
        // Also a proxy that accepts the TCP connection but never answers the upgrade.
        handshakeTimeout: (options.connectTimeout ?? 15) * 1000 || undefined,
        ...options.ws,
      }) as unknown as WebSocketLike,
  );
  return (url, handlers) => {
    if (/^wss?:/i.test(url)) return ws(url, handlers);
    if (/^(tcp|tls):/i.test(url)) return connectTcp(url, handlers, options);
    return Promise.reject(new TransportError(`unknown URL scheme: ${url}`));
  };
}

export interface NodeClientOptions extends ClientOptions {
  /** Transport options when no `connector` is given. */
  transport?: NodeConnectorOptions;
}

/** The Client with Node's transports: tcp://, tls://, ws://, wss://. */
export class Client extends CoreClient {
  constructor(options: NodeClientOptions) {
    const connectTimeout = options.connectTimeout ?? options.requestTimeout ?? 15;
    super({
      ...options,
      connector: options.connector ?? nodeConnector({ connectTimeout, ...options.transport }),
    });
  }
}
