-- Presence; mirrors 0009_presence.mysql.sql.
CREATE TABLE IF NOT EXISTS t_presence (
  uid INTEGER NOT NULL PRIMARY KEY,
  share INTEGER NOT NULL DEFAULT 0,
  lastSeen INTEGER NOT NULL DEFAULT 0
);
