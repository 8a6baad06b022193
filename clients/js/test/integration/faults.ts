/**
 * A Connector around the real one that a test can break: refuse connects,
 * drop the connection, or go deaf after a given request (the request
 * reaches the server, its answer never reaches the client).
 */

import { type Frame, decodeBody } from "../../src/codec.js";
import type { Connector, Transport } from "../../src/transport.js";

export class FaultyConnector {
  refuse = false;
  connects = 0;
  /** Every frame the client sent, decoded, over all connections. */
  readonly sent: Frame[] = [];
  private current: Transport | undefined;
  /** When set: a request with this op is sent, then the connection goes deaf. */
  loseReplyTo: string | undefined;

  constructor(private readonly inner: Connector) {}

  readonly connector: Connector = async (url, handlers) => {
    this.connects++;
    if (this.refuse) throw new Error("refused by the test");
    let deaf = false;
    const transport = await this.inner(url, {
      message: (body) => {
        if (!deaf) handlers.message(body);
      },
      close: (error) => {
        if (this.current === wrapped) this.current = undefined;
        handlers.close(error);
      },
    });
    const wrapped: Transport = {
      send: (body) => {
        const frame = decodeBody(body);
        this.sent.push(frame);
        transport.send(body);
        if (this.loseReplyTo !== undefined && frame.t === this.loseReplyTo) {
          // From now on nothing reaches the client; the test drops the
          // connection once the server has done the request.
          this.loseReplyTo = undefined;
          deaf = true;
        }
      },
      close: () => transport.close(),
    };
    this.current = wrapped;
    return wrapped;
  };

  /** Close the current connection (as a network failure would). */
  drop(): void {
    this.current?.close();
  }

  sentOf(op: string): Frame[] {
    return this.sent.filter((f) => f.t === op);
  }
}
