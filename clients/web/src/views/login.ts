/** The sign-in card: paste a token (or open a `#token=` link). */

import { h } from "../dom.js";

export function loginView(onToken: (token: string) => void, error: string | null, problem: string | null): HTMLElement {
  const input = h("textarea", {
    id: "token-input",
    rows: 4,
    spellcheck: "false",
    autocomplete: "off",
    placeholder: "eyJhbGciOiJIUzI1NiIs…",
    "aria-label": "Token",
  });
  const errorBox = h("div", { class: "form-error", id: "login-error", role: "alert" }, error ?? "");
  const form = h(
    "form",
    { class: "login-card", id: "login" },
    h("div", { class: "brand brand-lg" }, h("span", { class: "brand-mark" }, "im"), "imserver chat"),
    h("p", {}, "Sign in with a token minted for your user id."),
    problem ? h("div", { class: "banner banner-error", id: "config-problem" }, problem) : null,
    input,
    errorBox,
    h("button", { type: "submit", class: "btn btn-primary btn-block", id: "sign-in" }, "Sign in"),
    h(
      "p",
      { class: "hint" },
      "On the server, ",
      h("code", {}, "imserver token --uid 42 --url"),
      " prints a link that signs you in, or paste what ",
      h("code", {}, "imserver token --uid 42"),
      " prints.",
    ),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) {
      errorBox.textContent = "Paste a token first.";
      return;
    }
    onToken(token);
  });
  return h("div", { class: "login" }, form);
}
