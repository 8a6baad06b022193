/**
 * Signing in: the token (from `#token=` in the address, or pasted, then
 * kept in localStorage until "Sign out"), what it says (uid, expiry,
 * device), and the server's /v1/web/config.
 */

const TOKEN_KEY = "imserver.token";

export interface TokenInfo {
  token: string;
  uid: number;
  /** Seconds since the epoch. */
  exp: number | null;
  /** The device the token is bound to, if any. */
  device: string | null;
}

export interface WebConfig {
  websocket: string | null;
  problem: string | null;
  recall_seconds: number;
}

/**
 * The token given in the address (`#token=...`), removed from the address
 * bar at once so it is not left in the history or shown on screen.
 */
export function takeTokenFromAddress(): string | null {
  const hash = location.hash.replace(/^#/, "");
  if (!hash) return null;
  const params = new URLSearchParams(hash);
  const token = params.get("token");
  if (token === null) return null;
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  return token.trim() || null;
}

export function savedToken(): string | null {
  try {
    return localStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

export function saveToken(token: string | null): void {
  try {
    if (token === null) localStorage.removeItem(TOKEN_KEY);
    else localStorage.setItem(TOKEN_KEY, token);
  } catch {
    // Private mode: the session lasts as long as the page.
  }
}

function base64UrlDecode(part: string): string {
  const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
  const bin = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
  const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

/**
 * What a token says, read without checking its signature (the server does
 * that): enough to say "this is not a token" or "it has expired" before
 * connecting, and to keep each user's device and state apart.
 */
export function readToken(raw: string): TokenInfo {
  const token = raw.trim();
  const parts = token.split(".");
  if (parts.length !== 3) throw new Error("This is not an imserver token (a JWT has three parts).");
  let claims: Record<string, unknown>;
  try {
    claims = JSON.parse(base64UrlDecode(parts[1]!)) as Record<string, unknown>;
  } catch {
    throw new Error("This token cannot be read.");
  }
  const uid = Number(claims["sub"]);
  if (!Number.isSafeInteger(uid) || uid <= 0) throw new Error("This token names no user.");
  const exp = typeof claims["exp"] === "number" ? claims["exp"] : null;
  if (exp !== null && exp * 1000 <= Date.now()) throw new Error("This token has expired: mint a new one.");
  const device = typeof claims["device"] === "string" ? claims["device"] : null;
  return { token, uid, exp, device };
}

export async function fetchConfig(): Promise<WebConfig> {
  const response = await fetch("v1/web/config", { cache: "no-store" });
  if (!response.ok) throw new Error(`the server answered ${response.status} for v1/web/config`);
  return (await response.json()) as WebConfig;
}
