/** The conversation list: avatar, name, last message, time, unread badge; and "new chat". */

import { fill, h } from "../dom.js";
import { avatar, bodyText, displayName, type Profile, shortTime } from "../format.js";
import type { Conversation, Model } from "../model.js";

export interface SidebarActions {
  open(peer: number): void;
  startChat(uid: number): void;
  moreConvs(): void;
}

export class Sidebar {
  readonly root: HTMLElement;
  private readonly list: HTMLUListElement;
  private readonly more: HTMLButtonElement;
  private readonly input: HTMLInputElement;
  private readonly error: HTMLElement;
  private signature = "";

  constructor(private readonly actions: SidebarActions) {
    this.input = h("input", {
      id: "new-peer",
      type: "text",
      inputmode: "numeric",
      autocomplete: "off",
      placeholder: "Start a chat: user id",
      "aria-label": "User id to chat with",
    });
    this.error = h("div", { class: "new-chat-error", id: "new-chat-error", role: "alert" });
    const form = h(
      "form",
      { class: "new-chat", id: "new-chat" },
      this.input,
      h("button", { type: "submit", class: "btn btn-primary", id: "new-chat-go" }, "Chat"),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const raw = this.input.value.trim();
      const uid = Number(raw);
      if (!/^[1-9][0-9]*$/.test(raw) || !Number.isSafeInteger(uid)) {
        this.showError("A user id is a positive number.");
        return;
      }
      this.showError("");
      this.actions.startChat(uid);
    });
    this.list = h("ul", { class: "conv-list", id: "conv-list", "aria-label": "Conversations" });
    this.more = h("button", { class: "btn btn-link", id: "more-convs", type: "button", hidden: true }, "Older conversations");
    this.more.addEventListener("click", () => this.actions.moreConvs());
    this.root = h(
      "aside",
      { class: "sidebar" },
      form,
      this.error,
      h("div", { class: "conv-scroll" }, this.list, this.more),
    );
  }

  showError(text: string): void {
    this.error.textContent = text;
  }

  clearInput(): void {
    this.input.value = "";
  }

  render(model: Model, selected: number | null): void {
    const views = model.ordered().map((c) => view(model, c, c.peer === selected));
    // Unchanged: keep the elements (a click in progress must not land on a replaced one).
    const signature = JSON.stringify([views, model.convsMore]);
    if (signature === this.signature) return;
    this.signature = signature;
    fill(this.list, ...views.map((v) => this.item(v)));
    if (views.length === 0) {
      this.list.appendChild(
        h("li", { class: "conv-empty" }, "No conversations yet. Start one with a user id above."),
      );
    }
    this.more.hidden = !model.convsMore;
  }

  private item(v: ConvView): HTMLElement {
    const badge =
      v.unread > 0
        ? h("span", { class: "badge", "data-unread": v.unread, "aria-label": `${v.unread} unread` }, v.unread > 99 ? "99+" : v.unread)
        : null;
    const li = h(
      "li",
      {
        class: `conv${v.selected ? " selected" : ""}${v.unread > 0 ? " has-unread" : ""}`,
        "data-peer": v.peer,
        "data-unread": v.unread,
        tabindex: 0,
        role: "button",
        "aria-current": v.selected ? "true" : null,
      },
      avatar(v.peer, v.profile),
      h(
        "div",
        { class: "conv-body" },
        h("div", { class: "conv-top" }, h("span", { class: "conv-name" }, v.name), h("span", { class: "conv-time" }, v.time)),
        h(
          "div",
          { class: "conv-bottom" },
          h("span", { class: `conv-last${v.typing ? " typing" : ""}` }, v.mine && v.preview ? h("span", { class: "conv-you" }, "You: ") : null, v.preview || "\u00a0"),
          badge,
        ),
      ),
    );
    const open = (): void => this.actions.open(v.peer);
    li.addEventListener("click", open);
    li.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        open();
      }
    });
    return li;
  }
}

/** What one entry of the list shows. */
interface ConvView {
  peer: number;
  profile: Profile | null;
  name: string;
  time: string;
  preview: string;
  mine: boolean;
  unread: number;
  selected: boolean;
  typing: boolean;
}

function view(model: Model, c: Conversation, selected: boolean): ConvView {
  const profile = model.profiles.get(c.peer) ?? null;
  let preview = "";
  let mine = false;
  if (c.last !== null) {
    mine = c.last.from === model.me;
    preview = c.recalled.has(c.last.msg_id) ? "Message recalled" : bodyText(c.last.body, c.last.type);
  } else if (c.lastMsgId !== 0n) {
    preview = "Message recalled";
  }
  const pending = c.pending[c.pending.length - 1];
  if (pending !== undefined) {
    mine = true;
    preview = pending.text;
  }
  const typing = c.typing();
  if (typing) {
    mine = false;
    preview = "typing…";
  }
  return {
    peer: c.peer,
    profile,
    name: displayName(c.peer, profile),
    time: c.last !== null ? shortTime(c.last.ts) : "",
    preview,
    mine,
    unread: c.unread,
    selected,
    typing,
  };
}
