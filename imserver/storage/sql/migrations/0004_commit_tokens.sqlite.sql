-- Commit tokens; mirrors 0004_commit_tokens.mysql.sql.
CREATE TABLE IF NOT EXISTS t_commit (
  at INTEGER NOT NULL,
  token INTEGER NOT NULL,
  PRIMARY KEY (at, token)
) WITHOUT ROWID;
