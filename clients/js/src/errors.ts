/**
 * Every failed request rejects with an ImError: `code` is the server's error
 * code (docs/protocol.md, "Error codes") or one of the client's own:
 * `timeout`, `disconnected`, `closed`, `kicked`.
 */
export class ImError extends Error {
  override name = "ImError";

  constructor(
    readonly code: string,
    message?: string,
  ) {
    super(message ?? code);
  }
}

/** Server codes after which a send is retried with the same cid. */
export const RETRIED_CODES: ReadonlySet<string> = new Set([
  "unavailable",
  "internal",
  "rate_limited",
  "disconnected",
  "timeout",
]);
