-- Delivery receipts and mute; mirrors 0008_receipts.mysql.sql.
ALTER TABLE t_conv ADD COLUMN deliveredUpTo INTEGER NOT NULL DEFAULT 0;

ALTER TABLE t_conv ADD COLUMN muteUntil INTEGER NOT NULL DEFAULT 0;
