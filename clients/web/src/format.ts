/** How things are shown: names, avatars, times, message previews. */

import { h } from "./dom.js";

export interface Profile {
  uid: number;
  nickname: string;
  avatar: string;
}

export function displayName(uid: number, profile?: Profile | null): string {
  const nick = profile?.nickname?.trim();
  return nick ? nick : `User ${uid}`;
}

const PALETTE = ["#ef4444", "#f97316", "#eab308", "#22c55e", "#14b8a6", "#3b82f6", "#8b5cf6", "#ec4899"];

/** An avatar: the profile's image if it has a usable URL, else its initial on a colour of its uid. */
export function avatar(uid: number, profile?: Profile | null, size = "md"): HTMLElement {
  const name = displayName(uid, profile);
  const url = profile?.avatar?.trim();
  const box = h("span", { class: `avatar avatar-${size}`, "aria-hidden": "true" });
  box.style.background = PALETTE[uid % PALETTE.length] ?? "#64748b";
  const initial = profile?.nickname?.trim() ? Array.from(name)[0]!.toUpperCase() : String(uid).slice(-2);
  box.textContent = initial;
  if (url && /^(https?:|data:image\/)/i.test(url)) {
    const img = h("img", { src: url, alt: "", referrerpolicy: "no-referrer" });
    img.addEventListener("error", () => img.remove());
    box.appendChild(img);
  }
  return box;
}

/** A message body as text (a map body is shown as JSON). */
export function bodyText(body: unknown, type = "text"): string {
  if (typeof body === "string") return body;
  if (type !== "text") return `[${type}]`;
  try {
    return JSON.stringify(body, (_k, v) => (typeof v === "bigint" ? v.toString() : v));
  } catch {
    return "[message]";
  }
}

function pad(n: number): string {
  return n < 10 ? `0${n}` : String(n);
}

export function clock(ts: number): string {
  const d = new Date(ts);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function sameDay(a: Date, b: Date): boolean {
  return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
}

/** A short time for the conversation list: the clock today, else the date. */
export function shortTime(ts: number, now = Date.now()): string {
  const d = new Date(ts);
  const today = new Date(now);
  if (sameDay(d, today)) return clock(ts);
  const yesterday = new Date(now - 86400000);
  if (sameDay(d, yesterday)) return "Yesterday";
  return d.toLocaleDateString(undefined, { month: "short", day: "numeric" });
}

/** The label of a day separator in the chat window. */
export function dayLabel(ts: number, now = Date.now()): string {
  const d = new Date(ts);
  if (sameDay(d, new Date(now))) return "Today";
  if (sameDay(d, new Date(now - 86400000))) return "Yesterday";
  return d.toLocaleDateString(undefined, { weekday: "long", month: "long", day: "numeric" });
}

export function dayKey(ts: number): string {
  const d = new Date(ts);
  return `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;
}
