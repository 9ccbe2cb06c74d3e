-- Finished-job counters kept by the statements that finish jobs, version 11.
--
-- Version 6 kept `finished_counts` with statement triggers on
-- `finished_jobs`. The insert trigger's transition table copies every
-- inserted row, payload and all, so every ack paid for it, the way every
-- ack paid for version 9's delete trigger on `jobs` (0010 removed that one).
-- The broker's statements that move jobs into `finished_jobs` (ack, nack and
-- release to DEAD, cancel) now add their rows to the counters themselves, in
-- the same statement: one upsert per queue, on the same 64 slots per queue
-- and state, picked by the backend's pid.
--
-- Deletes from `finished_jobs` (retention, redrive) are rare and batched;
-- their trigger stays. An INSERT into `finished_jobs` written by hand no
-- longer counts: add its rows to `workbroker.finished_counts` (queue, state,
-- slot, count) in the same transaction.

DROP TRIGGER finished_jobs_count_inserted ON workbroker.finished_jobs;
DROP FUNCTION workbroker.count_finished_inserted();
