-- Blocking; mirrors 0006_blocks.mysql.sql.
CREATE TABLE IF NOT EXISTS t_block (
  uid INTEGER NOT NULL,
  blockedUid INTEGER NOT NULL,
  createdAt INTEGER NOT NULL,
  PRIMARY KEY (uid, blockedUid)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS block_blocked ON t_block (blockedUid, uid);
