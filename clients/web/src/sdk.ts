/**
 * The one place the page meets the SDK (@imserver/client, clients/js): the
 * page builds with esbuild straight from its TypeScript source.
 */

export { Client, ImError, LocalStorageStore } from "@imserver/client";
export type {
  Conv,
  ConvsResult,
  HistoryResult,
  Msg,
  StateEvent,
  User,
} from "@imserver/client";
