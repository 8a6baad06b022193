-- Several devices per user (issue 10; see docs/data-model.md, "The user's stream").
--
-- Every event that concerns a user takes the next number of the user's stream, in the
-- transaction that makes it, with the user's t_user row locked: t_user.streamSeq is the
-- head. A message carries its two numbers (recipientSeq, senderSeq) on its own row; reads
-- and recalls are rows of t_event. Rows from before this migration have NULL seqs and no
-- device reads them through catch-up. Each ALTER is one statement, so a table is either
-- changed completely or not at all (DDL commits on its own on MySQL).
ALTER TABLE t_user
  ADD COLUMN streamSeq BIGINT NOT NULL DEFAULT 0 COMMENT 'the stream head: last seq given out';

ALTER TABLE t_msg_record_list
  ADD COLUMN senderSeq BIGINT NULL COMMENT 'seq in the sender''s stream',
  ADD COLUMN recipientSeq BIGINT NULL COMMENT 'seq in the recipient''s stream',
  ADD COLUMN senderDevice BIGINT NOT NULL DEFAULT 0 COMMENT 't_device.id of the sending device, 0 unknown',
  ADD KEY by_recipient_seq (recipientUid, recipientSeq),
  ADD KEY by_sender_seq (senderUid, senderSeq);

-- Reads and recalls in a user's stream (kind 1 read, 2 recall). Old rows are deleted by
-- ts (the forget sweep).
CREATE TABLE IF NOT EXISTS t_event (
  uid BIGINT NOT NULL,
  seq BIGINT NOT NULL,
  kind TINYINT NOT NULL COMMENT '1 read, 2 recall',
  sessionId BIGINT NOT NULL,
  msgId BIGINT NOT NULL COMMENT 'read: the new read position; recall: the message',
  byUid BIGINT NOT NULL COMMENT 'read: the reader; recall: the sender',
  ts BIGINT NOT NULL COMMENT 'ms since epoch',
  PRIMARY KEY (uid, seq),
  KEY by_time (ts)
) ENGINE=InnoDB;

-- A user's devices. device compares exactly (VARBINARY holding UTF-8, as cid since
-- migration 0003): 'phone' and 'phone ' or 'Phone' are different devices. The column is
-- cursorSeq, not cursor (a reserved word in MySQL).
CREATE TABLE IF NOT EXISTS t_device (
  id BIGINT NOT NULL PRIMARY KEY,
  uid BIGINT NOT NULL,
  device VARBINARY(256) NOT NULL COMMENT 'device name (UTF-8, up to 64 characters)',
  client VARCHAR(128) NOT NULL DEFAULT '',
  cursorSeq BIGINT NOT NULL DEFAULT 0 COMMENT 'stream position the device confirmed',
  createdAt BIGINT NOT NULL COMMENT 'ms since epoch',
  lastSeen BIGINT NOT NULL COMMENT 'ms since epoch',
  revokedAt BIGINT NOT NULL DEFAULT 0 COMMENT 'ms since epoch, 0 never',
  UNIQUE KEY uk_user_device (uid, device),
  KEY by_last_seen (lastSeen)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
