-- Presence (issue 11; docs/protocol.md, "Presence and typing"): per user, who may see
-- their presence and when they were last connected. A table of its own, not columns of
-- t_user: t_user rows are locked by every send (the stream head), and a last-seen write
-- must never wait behind them. A user without a row shares with contacts and was never
-- seen (lastSeen 0).
CREATE TABLE IF NOT EXISTS t_presence (
  uid BIGINT NOT NULL PRIMARY KEY,
  share TINYINT NOT NULL DEFAULT 0 COMMENT '0 contacts, 1 everyone, 2 nobody',
  lastSeen BIGINT NOT NULL DEFAULT 0 COMMENT 'ms since epoch: went online (while online) or offline'
) ENGINE=InnoDB;
