/**
 * The connection, shown twice: a pill in the top bar (always), and a banner
 * over the chat while the page is not live, so nobody types into a page
 * that is offline without knowing it (what they type is queued and sent on
 * reconnect; the banner says so).
 */

import { h } from "../dom.js";

export interface StateEvent {
  state: string;
  reason?: string;
  retry_in?: number;
}

const LABELS: Record<string, string> = {
  connecting: "Connecting…",
  syncing: "Syncing…",
  live: "Online",
  offline: "Offline",
  kicked: "Signed out",
  failed: "Token refused",
  closed: "Closed",
};

export class StatusView {
  readonly pill: HTMLElement;
  readonly banner: HTMLElement;
  private everLive = false;
  private retryAt: number | null = null;
  private timer: ReturnType<typeof setInterval> | null = null;
  private last: StateEvent = { state: "connecting" };

  constructor() {
    this.pill = h("span", { class: "conn", id: "conn", "data-state": "connecting", role: "status" });
    this.banner = h("div", { class: "banner", id: "conn-banner", hidden: true, role: "alert" });
    this.show({ state: "connecting" });
  }

  show(ev: StateEvent): void {
    this.last = ev;
    if (ev.state === "live") this.everLive = true;
    this.retryAt = ev.state === "offline" && ev.retry_in !== undefined ? Date.now() + ev.retry_in * 1000 : null;
    if (this.retryAt !== null && this.timer === null) {
      this.timer = setInterval(() => this.paint(), 500);
    } else if (this.retryAt === null && this.timer !== null) {
      clearInterval(this.timer);
      this.timer = null;
    }
    this.paint();
  }

  /** The server's problem before any connection (no WebSocket, origin refused). */
  fatal(text: string): void {
    this.last = { state: "failed" };
    this.pill.dataset["state"] = "failed";
    this.pill.replaceChildren(h("span", { class: "dot" }), "Unavailable");
    this.banner.hidden = false;
    this.banner.className = "banner banner-error";
    this.banner.textContent = text;
  }

  private paint(): void {
    const ev = this.last;
    const state = ev.state;
    this.pill.dataset["state"] = state;
    let label = LABELS[state] ?? state;
    let wait: number | null = null;
    if (this.retryAt !== null) {
      wait = Math.max(0, Math.ceil((this.retryAt - Date.now()) / 1000));
      label = wait > 0 ? `Offline · retry in ${wait}s` : "Reconnecting…";
    }
    this.pill.replaceChildren(h("span", { class: "dot" }), label);
    let text: string | null = null;
    let kind = "warn";
    if (state === "offline") {
      text =
        wait !== null && wait > 0
          ? `You are offline. Reconnecting in ${wait} s… Messages you send now are queued.`
          : "You are offline. Reconnecting… Messages you send now are queued.";
    } else if ((state === "connecting" || state === "syncing") && this.everLive) {
      text = state === "syncing" ? "Reconnected: catching up…" : "Reconnecting…";
    } else if (state === "kicked") {
      kind = "error";
      text = `This session was signed out by the server (${ev.reason ?? "kicked"}). Sign in again to continue.`;
    } else if (state === "failed") {
      kind = "error";
      text = `The server refused the token${ev.reason ? ` (${ev.reason})` : ""}. Sign out and use a new one.`;
    }
    this.banner.hidden = text === null;
    this.banner.className = `banner banner-${kind}`;
    this.banner.dataset["state"] = state;
    if (text !== null) this.banner.textContent = text;
  }

  stop(): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }
}
