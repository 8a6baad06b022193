-- Keys compare exactly, as the server does (issue 9, see docs/data-model.md, "Keys and
-- equality").
--
-- utf8mb4_bin is a PAD SPACE collation: 'p' = 'p ' for MariaDB and MySQL, so the unique
-- key (senderUid, cid) refused a cid that the server's own duplicate check (Python string
-- equality) saw as new, and the group commit failed for every message in it. VARBINARY
-- compares bytes: the UTF-8 bytes of two cids are equal exactly when the strings are.
-- 64 characters of UTF-8 take at most 256 bytes. Existing values keep their bytes, and
-- a key that held under PAD SPACE holds under exact comparison, so this cannot fail on
-- existing rows (it rebuilds the table: on a large table, run it off-peak).
ALTER TABLE t_msg_record_list
  MODIFY cid VARBINARY(256) NOT NULL COMMENT 'client message id (UTF-8), unique per sender';
