-- Unblocking in the settle statements, version 10.
--
-- Version 9 cleared `blocked` on the next job of a key from a statement
-- trigger on every DELETE from `jobs`. The trigger's transition table copies
-- every deleted row, keyed or not: 0.2 to 0.35 ms on a 100-job enqueue and
-- ack cycle of 4.85 ms, paid by every ack. The broker's statements that move
-- jobs out of `jobs` (ack, nack and release to DEAD, cancel) now call
-- `workbroker.unblock_key_heads` themselves, once all their rows are moved
-- and only when one of them had a key, in the same statement: the function
-- is volatile, so its statements see those deletes, and it takes the key
-- locks before reading, as before.
--
-- A DELETE written by hand no longer clears anything: follow it with
-- `SELECT workbroker.unblock_key_heads(queues, keys)` for the keys it
-- removed jobs of (cancelling through the API does this).

DROP TRIGGER jobs_unblock_after_delete ON workbroker.jobs;
DROP FUNCTION workbroker.unblock_after_delete();
