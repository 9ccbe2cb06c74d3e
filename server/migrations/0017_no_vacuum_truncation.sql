-- No truncation by vacuum of the job tables, version 17.
--
-- When the last pages of a table are empty, VACUUM (the broker's vacuumer
-- and autovacuum alike) gives them back to the file system, and to do that
-- it takes the table's ACCESS EXCLUSIVE lock: every enqueue, lease and ack
-- waits for it. The hot table empties its tail whenever the workers catch
-- up, so under load this happened every few seconds; vacuums that truncated
-- took 0.2 to 0.7 s instead of 20 to 40 ms, and the enqueue-to-handler
-- latency at 5,000 jobs/s stalled for that long (p99 of hundreds of ms). The
-- next inserts then extended the file again, page by page.
--
-- The tables keep their size instead; vacuum marks emptied pages free and
-- later rows fill them. To give the space of a past backlog back, run
-- `VACUUM (TRUNCATE) workbroker.jobs` at a quiet time.
ALTER TABLE workbroker.jobs SET (vacuum_truncate = off);
ALTER TABLE workbroker.finished_jobs SET (vacuum_truncate = off);
