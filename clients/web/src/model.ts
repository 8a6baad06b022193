/**
 * What the page knows: conversations (by peer), their loaded messages,
 * unread counts and the peer's receipt positions, and profiles. The server
 * is the authority; this merges what `convs`, `history` and the events say,
 * de-duplicating by msg_id, and never moves a position back.
 */

import type { Profile } from "./format.js";

export interface Msg {
  msg_id: bigint;
  session_id: bigint;
  from: number;
  to: number;
  cid?: string;
  type?: string;
  body: unknown;
  ts: number;
  sender?: { nickname: string; avatar: string };
  edited?: number;
}

export interface ConvEntry {
  session_id: bigint;
  peer: Profile;
  last: Msg | null;
  last_msg_id: bigint;
  unread: number;
  peer_read?: bigint;
  peer_delivered?: bigint;
}

export interface HistoryPage {
  msgs: Msg[];
  more: boolean;
  peer_read?: bigint;
  peer_delivered?: bigint;
}

/** A message typed here that the server has not stored yet (it is in the SDK's outbox). */
export interface Pending {
  key: number;
  to: number;
  text: string;
  ts: number;
  error: string | null;
  /** Set for a send left in the stored outbox by an earlier visit (no promise to wait for). */
  cid?: string;
}

export type Status = "sending" | "failed" | "sent" | "delivered" | "read";

function max(a: bigint, b: bigint | undefined | null): bigint {
  return b !== undefined && b !== null && b > a ? b : a;
}

export class Conversation {
  session: bigint | null = null;
  lastMsgId = 0n;
  last: Msg | null = null;
  unread = 0;
  /** The peer's positions: my messages up to these were delivered / read. */
  peerDelivered = 0n;
  peerRead = 0n;
  /** My read position (what I told the server, or another device of mine did). */
  myRead = 0n;
  /** Counts my `read` requests: a `convs` page asked before the last one has a stale count. */
  readEpoch = 0;
  readonly msgs = new Map<bigint, Msg>();
  readonly recalled = new Set<bigint>();
  pending: Pending[] = [];
  /** Until when the peer is shown as typing (ms; 0: not). */
  typingUntil = 0;
  /** History: whether the first page came, whether older pages remain. */
  loaded = false;
  more = true;
  loading = false;

  constructor(
    readonly peer: number,
    readonly created: number,
  ) {}

  /** Loaded messages, oldest first. */
  sorted(): Msg[] {
    return [...this.msgs.values()].sort((a, b) => (a.msg_id < b.msg_id ? -1 : a.msg_id > b.msg_id ? 1 : 0));
  }

  oldest(): bigint | null {
    let found: bigint | null = null;
    for (const id of this.msgs.keys()) if (!this.recalled.has(id) && (found === null || id < found)) found = id;
    return found;
  }

  /** The newest loaded message from the peer that is not recalled. */
  newestFromPeer(): Msg | null {
    let found: Msg | null = null;
    for (const m of this.msgs.values()) {
      if (m.from === this.peer && !this.recalled.has(m.msg_id) && (found === null || m.msg_id > found.msg_id)) found = m;
    }
    return found;
  }

  typing(now = Date.now()): boolean {
    return this.typingUntil > now;
  }

  status(m: Msg): Status {
    if (m.msg_id <= this.peerRead) return "read";
    if (m.msg_id <= this.peerDelivered) return "delivered";
    return "sent";
  }
}

export class Model {
  readonly convs = new Map<number, Conversation>();
  readonly profiles = new Map<number, Profile>();
  private readonly bySession = new Map<bigint, number>();
  private created = 0;
  /** Whether more pages of `convs` remain, and where the next starts. */
  convsMore = false;
  convsBefore: bigint | null = null;

  constructor(readonly me: number) {}

  conv(peer: number): Conversation {
    let c = this.convs.get(peer);
    if (c === undefined) {
      c = new Conversation(peer, ++this.created);
      this.convs.set(peer, c);
    }
    return c;
  }

  bySessionId(session: bigint): Conversation | null {
    const peer = this.bySession.get(session);
    return peer === undefined ? null : this.conv(peer);
  }

  private setSession(c: Conversation, session: bigint): void {
    c.session = session;
    this.bySession.set(session, c.peer);
  }

  /** Forget everything (a `reset`: the server forgot this device). */
  clear(): void {
    this.convs.clear();
    this.bySession.clear();
    this.convsMore = false;
    this.convsBefore = null;
  }

  setProfile(p: Profile): void {
    this.profiles.set(p.uid, { uid: p.uid, nickname: p.nickname ?? "", avatar: p.avatar ?? "" });
  }

  /** Conversations, the latest first; new empty ones on top. */
  ordered(): Conversation[] {
    return [...this.convs.values()].sort((a, b) => {
      if (a.lastMsgId === 0n || b.lastMsgId === 0n) {
        if (a.lastMsgId !== b.lastMsgId) return a.lastMsgId === 0n ? -1 : 1;
        return b.created - a.created;
      }
      return a.lastMsgId > b.lastMsgId ? -1 : a.lastMsgId < b.lastMsgId ? 1 : 0;
    });
  }

  totalUnread(): number {
    let n = 0;
    for (const c of this.convs.values()) n += c.unread;
    return n;
  }

  peerOf(m: Msg): number {
    return m.from === this.me ? m.to : m.from;
  }

  /**
   * A message (sent here, pushed, replayed or paged): added once, by msg_id.
   * `unread` is the server's count for its conversation, when it says.
   * Returns the conversation, and whether the message is new.
   */
  addMessage(m: Msg, unread?: number, counts = true): [Conversation, boolean] {
    const c = this.conv(this.peerOf(m));
    this.setSession(c, m.session_id);
    if (m.sender !== undefined) this.setProfile({ uid: m.from, ...m.sender });
    if (c.recalled.has(m.msg_id)) return [c, false];
    const old = c.msgs.get(m.msg_id);
    if (old !== undefined && (old.edited ?? 0) >= (m.edited ?? 0)) return [c, false];
    c.msgs.set(m.msg_id, m);
    if (m.msg_id >= c.lastMsgId) {
      c.lastMsgId = m.msg_id;
      c.last = m;
    }
    if (old === undefined && m.from !== this.me) {
      c.typingUntil = 0;
      if (unread !== undefined) c.unread = unread;
      else if (counts && m.msg_id > c.myRead) c.unread += 1;
    }
    return [c, old === undefined];
  }

  /** Each conversation's `readEpoch`, to pass to `applyConvs` with the page asked now. */
  readEpochs(): Map<number, number> {
    return new Map([...this.convs.values()].map((c) => [c.peer, c.readEpoch]));
  }

  applyConvs(entries: ConvEntry[], more: boolean, epochs: Map<number, number> = new Map()): void {
    for (const e of entries) {
      this.setProfile(e.peer);
      const c = this.conv(e.peer.uid);
      this.setSession(c, e.session_id);
      if (e.last_msg_id >= c.lastMsgId) {
        c.lastMsgId = e.last_msg_id;
        c.last = e.last;
      }
      // A read sent since the page was asked for has a fresher count.
      if ((epochs.get(c.peer) ?? c.readEpoch) === c.readEpoch) c.unread = e.unread;
      c.peerRead = max(c.peerRead, e.peer_read);
      c.peerDelivered = max(c.peerDelivered, e.peer_delivered);
    }
    const tail = entries[entries.length - 1];
    if (tail !== undefined) this.convsBefore = tail.last_msg_id;
    this.convsMore = more;
  }

  applyHistory(c: Conversation, page: HistoryPage, older: boolean): void {
    for (const m of page.msgs) this.addMessage(m, undefined, false);
    c.peerRead = max(c.peerRead, page.peer_read);
    c.peerDelivered = max(c.peerDelivered, page.peer_delivered);
    if (older || !c.loaded) c.more = page.more;
    c.loaded = true;
  }

  /** A `read` event: mine (another device of mine read) or the peer's receipt. */
  applyRead(session: bigint, by: number, msgId: bigint, unread?: number): Conversation | null {
    const c = this.bySessionId(session);
    if (c === null) return null;
    if (by === this.me) {
      c.myRead = max(c.myRead, msgId);
      if (unread !== undefined) c.unread = unread;
    } else {
      c.peerRead = max(c.peerRead, msgId);
      c.peerDelivered = max(c.peerDelivered, msgId);
    }
    return c;
  }

  applyDelivered(session: bigint, msgId: bigint): Conversation | null {
    const c = this.bySessionId(session);
    if (c !== null) c.peerDelivered = max(c.peerDelivered, msgId);
    return c;
  }

  /** A recall: the message stays in view as "recalled"; the preview falls back. */
  applyRecall(session: bigint, msgId: bigint): Conversation | null {
    const c = this.bySessionId(session);
    if (c === null) return null;
    c.recalled.add(msgId);
    if (c.last !== null && c.last.msg_id === msgId) {
      let newest: Msg | null = null;
      for (const m of c.msgs.values()) {
        if (!c.recalled.has(m.msg_id) && (newest === null || m.msg_id > newest.msg_id)) newest = m;
      }
      c.last = newest;
    }
    return c;
  }
}
