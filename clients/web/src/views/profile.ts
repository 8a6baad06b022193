/** The profile dialog: one's nickname and avatar URL. */

import { h } from "../dom.js";
import { avatar, type Profile } from "../format.js";

export type SaveProfile = (nickname: string, avatarUrl: string) => Promise<void>;

export class ProfileDialog {
  readonly root: HTMLDialogElement;
  private readonly nickname: HTMLInputElement;
  private readonly avatarUrl: HTMLInputElement;
  private readonly preview: HTMLElement;
  private readonly error: HTMLElement;
  private readonly save: HTMLButtonElement;
  private uid = 0;

  constructor(private readonly onSave: SaveProfile) {
    this.nickname = h("input", { id: "profile-nickname", type: "text", maxlength: 64, autocomplete: "nickname" });
    this.avatarUrl = h("input", { id: "profile-avatar", type: "url", maxlength: 512, placeholder: "https://…" });
    this.preview = h("div", { class: "profile-preview" });
    this.error = h("div", { class: "form-error", role: "alert" });
    this.save = h("button", { type: "submit", class: "btn btn-primary", id: "profile-save" }, "Save");
    const cancel = h("button", { type: "button", class: "btn", id: "profile-cancel" }, "Cancel");
    cancel.addEventListener("click", () => this.root.close());
    const form = h(
      "form",
      { method: "dialog", class: "profile-form" },
      h("h2", {}, "Your profile"),
      this.preview,
      h("label", {}, "Nickname", this.nickname),
      h("label", {}, "Avatar URL", this.avatarUrl),
      this.error,
      h("div", { class: "dialog-buttons" }, cancel, this.save),
    );
    // Not on every keystroke: each partial URL would be fetched.
    let timer: ReturnType<typeof setTimeout> | undefined;
    const refresh = (): void => {
      clearTimeout(timer);
      timer = setTimeout(() => this.paintPreview(), 400);
    };
    this.nickname.addEventListener("input", refresh);
    this.avatarUrl.addEventListener("input", refresh);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      void this.submit();
    });
    this.root = h("dialog", { class: "profile-dialog", id: "profile-dialog" }, form);
  }

  open(profile: Profile): void {
    this.uid = profile.uid;
    this.nickname.value = profile.nickname;
    this.avatarUrl.value = profile.avatar;
    this.error.textContent = "";
    this.paintPreview();
    this.root.showModal();
    this.nickname.focus();
  }

  private paintPreview(): void {
    const p = { uid: this.uid, nickname: this.nickname.value, avatar: this.avatarUrl.value };
    this.preview.replaceChildren(avatar(this.uid, p, "lg"), h("span", {}, `user ${this.uid}`));
  }

  private async submit(): Promise<void> {
    this.save.disabled = true;
    this.error.textContent = "";
    try {
      await this.onSave(this.nickname.value.trim(), this.avatarUrl.value.trim());
      this.root.close();
    } catch (e) {
      this.error.textContent = e instanceof Error ? e.message : String(e);
    } finally {
      this.save.disabled = false;
    }
  }
}
