/**
 * The shapes of results and events. Field names are the wire's (snake_case);
 * ids are bigint (docs/sdk.md, "Ids in JavaScript").
 */

/** A message body: a string or a map of plain data. */
export type Body = string | { [key: string]: unknown };

export interface Sender {
  nickname: string;
  avatar: string;
}

/** The msg object (docs/protocol.md, "The msg object"). */
export interface Msg {
  msg_id: bigint;
  session_id: bigint;
  from: number;
  to: number;
  cid: string;
  type: string;
  body: Body;
  ts: number;
  sender?: Sender;
  /** When it was last edited (ms); absent if never. */
  edited?: number;
}

export interface User {
  uid: number;
  nickname: string;
  avatar: string;
}

export type PresenceSetting = "everyone" | "contacts" | "nobody";

export interface SendResult {
  msg_id: bigint;
  session_id: bigint;
  ts: number;
  dup: boolean;
  seq?: number;
}

export interface AuthResult {
  uid: number;
  heartbeat: number;
  server_time: number;
  device: string;
  seq: number;
  head: number;
  new_device: boolean;
  reset?: boolean;
}

export interface ReadResult {
  unread: number;
  total_unread: number;
  seq?: number;
}

export interface UnreadResult {
  total: number;
  sessions: { session_id: bigint; count: number }[];
  more?: boolean;
}

export interface Conv {
  session_id: bigint;
  peer: User;
  last: Msg | null;
  last_msg_id: bigint;
  unread: number;
  peer_read: bigint;
  peer_delivered: bigint;
  muted_until: number;
}

export interface ConvsResult {
  convs: Conv[];
  more: boolean;
}

export interface HistoryResult {
  msgs: Msg[];
  more: boolean;
  peer_read: bigint;
  peer_delivered: bigint;
}

export interface ProfileResult {
  users: User[];
  more?: boolean;
}

export interface SetProfileResult {
  user: User;
  presence: PresenceSetting;
}

export interface Device {
  device: string;
  client: string;
  online: boolean;
  node: string | null;
  since: number | null;
  last_seen: number;
}

export interface PresenceState {
  uid: number;
  online: boolean;
  last_seen: number;
}

/** What `outbox` lists: sends not answered yet. */
export interface OutboxEntry {
  cid: string;
  to: number;
  body: Body;
  type?: string;
}

export type State = "connecting" | "syncing" | "live" | "offline" | "kicked" | "failed" | "closed";

// ---- events ----------------------------------------------------------

/** Events that come from catch-up or sync carry `replay: true`. */
interface Replayable {
  replay: boolean;
}

export interface MessageEvent extends Replayable {
  msg: Msg;
  unread?: number;
  total_unread?: number;
  seq?: number;
}

export interface ReadEvent extends Replayable {
  session_id: bigint;
  by: number;
  msg_id: bigint;
  unread?: number;
  total_unread?: number;
  seq?: number;
}

export interface RecallEvent extends Replayable {
  msg_id: bigint;
  session_id: bigint;
  by: number;
  seq?: number;
}

export interface EditEvent extends Replayable {
  msg: Msg;
  seq?: number;
}

export interface DeliveredEvent {
  session_id: bigint;
  msg_id: bigint;
  by: number;
}

export interface HideEvent extends Replayable {
  msg_ids: bigint[];
  seq?: number;
}

export interface ClearEvent extends Replayable {
  session_id: bigint;
  up_to: bigint;
  seq?: number;
}

export interface MuteEvent extends Replayable {
  session_id: bigint;
  until: number;
  seq?: number;
}

export interface TypingEvent {
  from: number;
  active: boolean;
}

export interface PresenceEvent {
  uid: number;
  online: boolean;
  last_seen: number;
}

export interface ProfileEvent {
  user: User;
  presence: PresenceSetting;
}

export interface BlockEvent {
  uid: number;
  blocked: boolean;
}

export interface KickEvent {
  reason: string;
}

export type ResetEvent = Record<string, never>;

export interface StateEvent {
  state: State;
  reason?: string;
  /** Seconds until the next connect, with `offline`. */
  retry_in?: number;
}

/** Every push frame as it arrived, known or not. */
export type PushEvent = { t: string } & Record<string, unknown>;

/** The event map: `client.on(name, handler)`. */
export interface ClientEvents {
  message: MessageEvent;
  read: ReadEvent;
  recall: RecallEvent;
  edit: EditEvent;
  delivered: DeliveredEvent;
  hide: HideEvent;
  clear: ClearEvent;
  mute: MuteEvent;
  typing: TypingEvent;
  presence: PresenceEvent;
  profile: ProfileEvent;
  block: BlockEvent;
  kick: KickEvent;
  reset: ResetEvent;
  state: StateEvent;
  push: PushEvent;
}

export type EventName = keyof ClientEvents;

/** The discriminated union of all events, for a single handler if one prefers. */
export type AnyEvent = { [K in EventName]: { type: K } & ClientEvents[K] }[EventName];
