-- Commit tokens (issue 9, defect 2; see imserver/storage/sql/database.py).
--
-- Every write transaction inserts one random token here, in the same request as its
-- COMMIT. When a connection fails while a COMMIT may be on its way, the node reconnects
-- and looks for the token: there, the transaction committed; absent, it rolled back. The
-- key starts with the second it was written, so old tokens are deleted by a range of the
-- primary key (every 10 s, those older than 10 minutes).
CREATE TABLE IF NOT EXISTS t_commit (
  at BIGINT NOT NULL COMMENT 'unix seconds',
  token BIGINT NOT NULL COMMENT 'random, 63 bits',
  PRIMARY KEY (at, token)
) ENGINE=InnoDB;
