-- Delivery receipts and mute (issue 11; see docs/data-model.md and docs/protocol.md,
-- "Receipts", "Mute").
--
-- deliveredUpTo: the highest message of the session this user (the row's uid, the
-- recipient) acked, set by the ack transaction that removed it from t_pending (never moves
-- back). muteUntil: ms since epoch until which the row's user gets no webhook notification
-- for this session (0 or a past time: not muted). A mute is also a t_event row (kind 6,
-- msgId holding the new muteUntil). One ALTER: the table is changed completely or not at all.
ALTER TABLE t_conv
  ADD COLUMN deliveredUpTo BIGINT NOT NULL DEFAULT 0 COMMENT 'highest msgId of the session acked by uid',
  ADD COLUMN muteUntil BIGINT NOT NULL DEFAULT 0 COMMENT 'ms since epoch; 0 or past: not muted';
