-- Edits and per-user hiding; mirrors 0007_edits.mysql.sql (SQLite has no ADD COLUMN IF NOT
-- EXISTS, but its DDL is transactional: a partial apply rolls back whole).
ALTER TABLE t_msg_record_list ADD COLUMN edited INTEGER NOT NULL DEFAULT 0;

ALTER TABLE t_conv ADD COLUMN clearedUpTo INTEGER NOT NULL DEFAULT 0;

ALTER TABLE t_conv ADD COLUMN clearedSeq INTEGER NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS t_hidden (
  uid INTEGER NOT NULL,
  msgId INTEGER NOT NULL,
  sessionId INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  PRIMARY KEY (uid, msgId)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS hidden_seq ON t_hidden (uid, seq);
