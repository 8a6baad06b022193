/**
 * The web chat's entry: find a token (the address's `#token=`, then the
 * one kept from last time), ask the server where its WebSocket is, and
 * start the signed-in page; or show the sign-in card.
 */

import { App } from "./app.js";
import { byId } from "./dom.js";
import { fetchConfig, readToken, saveToken, savedToken, takeTokenFromAddress, type WebConfig } from "./session.js";
import { loginView } from "./views/login.js";

let app: App | null = null;

function showLogin(config: WebConfig | null, error: string | null): void {
  const root = byId("app");
  root.replaceChildren(loginView((token) => signIn(config, token), error, config?.problem ?? null));
  document.getElementById("token-input")?.focus();
}

function signIn(config: WebConfig | null, raw: string): void {
  let info;
  try {
    info = readToken(raw);
  } catch (e) {
    saveToken(null);
    showLogin(config, e instanceof Error ? e.message : String(e));
    return;
  }
  if (config === null) {
    // Signed in as soon as the server answers (main() takes the saved token).
    saveToken(info.token);
    showLogin(null, "Waiting for the server…");
    return;
  }
  if (config.websocket === null) {
    showLogin(config, config.problem ?? "The server has no WebSocket listener.");
    return;
  }
  saveToken(info.token);
  app?.stop();
  app = new App(byId("app"), info, config, () => {
    app = null;
    saveToken(null);
    showLogin(config, null);
  });
  (window as { imchat?: App }).imchat = app;
  app.start();
}

/** The server's config; while it cannot be reached, say so and try again. */
async function fetchConfigUntilAnswered(): Promise<WebConfig> {
  for (let wait = 2; ; wait = Math.min(wait * 2, 30)) {
    try {
      return await fetchConfig();
    } catch (e) {
      const why = e instanceof Error ? e.message : String(e);
      const text = `Cannot reach the server (${why}); trying again in ${wait} s…`;
      const shown = document.getElementById("login-error");
      // Keep the card (and what may be typed in it), change the words.
      if (shown !== null) shown.textContent = text;
      else showLogin(null, text);
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    }
  }
}

async function main(): Promise<void> {
  const fromAddress = takeTokenFromAddress();
  const config = await fetchConfigUntilAnswered();
  const token = fromAddress ?? savedToken();
  if (token !== null) signIn(config, token);
  else showLogin(config, null);
  // Leaving the page: close the connection (its last acks go out first).
  window.addEventListener("pagehide", (e) => {
    if (!e.persisted) app?.stop();
  });
  // A `#token=` link opened in a tab that has the page already.
  window.addEventListener("hashchange", () => {
    const next = takeTokenFromAddress();
    if (next !== null) signIn(config, next);
  });
}

void main();
