-- imserver schema v1 (MySQL / MariaDB). See docs/data-model.md.

CREATE TABLE IF NOT EXISTS t_user (
  uid BIGINT NOT NULL PRIMARY KEY,
  nickname VARCHAR(64) NOT NULL DEFAULT '',
  avatar VARCHAR(512) NOT NULL DEFAULT '',
  createTime BIGINT NOT NULL COMMENT 'ms since epoch',
  updateTime BIGINT NOT NULL COMMENT 'ms since epoch',
  version BIGINT NOT NULL DEFAULT 0 COMMENT 'increases with every change (cache guard)'
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row per pair of users; the unique key makes first use race-free.
CREATE TABLE IF NOT EXISTS t_session (
  id BIGINT NOT NULL PRIMARY KEY,
  uidLow BIGINT NOT NULL,
  uidHigh BIGINT NOT NULL,
  createTime BIGINT NOT NULL,
  UNIQUE KEY uk_pair (uidLow, uidHigh)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The seed's message record table, with the message content beside it.
-- id = msgId (message ids are already unique 64-bit ids).
CREATE TABLE IF NOT EXISTS t_msg_record_list (
  id BIGINT NOT NULL PRIMARY KEY,
  sessionId BIGINT NOT NULL COMMENT 'Conversation ID',
  msgId BIGINT NOT NULL COMMENT 'Message ID',
  senderUid BIGINT NOT NULL,
  recipientUid BIGINT NOT NULL,
  cid VARCHAR(64) NOT NULL COMMENT 'client message id, unique per sender',
  msgType VARCHAR(32) NOT NULL,
  body MEDIUMBLOB NOT NULL COMMENT 'msgpack',
  ts BIGINT NOT NULL COMMENT 'ms since epoch',
  isRead TINYINT NOT NULL DEFAULT 0 COMMENT 'Read flag',
  recordStatus SMALLINT NOT NULL DEFAULT 0 COMMENT 'Message status: 0 normal, 1 recalled',
  createTime DATETIME(3) NOT NULL,
  UNIQUE KEY uk_sender_cid (senderUid, cid),
  KEY sessionId (sessionId, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Per user and session: the durable conversation list entry and the seed's
-- unread pair (unread = totalCount - readCount). version increases with every
-- change, so the Redis copy can refuse stale writes.
CREATE TABLE IF NOT EXISTS t_conv (
  uid BIGINT NOT NULL,
  sessionId BIGINT NOT NULL,
  peerUid BIGINT NOT NULL,
  lastMsgId BIGINT NOT NULL,
  totalCount BIGINT NOT NULL DEFAULT 0,
  readCount BIGINT NOT NULL DEFAULT 0,
  readUpTo BIGINT NOT NULL DEFAULT 0,
  version BIGINT NOT NULL DEFAULT 1,
  PRIMARY KEY (uid, sessionId),
  KEY by_recency (uid, lastMsgId)
) ENGINE=InnoDB;

-- Delivery state: a row per message its recipient (uid) has not acked yet.
-- A message has one recipient, so msgId alone is the key.
CREATE TABLE IF NOT EXISTS t_pending (
  msgId BIGINT NOT NULL PRIMARY KEY,
  uid BIGINT NOT NULL,
  senderUid BIGINT NOT NULL,
  KEY by_user (uid, msgId),
  KEY by_sender (uid, senderUid, msgId)
) ENGINE=InnoDB;
