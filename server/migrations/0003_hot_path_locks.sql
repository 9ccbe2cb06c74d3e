-- Hot path, version 3.
--
-- 1. No foreign keys from the job tables to workbroker.queues. A foreign key
--    makes every job insert take a KEY SHARE lock on its queue's row, which
--    enqueues also update (the sequence counter): under load the row turns
--    into a MultiXact hot spot and every enqueue waits on the MultiXact SLRU.
--    Queue rows are created before any job of the queue (the enqueue paths
--    upsert them first) and are never deleted, so the constraint guarded
--    nothing the code does not already guarantee.
-- 2. Retention pruning reads finished jobs per queue and oldest first, so a
--    pass that finds nothing to prune costs one index probe per queue.

ALTER TABLE workbroker.jobs DROP CONSTRAINT IF EXISTS jobs_queue_fkey;
ALTER TABLE workbroker.finished_jobs DROP CONSTRAINT IF EXISTS finished_jobs_queue_fkey;

DROP INDEX IF EXISTS workbroker.finished_jobs_retention_idx;
CREATE INDEX finished_jobs_retention_idx ON workbroker.finished_jobs (queue, finished_at) WHERE state IN (4, 6);
