-- Edits and per-user hiding (issue 11; see docs/data-model.md, "Edits and hiding").
--
-- edited: when the message's body was last edited (ms since epoch, strictly increasing per
-- message), 0 never. clearedUpTo: the user cleared the conversation up to this msg id (0
-- never): it hides everything at or below it, for that user only. t_hidden: the messages a
-- user hid one by one (hide), with the seq of the hide event of the user's stream that hid
-- them (catch-up renders the event's msg_ids from it). clearedSeq: the seq of that clear in
-- uid's stream: a message is cleared only if also its seq for uid is at or below it (msg ids
-- are not commit order: one committed after the clear shows). IF NOT EXISTS (MariaDB): DDL
-- commits statement by statement, so the file is re-run whole after a partial apply.
ALTER TABLE t_msg_record_list
  ADD COLUMN IF NOT EXISTS edited BIGINT NOT NULL DEFAULT 0 COMMENT 'ms of the last edit, 0 never edited';

ALTER TABLE t_conv
  ADD COLUMN IF NOT EXISTS clearedUpTo BIGINT NOT NULL DEFAULT 0
    COMMENT 'hidden for uid up to this msg id',
  ADD COLUMN IF NOT EXISTS clearedSeq BIGINT NOT NULL DEFAULT 0
    COMMENT 'seq of the clear in uid''s stream: later commits show';

CREATE TABLE IF NOT EXISTS t_hidden (
  uid BIGINT NOT NULL COMMENT 'who hid it (the peer still sees it)',
  msgId BIGINT NOT NULL,
  sessionId BIGINT NOT NULL,
  seq BIGINT NOT NULL COMMENT 'seq of the hide event in uid''s stream',
  PRIMARY KEY (uid, msgId),
  KEY by_seq (uid, seq)
) ENGINE=InnoDB;
