-- Queues (see docs/queues.md).

-- The transactional outbox: one row per SQL transaction whose hot-store
-- follow-up (fan-out, push, cache updates) is not known to be finished.
-- Written in the same transaction as the change, deleted once the follow-up
-- is done; replayed after a crash (by the same node at start-up, by any
-- node's sweeper once it is old).
CREATE TABLE IF NOT EXISTS t_outbox (
  id BIGINT NOT NULL PRIMARY KEY,
  nodeId INT NOT NULL,
  kind VARCHAR(16) NOT NULL,
  payload MEDIUMBLOB NOT NULL COMMENT 'msgpack',
  createdAt BIGINT NOT NULL,
  claimedBy INT NOT NULL DEFAULT -1,
  claimedAt BIGINT NOT NULL DEFAULT 0,
  attempts INT NOT NULL DEFAULT 0,
  KEY by_node (nodeId, id),
  KEY by_age (createdAt)
) ENGINE=InnoDB;

-- The delayed queue of offline notifications: one row per message, due
-- delay_seconds after it was committed.
CREATE TABLE IF NOT EXISTS t_notify (
  msgId BIGINT NOT NULL PRIMARY KEY,
  uid BIGINT NOT NULL,
  dueAt BIGINT NOT NULL,
  attempts INT NOT NULL DEFAULT 0,
  claimedBy INT NOT NULL DEFAULT -1,
  claimedUntil BIGINT NOT NULL DEFAULT 0,
  KEY by_due (dueAt)
) ENGINE=InnoDB;

-- Work that failed every retry.
CREATE TABLE IF NOT EXISTS t_dead_letter (
  id BIGINT NOT NULL PRIMARY KEY,
  kind VARCHAR(32) NOT NULL,
  ref BIGINT NOT NULL,
  payload MEDIUMBLOB NOT NULL,
  error TEXT NOT NULL,
  attempts INT NOT NULL,
  createdAt BIGINT NOT NULL,
  KEY by_time (createdAt)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
