-- Blocking (issue 11; see docs/protocol.md, "Blocking", and docs/data-model.md).
--
-- A row: uid blocks blockedUid. Sends between the two are refused either way, so a node
-- loads both directions of a user at once: the primary key finds whom a user blocks,
-- by_blocked who blocks the user (one query, see imserver/storage/blocks.py).
CREATE TABLE IF NOT EXISTS t_block (
  uid BIGINT NOT NULL COMMENT 'the user who blocks',
  blockedUid BIGINT NOT NULL COMMENT 'the user blocked',
  createdAt BIGINT NOT NULL COMMENT 'ms since epoch',
  PRIMARY KEY (uid, blockedUid),
  KEY by_blocked (blockedUid, uid)
) ENGINE=InnoDB;
