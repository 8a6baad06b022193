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
  if (config === null || config.websocket === null) {
    showLogin(config, config?.problem ?? "The server's configuration could not be read.");
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

async function main(): Promise<void> {
  const fromAddress = takeTokenFromAddress();
  let config: WebConfig | null = null;
  try {
    config = await fetchConfig();
  } catch (e) {
    showLogin(null, `Cannot reach the server: ${e instanceof Error ? e.message : String(e)}`);
    return;
  }
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
