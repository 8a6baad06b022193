/**
 * The signed-in page: wires the SDK's events into the model and the model
 * into the views, and the views' actions into requests.
 *
 * The SDK reconnects, catches up and keeps the outbox; on top of that the
 * page asks `convs` each time the connection turns live (receipts and
 * unread counts are positions, not replayed by catch-up), and marks a
 * conversation read while it is open and the page is visible.
 */

import { byId, h } from "./dom.js";
import { avatar, bodyText, displayName, type Profile } from "./format.js";
import { type Conversation, Model, type Msg, type Pending } from "./model.js";
import { Client, ImError, LocalStorageStore } from "./sdk.js";
import type { TokenInfo, WebConfig } from "./session.js";
import { ChatView } from "./views/chat.js";
import { ProfileDialog } from "./views/profile.js";
import { Sidebar } from "./views/sidebar.js";
import { StatusView } from "./views/status.js";

const HISTORY_PAGE = 30;
/** docs/protocol.md, "typing": `active: true` every 3 s while typing, shown for 6 s. */
const TYPING_EVERY_MS = 3000;
const TYPING_SHOWN_MS = 6000;
/** Typing stops this long after the last key. */
const TYPING_IDLE_MS = 4000;
const CONVS_PAGE = 50;

function tabStorage(): Storage | undefined {
  try {
    return window.sessionStorage;
  } catch {
    return undefined;
  }
}

function describe(e: unknown): string {
  if (e instanceof ImError) {
    switch (e.code) {
      case "no_such_user":
        return "There is no such user (a user exists once they have signed in).";
      case "forbidden":
        return "Not allowed (one of you blocks the other).";
      case "too_late":
        return "Too late to recall this message.";
      case "content_blocked":
        return "The server's content filter refused this message.";
      case "too_large":
        return "Too long.";
      default:
        return e.message || e.code;
    }
  }
  return e instanceof Error ? e.message : String(e);
}

export class App {
  readonly model: Model;
  private readonly client: Client;
  private readonly sidebar: Sidebar;
  private readonly chat: ChatView;
  private readonly status: StatusView;
  private readonly profileDialog: ProfileDialog;
  private readonly meBox: HTMLElement;
  private readonly toast: HTMLElement;
  private selected: number | null = null;
  private scheduled = false;
  private pendingKeys = 0;
  /** Conversations with a `read` in flight. */
  private readonly reading = new Set<number>();
  private stopped = false;
  private firstLive = true;
  private meSignature = "";
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private toastTimer: ReturnType<typeof setTimeout> | null = null;
  private readonly timers: ReturnType<typeof setInterval>[] = [];
  private readonly onLook = (): void => this.markRead();
  /** Whom we told we are typing, when, and the timer that says we stopped. */
  private typingTo: number | null = null;
  private typingSent = 0;
  private typingIdle: ReturnType<typeof setTimeout> | null = null;

  constructor(
    root: HTMLElement,
    token: TokenInfo,
    private readonly config: WebConfig,
    private readonly onSignOut: () => void,
  ) {
    this.model = new Model(token.uid);
    this.model.setProfile({ uid: token.uid, nickname: "", avatar: "" });
    this.status = new StatusView();
    this.sidebar = new Sidebar({
      open: (peer) => this.open(peer),
      startChat: (uid) => void this.startChat(uid),
      moreConvs: () => void this.loadConvs(true),
    });
    this.chat = new ChatView(
      {
        send: (text) => this.send(text),
        typing: () => this.typing(),
        back: () => this.close(),
        loadOlder: () => void this.loadOlder(),
        recall: (m) => void this.recall(m),
        dismiss: (p) => this.dismiss(p),
      },
      () => this.config.recall_seconds * 1000,
    );
    this.profileDialog = new ProfileDialog((nickname, avatarUrl) => this.saveProfile(nickname, avatarUrl));
    this.meBox = h("button", { class: "me", id: "me", type: "button", title: "Edit your profile" });
    this.meBox.addEventListener("click", () => this.profileDialog.open(this.me()));
    const signOut = h("button", { class: "btn", id: "sign-out", type: "button" }, "Sign out");
    signOut.addEventListener("click", () => this.signOut());
    this.toast = h("div", { class: "toast", id: "toast", role: "alert", hidden: true });
    const empty = h(
      "div",
      { class: "chat-empty", id: "chat-empty" },
      h("div", { class: "chat-empty-mark" }, h("span", { class: "brand-mark" }, "im")),
      h("p", {}, "Pick a conversation, or start one with a user id."),
    );
    root.replaceChildren(
      h(
        "div",
        { class: "shell" },
        h(
          "header",
          { class: "topbar" },
          h("div", { class: "brand" }, h("span", { class: "brand-mark" }, "im"), "imserver chat"),
          this.status.pill,
          h("div", { class: "spacer" }),
          this.meBox,
          signOut,
        ),
        h(
          "div",
          { class: "main", id: "main" },
          this.sidebar.root,
          h("div", { class: "pane" }, this.status.banner, empty, this.chat.root),
        ),
      ),
      this.profileDialog.root,
      this.toast,
    );

    this.client = new Client({
      url: config.websocket ?? "",
      token: token.token,
      client: "imserver-web/0.1",
      // Per tab (sessionStorage): each tab is its own device, so two tabs do
      // not replace each other; a reload keeps the device, its seq and outbox.
      store: new LocalStorageStore(`imserver.client.${token.uid}`, tabStorage()),
      ...(token.device !== null ? { device: token.device } : {}),
    });
    this.subscribe();
    // Coming back to the page reads what arrived meanwhile.
    document.addEventListener("visibilitychange", this.onLook);
    window.addEventListener("focus", this.onLook);
    // Recall buttons disappear when the window passes; restored sends settle.
    this.timers.push(
      setInterval(() => {
        this.settleRestored();
        this.render();
      }, 2_000),
    );
    this.render();
  }

  start(): void {
    this.client
      .start()
      .then(() => this.restoreOutbox())
      .catch((e: unknown) => this.report(e));
  }

  /**
   * Sends an earlier visit of this tab left unanswered (the SDK keeps its
   * outbox in the store and sends them again): shown as "sending" until
   * they leave the outbox, then the conversation is asked for again.
   */
  private restoreOutbox(): void {
    for (const entry of this.client.outbox) {
      this.model.conv(entry.to).pending.push({
        key: ++this.pendingKeys,
        to: entry.to,
        text: bodyText(entry.body, entry.type),
        ts: Date.now(),
        error: null,
        cid: entry.cid,
      });
    }
    this.render();
  }

  private settleRestored(): void {
    const waiting = new Set(this.client.outbox.map((e) => e.cid));
    let settled = false;
    for (const conv of this.model.convs.values()) {
      const before = conv.pending.length;
      conv.pending = conv.pending.filter((p) => p.cid === undefined || waiting.has(p.cid));
      if (conv.pending.length !== before) {
        settled = true;
        conv.loaded = conv.loaded && conv.peer === this.selected;
      }
    }
    if (settled) this.refreshSoon();
  }

  private me(): Profile {
    return this.model.profiles.get(this.model.me) ?? { uid: this.model.me, nickname: "", avatar: "" };
  }

  private subscribe(): void {
    const c = this.client;
    c.on("state", (ev) => {
      this.status.show(ev);
      this.settleRestored();
      if (ev.state === "live") this.onLive();
      if (ev.state === "kicked" || ev.state === "failed") this.render();
    });
    c.on("message", (ev) => {
      const [conv, fresh] = this.model.addMessage(ev.msg, ev.unread);
      if (fresh && conv.peer === this.selected) this.markRead();
      this.render();
    });
    c.on("edit", (ev) => {
      this.model.addMessage(ev.msg, undefined, false);
      this.render();
    });
    c.on("read", (ev) => {
      if (this.model.applyRead(ev.session_id, ev.by, ev.msg_id, ev.unread) === null) this.refreshSoon();
      this.render();
    });
    c.on("delivered", (ev) => {
      if (this.model.applyDelivered(ev.session_id, ev.msg_id) === null) this.refreshSoon();
      this.render();
    });
    c.on("recall", (ev) => {
      this.model.applyRecall(ev.session_id, ev.msg_id);
      // A recalled unread message stops counting: the server has the counts.
      this.refreshSoon();
      this.render();
    });
    c.on("typing", (ev) => {
      const conv = this.model.conv(ev.from);
      conv.typingUntil = ev.active ? Date.now() + TYPING_SHOWN_MS : 0;
      // Expires by itself (a lost `active: false`).
      if (ev.active) setTimeout(() => this.render(), TYPING_SHOWN_MS + 50);
      this.render();
    });
    c.on("profile", (ev) => {
      this.model.setProfile(ev.user);
      this.render();
    });
    c.on("reset", () => {
      this.model.clear();
      this.refreshSoon();
      this.render();
    });
  }

  private onLive(): void {
    if (this.firstLive) {
      this.firstLive = false;
      void this.loadMe();
    }
    void this.refresh();
  }

  /** `convs` (and the open conversation's newest page) again, soon, once. */
  private refreshSoon(): void {
    if (this.refreshTimer !== null) return;
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      void this.refresh();
    }, 200);
  }

  private async refresh(): Promise<void> {
    await this.loadConvs(false);
    const conv = this.selectedConv();
    if (conv !== null) await this.loadHistory(conv, false);
    this.markRead();
  }

  private async loadMe(): Promise<void> {
    try {
      const { users } = await this.client.profile([this.model.me]);
      for (const u of users) this.model.setProfile(u);
      this.render();
    } catch (e) {
      this.report(e);
    }
  }

  private async loadConvs(older: boolean): Promise<void> {
    try {
      const before = older ? this.model.convsBefore : null;
      const epochs = this.model.readEpochs();
      const page = await this.client.convs(before !== null ? { limit: CONVS_PAGE, before } : { limit: CONVS_PAGE });
      // A refresh of the first page keeps what "older" paging found.
      const more = older || this.model.convsBefore === null ? page.more : this.model.convsMore || page.more;
      this.model.applyConvs(page.convs, more, epochs);
      this.render();
    } catch (e) {
      this.report(e);
    }
  }

  private async loadHistory(conv: Conversation, older: boolean): Promise<void> {
    if (conv.loading) return;
    const before = older ? conv.oldest() : null;
    conv.loading = true;
    this.render();
    try {
      const page = await this.client.history(
        before !== null ? { peer: conv.peer, before, limit: HISTORY_PAGE } : { peer: conv.peer, limit: HISTORY_PAGE },
      );
      this.model.applyHistory(conv, page, older);
    } catch (e) {
      this.report(e);
    } finally {
      conv.loading = false;
      this.render();
    }
  }

  private selectedConv(): Conversation | null {
    return this.selected === null ? null : this.model.conv(this.selected);
  }

  open(peer: number): void {
    if (this.typingTo !== null && this.typingTo !== peer) this.stopTyping();
    this.selected = peer;
    const conv = this.model.conv(peer);
    if (!conv.loaded) void this.loadHistory(conv, false).then(() => this.markRead());
    this.markRead();
    this.render();
    this.chat.focus();
  }

  /** No conversation open (the list, on a narrow screen). */
  private close(): void {
    this.stopTyping();
    this.selected = null;
    this.render();
  }

  private async startChat(uid: number): Promise<void> {
    if (uid === this.model.me) {
      this.sidebar.showError("That is you: pick someone else's user id.");
      return;
    }
    if (!this.model.convs.has(uid)) {
      try {
        const { users } = await this.client.profile([uid]);
        const user = users[0];
        if (user === undefined) {
          this.sidebar.showError(`There is no user ${uid} (a user exists once they have signed in).`);
          return;
        }
        this.model.setProfile(user);
      } catch (e) {
        this.sidebar.showError(describe(e));
        return;
      }
    }
    this.sidebar.clearInput();
    this.open(uid);
  }

  private loadOlder(): void {
    const conv = this.selectedConv();
    if (conv !== null && conv.loaded && conv.more) void this.loadHistory(conv, true);
  }

  /** Read up to the newest message from the peer, if the page is being looked at. */
  private markRead(): void {
    const conv = this.selectedConv();
    if (conv === null || conv.session === null || document.visibilityState !== "visible") return;
    const newest = conv.newestFromPeer();
    if (newest === null || newest.msg_id <= conv.myRead || this.reading.has(conv.peer)) return;
    const session = conv.session;
    const upTo = newest.msg_id;
    this.reading.add(conv.peer);
    conv.readEpoch += 1;
    conv.unread = 0;
    this.render();
    this.client
      .read(session, upTo)
      .then((r) => {
        if (upTo > conv.myRead) conv.myRead = upTo;
        conv.readEpoch += 1;
        conv.unread = r.unread;
      })
      .catch((e: unknown) => this.report(e))
      .finally(() => {
        this.reading.delete(conv.peer);
        this.render();
        // More may have come meanwhile.
        if ((conv.newestFromPeer()?.msg_id ?? 0n) > conv.myRead) this.markRead();
      });
  }

  /** Tell the peer we are typing (at most every 3 s), and that we stopped. */
  private typing(): void {
    const conv = this.selectedConv();
    // Only to a conversation that exists (else `forbidden`), and only live:
    // a typing request waiting for the connection would be stale.
    if (conv === null || conv.session === null || this.client.state !== "live") return;
    if (this.typingTo !== null && this.typingTo !== conv.peer) this.stopTyping();
    const now = Date.now();
    if (this.typingTo !== conv.peer || now - this.typingSent >= TYPING_EVERY_MS) {
      this.typingTo = conv.peer;
      this.typingSent = now;
      this.client.typing(conv.peer, true).catch(() => {});
    }
    if (this.typingIdle !== null) clearTimeout(this.typingIdle);
    this.typingIdle = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  private stopTyping(): void {
    if (this.typingIdle !== null) clearTimeout(this.typingIdle);
    this.typingIdle = null;
    const peer = this.typingTo;
    this.typingTo = null;
    if (peer !== null && this.client.state === "live") this.client.typing(peer, false).catch(() => {});
  }

  private send(text: string): void {
    const conv = this.selectedConv();
    if (conv === null) return;
    this.stopTyping();
    const pending: Pending = { key: ++this.pendingKeys, to: conv.peer, text, ts: Date.now(), error: null };
    conv.pending.push(pending);
    this.render();
    this.client
      .send(conv.peer, text)
      .then((r) => {
        conv.pending = conv.pending.filter((p) => p !== pending);
        const msg: Msg = {
          msg_id: r.msg_id,
          session_id: r.session_id,
          from: this.model.me,
          to: conv.peer,
          type: "text",
          body: text,
          ts: r.ts,
        };
        this.model.addMessage(msg);
        this.render();
      })
      .catch((e: unknown) => {
        if (e instanceof ImError && e.code === "closed") return; // the page is going away
        pending.error = describe(e);
        this.render();
      });
  }

  private dismiss(p: Pending): void {
    const conv = this.model.conv(p.to);
    conv.pending = conv.pending.filter((x) => x !== p);
    this.render();
  }

  private async recall(m: Msg): Promise<void> {
    try {
      await this.client.recall(m.msg_id);
      this.model.applyRecall(m.session_id, m.msg_id);
      this.render();
    } catch (e) {
      this.report(e);
    }
  }

  private async saveProfile(nickname: string, avatarUrl: string): Promise<void> {
    try {
      const { user } = await this.client.setProfile({ nickname, avatar: avatarUrl });
      this.model.setProfile(user);
      this.render();
    } catch (e) {
      throw new Error(describe(e));
    }
  }

  private signOut(): void {
    this.stop();
    this.onSignOut();
  }

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    document.removeEventListener("visibilitychange", this.onLook);
    window.removeEventListener("focus", this.onLook);
    for (const t of this.timers) clearInterval(t);
    if (this.refreshTimer !== null) clearTimeout(this.refreshTimer);
    if (this.typingIdle !== null) clearTimeout(this.typingIdle);
    this.status.stop();
    this.client.close();
  }

  private report(e: unknown): void {
    if (e instanceof ImError && (e.code === "closed" || e.code === "disconnected")) return;
    this.toast.textContent = describe(e);
    this.toast.hidden = false;
    if (this.toastTimer !== null) clearTimeout(this.toastTimer);
    this.toastTimer = setTimeout(() => {
      this.toast.hidden = true;
    }, 5000);
  }

  /** Render once, after the current burst of events. */
  render(): void {
    if (this.scheduled || this.stopped) return;
    this.scheduled = true;
    queueMicrotask(() => {
      this.scheduled = false;
      this.paint();
    });
  }

  private paint(): void {
    const me = this.me();
    const meSignature = JSON.stringify(me);
    if (meSignature !== this.meSignature) {
      this.meSignature = meSignature;
      this.meBox.replaceChildren(avatar(me.uid, me, "sm"), h("span", { class: "me-name", id: "me-name" }, displayName(me.uid, me)));
    }
    this.sidebar.render(this.model, this.selected);
    this.chat.render(this.model, this.selectedConv());
    byId("chat-empty").hidden = this.selected !== null;
    byId("main").classList.toggle("has-chat", this.selected !== null);
    const total = this.model.totalUnread();
    document.title = total > 0 ? `(${total}) imserver chat` : "imserver chat";
  }
}
