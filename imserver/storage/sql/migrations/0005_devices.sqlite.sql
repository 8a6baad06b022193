-- Several devices per user; mirrors 0005_devices.mysql.sql (SQLite's TEXT compares
-- exactly already, see 0003_exact_keys.sqlite.sql).
ALTER TABLE t_user ADD COLUMN streamSeq INTEGER NOT NULL DEFAULT 0;

ALTER TABLE t_msg_record_list ADD COLUMN senderSeq INTEGER NULL;

ALTER TABLE t_msg_record_list ADD COLUMN recipientSeq INTEGER NULL;

ALTER TABLE t_msg_record_list ADD COLUMN senderDevice INTEGER NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS msg_recipient_seq ON t_msg_record_list (recipientUid, recipientSeq);

CREATE INDEX IF NOT EXISTS msg_sender_seq ON t_msg_record_list (senderUid, senderSeq);

CREATE TABLE IF NOT EXISTS t_event (
  uid INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  kind INTEGER NOT NULL,
  sessionId INTEGER NOT NULL,
  msgId INTEGER NOT NULL,
  byUid INTEGER NOT NULL,
  ts INTEGER NOT NULL,
  PRIMARY KEY (uid, seq)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS event_time ON t_event (ts);

CREATE TABLE IF NOT EXISTS t_device (
  id INTEGER NOT NULL PRIMARY KEY,
  uid INTEGER NOT NULL,
  device TEXT NOT NULL,
  client TEXT NOT NULL DEFAULT '',
  cursorSeq INTEGER NOT NULL DEFAULT 0,
  createdAt INTEGER NOT NULL,
  lastSeen INTEGER NOT NULL,
  revokedAt INTEGER NOT NULL DEFAULT 0,
  UNIQUE (uid, device)
);

CREATE INDEX IF NOT EXISTS device_last_seen ON t_device (lastSeen);
