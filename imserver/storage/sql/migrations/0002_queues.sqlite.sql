-- Queues (see docs/queues.md); mirrors 0002_queues.mysql.sql.

CREATE TABLE IF NOT EXISTS t_outbox (
  id INTEGER NOT NULL PRIMARY KEY,
  nodeId INTEGER NOT NULL,
  kind TEXT NOT NULL,
  payload BLOB NOT NULL,
  createdAt INTEGER NOT NULL,
  claimedBy INTEGER NOT NULL DEFAULT -1,
  claimedAt INTEGER NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_node ON t_outbox (nodeId, id);
CREATE INDEX IF NOT EXISTS outbox_age ON t_outbox (createdAt);

CREATE TABLE IF NOT EXISTS t_notify (
  msgId INTEGER NOT NULL PRIMARY KEY,
  uid INTEGER NOT NULL,
  dueAt INTEGER NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  claimedBy INTEGER NOT NULL DEFAULT -1,
  claimedUntil INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS notify_due ON t_notify (dueAt);

CREATE TABLE IF NOT EXISTS t_dead_letter (
  id INTEGER NOT NULL PRIMARY KEY,
  kind TEXT NOT NULL,
  ref INTEGER NOT NULL,
  payload BLOB NOT NULL,
  error TEXT NOT NULL,
  attempts INTEGER NOT NULL,
  createdAt INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letter_time ON t_dead_letter (createdAt);
