/**
 * The TCP transport (Node only): `tcp://host:port`, or `tls://host:port`
 * for a server listening with an `ssl:` endpoint. Frames carry the 4-byte
 * length prefix (framing.ts).
 */

import * as net from "node:net";
import * as tls from "node:tls";

import { DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encodeFrame } from "./framing.js";
import { type Transport, type TransportHandlers, TransportError } from "./transport.js";

export interface TcpOptions {
  maxFrameBytes?: number;
  /** Options for node:tls (ca, servername, ...) when the URL is tls://. */
  tls?: tls.ConnectionOptions;
  /** Seconds (default 15) to connect (and finish the TLS handshake); 0: no limit. */
  connectTimeout?: number;
}

export function connectTcp(
  url: string,
  handlers: TransportHandlers,
  options: TcpOptions = {},
): Promise<Transport> {
  const parsed = new URL(url);
  const secure = parsed.protocol === "tls:";
  if (!secure && parsed.protocol !== "tcp:") {
    return Promise.reject(new TransportError(`not a tcp:// or tls:// URL: ${url}`));
  }
  const host = parsed.hostname.replace(/^\[(.*)\]$/, "$1");
  const port = Number(parsed.port);
  if (!host || !Number.isInteger(port) || port <= 0) {
    return Promise.reject(new TransportError(`a TCP URL needs a host and a port: ${url}`));
  }
  const decoder = new FrameDecoder(options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES);
  return new Promise<Transport>((resolve, reject) => {
    const socket: net.Socket = secure
      ? tls.connect({ host, port, servername: host, ...options.tls })
      : net.connect({ host, port });
    socket.setNoDelay(true);
    const timeout = options.connectTimeout ?? 15;
    if (timeout > 0) socket.setTimeout(timeout * 1000);
    let open = false;
    let closed = false;
    let failure: Error | undefined;
    const transport: Transport = {
      send(body) {
        if (!closed && !socket.destroyed) socket.write(encodeFrame(body));
      },
      close() {
        if (closed) return;
        // end(): what was written still goes out (the last acks), then FIN;
        // a peer that does not close its side is cut off after a moment.
        socket.end();
        setTimeout(() => socket.destroy(), 2000).unref();
      },
    };
    socket.once(secure ? "secureConnect" : "connect", () => {
      open = true;
      socket.setTimeout(0); // idleness is the heartbeat's business
      resolve(transport);
    });
    socket.on("timeout", () => {
      if (open) return;
      failure ??= new TransportError(`no connection within ${timeout} s`);
      socket.destroy();
    });
    socket.on("data", (chunk: Buffer) => {
      let frames: Uint8Array[];
      try {
        frames = decoder.feed(chunk);
      } catch (e) {
        failure = e as Error;
        socket.destroy();
        return;
      }
      for (const frame of frames) {
        if (closed) return;
        handlers.message(frame);
      }
    });
    socket.on("error", (e: Error) => {
      failure ??= e;
    });
    socket.on("close", () => {
      if (closed) return;
      closed = true;
      if (open) handlers.close(failure);
      else reject(new TransportError(`cannot connect to ${url}: ${failure?.message ?? "closed"}`));
    });
  });
}
