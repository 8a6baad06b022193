/**
 * The chat window: the peer's header, the messages (oldest at the top,
 * "load older" by button or by scrolling to the top), receipts on one's own
 * messages, recall, and the composer. Message nodes are kept by key and
 * updated in place, so a receipt or a new message does not rebuild the
 * list (or lose the scroll position).
 */

import { h } from "../dom.js";
import { avatar, bodyText, clock, dayKey, dayLabel, displayName } from "../format.js";
import type { Conversation, Model, Msg, Pending, Status } from "../model.js";

export interface ChatActions {
  send(text: string): void;
  /** The reader is typing (called on every input). */
  typing(): void;
  /** Back to the list (narrow screens). */
  back(): void;
  loadOlder(): void;
  recall(msg: Msg): void;
  dismiss(pending: Pending): void;
}

const STATUS_TEXT: Record<Status, string> = {
  sending: "Sending…",
  failed: "Not sent",
  sent: "Sent",
  delivered: "Delivered",
  read: "Read",
};
const TICKS: Record<Status, string> = {
  sending: "◷",
  failed: "!",
  sent: "✓",
  delivered: "✓✓",
  read: "✓✓",
};

export class ChatView {
  readonly root: HTMLElement;
  private readonly head: HTMLElement;
  private readonly list: HTMLElement;
  private readonly older: HTMLButtonElement;
  private readonly composer: HTMLTextAreaElement;
  private readonly sendButton: HTMLButtonElement;
  private readonly nodes = new Map<string, HTMLElement>();
  private peer: number | null = null;
  private firstKey: string | null = null;
  private lastKey: string | null = null;
  private readonly jump: HTMLButtonElement;

  constructor(
    private readonly actions: ChatActions,
    private readonly recallMs: () => number,
  ) {
    this.head = h("header", { class: "chat-head", id: "chat-head" });
    this.older = h("button", { class: "btn btn-link load-older", id: "load-older", type: "button", hidden: true }, "Load older messages");
    this.older.addEventListener("click", () => this.actions.loadOlder());
    this.list = h("div", { class: "messages", id: "messages", role: "log", "aria-live": "polite" });
    this.list.addEventListener("scroll", () => {
      if (this.list.scrollTop < 40 && !this.older.hidden && !this.older.disabled) this.actions.loadOlder();
      if (this.atBottom()) this.jump.hidden = true;
    });
    this.jump = h("button", { class: "jump", id: "jump", type: "button", hidden: true }, "New messages ↓");
    this.jump.addEventListener("click", () => {
      this.list.scrollTop = this.list.scrollHeight;
      this.jump.hidden = true;
    });
    this.composer = h("textarea", {
      id: "composer",
      rows: 1,
      placeholder: "Write a message…",
      "aria-label": "Message",
      maxlength: 8000,
    });
    this.composer.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.submit();
      }
    });
    this.composer.addEventListener("input", () => {
      this.autosize();
      if (this.composer.value.trim()) this.actions.typing();
    });
    this.sendButton = h("button", { type: "submit", class: "btn btn-primary", id: "send" }, "Send");
    const form = h("form", { class: "composer", id: "composer-form" }, this.composer, this.sendButton);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.submit();
    });
    this.root = h(
      "section",
      { class: "chat", id: "chat", hidden: true },
      this.head,
      h("div", { class: "messages-wrap" }, this.list, this.jump),
      form,
    );
  }

  private submit(): void {
    const text = this.composer.value.trim();
    if (!text) return;
    this.composer.value = "";
    this.autosize();
    this.actions.send(text);
    this.composer.focus();
  }

  private autosize(): void {
    this.composer.style.height = "auto";
    this.composer.style.height = `${Math.min(this.composer.scrollHeight + 2, 160)}px`;
    this.composer.style.overflowY = this.composer.scrollHeight > 160 ? "auto" : "hidden";
  }

  focus(): void {
    this.composer.focus();
  }

  render(model: Model, c: Conversation | null): void {
    this.root.hidden = c === null;
    if (c === null) {
      this.peer = null;
      return;
    }
    const switched = this.peer !== c.peer;
    if (switched) {
      this.peer = c.peer;
      for (const node of this.nodes.values()) node.remove();
      this.nodes.clear();
      this.firstKey = null;
    }
    this.renderHead(model, c);
    const list = this.list;
    const atBottom = this.atBottom();
    const prevHeight = list.scrollHeight;
    const prevTop = list.scrollTop;

    const wanted: [string, () => HTMLElement, (el: HTMLElement) => void][] = [];
    let lastDay = "";
    const now = Date.now();
    for (const m of c.sorted()) {
      const day = dayKey(m.ts);
      if (day !== lastDay) {
        lastDay = day;
        wanted.push([`d:${day}`, () => h("div", { class: "day" }, h("span", {}, dayLabel(m.ts))), () => {}]);
      }
      const key = `m:${m.msg_id}`;
      wanted.push([key, () => this.messageNode(m), (el) => this.updateMessage(el, model, c, m, now)]);
    }
    for (const p of c.pending) {
      wanted.push([`p:${p.key}`, () => this.pendingNode(p), (el) => this.updatePending(el, p)]);
    }

    // The newest of my stored messages says its status in words too.
    const newestMine = [...c.sorted()].reverse().find((m) => m.from === model.me && !c.recalled.has(m.msg_id));
    const captionKey = c.pending.length === 0 && newestMine !== undefined ? `m:${newestMine.msg_id}` : null;

    const keep = new Set(wanted.map(([key]) => key));
    for (const [key, node] of this.nodes) {
      if (!keep.has(key)) {
        node.remove();
        this.nodes.delete(key);
      }
    }
    list.prepend(this.older);
    let cursor: Element = this.older;
    for (const [key, make, update] of wanted) {
      let node = this.nodes.get(key);
      if (node === undefined) {
        node = make();
        this.nodes.set(key, node);
      }
      update(node);
      if (key === captionKey) node.dataset["caption"] = STATUS_TEXT[(node.dataset["status"] ?? "sent") as Status];
      else delete node.dataset["caption"];
      if (cursor.nextElementSibling !== node) cursor.after(node);
      cursor = node;
    }
    this.older.hidden = !c.loaded || !c.more;
    this.older.disabled = c.loading;
    this.older.textContent = c.loading ? "Loading…" : "Load older messages";

    const firstKey = wanted.find(([key]) => key.startsWith("m:"))?.[0] ?? null;
    const lastKey = wanted[wanted.length - 1]?.[0] ?? null;
    if (switched) {
      list.scrollTop = list.scrollHeight;
      this.jump.hidden = true;
    } else if (atBottom) {
      list.scrollTop = list.scrollHeight;
    } else {
      if (this.firstKey !== null && firstKey !== this.firstKey) {
        // Older messages came in above: keep what the reader was looking at in place.
        list.scrollTop = prevTop + (list.scrollHeight - prevHeight);
      }
      if (lastKey !== null && lastKey !== this.lastKey && !lastKey.startsWith("d:")) {
        // Something new at the bottom while the reader is further up.
        this.jump.hidden = false;
      }
    }
    this.lastKey = lastKey;
    this.firstKey = firstKey;
  }

  private atBottom(): boolean {
    const list = this.list;
    return list.scrollHeight - list.scrollTop - list.clientHeight < 60;
  }

  private headSignature = "";

  private renderHead(model: Model, c: Conversation): void {
    const profile = model.profiles.get(c.peer);
    const typing = c.typing();
    const signature = JSON.stringify([c.peer, profile ?? null, typing]);
    if (signature === this.headSignature) return;
    this.headSignature = signature;
    const back = h("button", { class: "back", type: "button", "aria-label": "Back to conversations" }, "‹");
    back.addEventListener("click", () => this.actions.back());
    this.head.replaceChildren(
      back,
      avatar(c.peer, profile),
      h(
        "div",
        { class: "chat-title" },
        h("div", { class: "chat-name", id: "chat-name" }, displayName(c.peer, profile)),
        typing
          ? h("div", { class: "chat-sub typing", id: "chat-typing" }, "typing…")
          : h("div", { class: "chat-sub" }, `user ${c.peer}`),
      ),
    );
  }

  private messageNode(m: Msg): HTMLElement {
    return h("div", { class: "msg", "data-msg-id": m.msg_id.toString() });
  }

  private updateMessage(el: HTMLElement, model: Model, c: Conversation, m: Msg, now: number): void {
    const mine = m.from === model.me;
    const recalled = c.recalled.has(m.msg_id);
    const status = mine ? c.status(m) : null;
    const canRecall = mine && !recalled && now - m.ts < this.recallMs();
    const text = recalled ? "" : bodyText(m.body, m.type);
    const signature = [mine, recalled, status, canRecall, text, m.edited ?? 0].join("|");
    if (el.dataset["sig"] === signature) return;
    el.dataset["sig"] = signature;
    el.className = `msg ${mine ? "mine" : "theirs"}${recalled ? " recalled" : ""}`;
    if (status !== null) el.dataset["status"] = status;
    else delete el.dataset["status"];
    const meta = h(
      "span",
      { class: "meta" },
      m.edited ? h("span", { class: "edited" }, "edited") : null,
      h("time", { datetime: new Date(m.ts).toISOString() }, clock(m.ts)),
      status !== null && !recalled
        ? h("span", { class: `ticks ticks-${status}`, title: STATUS_TEXT[status], "aria-label": STATUS_TEXT[status] }, TICKS[status])
        : null,
    );
    const bubble = recalled
      ? h("div", { class: "bubble" }, h("span", { class: "text" }, mine ? "You recalled a message" : "Message recalled"))
      : h("div", { class: "bubble" }, h("span", { class: "text" }, text), meta);
    const children: Node[] = [bubble];
    if (canRecall) {
      const button = h("button", { class: "recall", type: "button", title: "Recall this message" }, "Recall");
      button.addEventListener("click", () => this.actions.recall(m));
      children.push(button);
    }
    el.replaceChildren(...children);
  }

  private pendingNode(p: Pending): HTMLElement {
    return h("div", { class: "msg mine pending", "data-pending": p.key });
  }

  private updatePending(el: HTMLElement, p: Pending): void {
    const status: Status = p.error === null ? "sending" : "failed";
    const signature = `${status}|${p.error}`;
    if (el.dataset["sig"] === signature) return;
    el.dataset["sig"] = signature;
    el.dataset["status"] = status;
    el.className = `msg mine pending${p.error !== null ? " failed" : ""}`;
    const meta = h(
      "span",
      { class: "meta" },
      h("time", {}, clock(p.ts)),
      h("span", { class: `ticks ticks-${status}`, title: STATUS_TEXT[status] }, TICKS[status]),
    );
    const children: Node[] = [h("div", { class: "bubble" }, h("span", { class: "text" }, p.text), meta)];
    if (p.error !== null) {
      const dismiss = h("button", { class: "recall", type: "button" }, "Dismiss");
      dismiss.addEventListener("click", () => this.actions.dismiss(p));
      children.push(h("div", { class: "send-error" }, `Not sent: ${p.error}`), dismiss);
    }
    el.replaceChildren(...children);
  }
}
