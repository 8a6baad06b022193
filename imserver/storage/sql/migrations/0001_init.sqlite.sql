-- imserver schema v1 (SQLite). See docs/data-model.md; mirrors 0001_init.mysql.sql.

CREATE TABLE IF NOT EXISTS t_user (
  uid INTEGER NOT NULL PRIMARY KEY,
  nickname TEXT NOT NULL DEFAULT '',
  avatar TEXT NOT NULL DEFAULT '',
  createTime INTEGER NOT NULL,
  updateTime INTEGER NOT NULL,
  version INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS t_session (
  id INTEGER NOT NULL PRIMARY KEY,
  uidLow INTEGER NOT NULL,
  uidHigh INTEGER NOT NULL,
  createTime INTEGER NOT NULL,
  UNIQUE (uidLow, uidHigh)
);

CREATE TABLE IF NOT EXISTS t_msg_record_list (
  id INTEGER NOT NULL PRIMARY KEY,
  sessionId INTEGER NOT NULL,
  msgId INTEGER NOT NULL,
  senderUid INTEGER NOT NULL,
  recipientUid INTEGER NOT NULL,
  cid TEXT NOT NULL,
  msgType TEXT NOT NULL,
  body BLOB NOT NULL,
  ts INTEGER NOT NULL,
  isRead INTEGER NOT NULL DEFAULT 0,
  recordStatus INTEGER NOT NULL DEFAULT 0,
  createTime TEXT NOT NULL,
  UNIQUE (senderUid, cid)
);
CREATE INDEX IF NOT EXISTS msg_session ON t_msg_record_list (sessionId, id);

CREATE TABLE IF NOT EXISTS t_conv (
  uid INTEGER NOT NULL,
  sessionId INTEGER NOT NULL,
  peerUid INTEGER NOT NULL,
  lastMsgId INTEGER NOT NULL,
  totalCount INTEGER NOT NULL DEFAULT 0,
  readCount INTEGER NOT NULL DEFAULT 0,
  readUpTo INTEGER NOT NULL DEFAULT 0,
  version INTEGER NOT NULL DEFAULT 1,
  PRIMARY KEY (uid, sessionId)
);
CREATE INDEX IF NOT EXISTS conv_recency ON t_conv (uid, lastMsgId);

CREATE TABLE IF NOT EXISTS t_pending (
  msgId INTEGER NOT NULL PRIMARY KEY,
  uid INTEGER NOT NULL,
  senderUid INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_user ON t_pending (uid, msgId);
CREATE INDEX IF NOT EXISTS pending_sender ON t_pending (uid, senderUid, msgId);
