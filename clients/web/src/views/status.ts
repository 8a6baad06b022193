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

const KICKS: Record<string, string> = {
  replaced: "This device signed in again elsewhere (a copy of this tab?), so this page stopped.",
  too_many_devices: "Too many of your devices are online, so the server signed this one out.",
  logged_out: "You signed this device out from another one.",
  revoked: "An administrator revoked this device.",
};

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
      text = KICKS[ev.reason ?? ""] ?? `The server signed this page out (${ev.reason ?? "kicked"}).`;
    } else if (state === "failed") {
      kind = "error";
      text = `The server refused the token${ev.reason ? ` (${ev.reason})` : ""}: sign out and use a new one.`;
    }
    this.banner.hidden = text === null;
    this.banner.className = `banner banner-${kind}`;
    this.banner.dataset["state"] = state;
    if (text === null) return;
    if (state === "kicked") {
      // No reconnect after a kick (docs/sdk.md) unless the reader asks.
      const again = h("button", { class: "btn btn-small", type: "button", id: "reconnect" }, "Connect again");
      again.addEventListener("click", () => location.reload());
      this.banner.replaceChildren(text, " ", again);
    } else {
      this.banner.textContent = text;
    }
  }

  stop(): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }
}
