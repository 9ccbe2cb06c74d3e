-- Integer-led hot indexes, version 13.
--
-- The indexes every job row enters began with the queue's name: in `jobs`
-- the waiting index (what leases read) and the (queue, sequence) index (the
-- watermark, listing a queue, its counts); in `finished_jobs`, which every
-- ack inserts into, the (queue, state, sequence) index (listing, redrive)
-- and the retention index (pruning). A text first column costs on every
-- insert and every descent: each comparison goes through the collation-aware
-- text comparison, and PostgreSQL cannot cache the offsets of the columns
-- after a variable-length one, so every later column of every index tuple
-- compared is found by walking the tuple (`nocache_index_getattr`, the top
-- function of a bulk-enqueue profile). They now begin with `queue_key(queue)`,
-- a 32-bit hash of the name, and every statement that reads them by queue
-- names both the key and the queue (`queue_key(j.queue) = queue_key(q.name)
-- AND j.queue = q.name`): the key finds the index range, the name drops the rows
-- of another queue whose name has the same hash. A collision costs only
-- those rows being read and dropped, never a wrong answer.
--
-- `pgbench`, one connection, `enqueue_plain_jobs` of 1,000 jobs: 9.3 to
-- 9.5 ms per call before, 8.2 to 8.3 ms after (the same table without the
-- (queue, sequence) index at all: 7.8 ms).
--
-- The four indexes are rebuilt here, which holds each table's write lock for
-- as long as that takes (seconds per million rows).

-- Inlined by the planner into `hashtext(queue)`, in the index definitions and
-- in queries alike, which is how a query's condition meets the index.
CREATE FUNCTION workbroker.queue_key(queue text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.hashtext(queue)
$$;

DROP INDEX workbroker.jobs_waiting_idx;
CREATE INDEX jobs_waiting_idx ON workbroker.jobs (workbroker.queue_key(queue), priority DESC, run_at, id)
    WHERE state = 2 AND NOT blocked;

DROP INDEX workbroker.jobs_queue_sequence_idx;
CREATE INDEX jobs_queue_sequence_idx ON workbroker.jobs (workbroker.queue_key(queue), sequence);

DROP INDEX workbroker.finished_jobs_queue_state_sequence_idx;
CREATE INDEX finished_jobs_queue_state_sequence_idx
    ON workbroker.finished_jobs (workbroker.queue_key(queue), state, sequence);

DROP INDEX workbroker.finished_jobs_retention_idx;
CREATE INDEX finished_jobs_retention_idx ON workbroker.finished_jobs (workbroker.queue_key(queue), finished_at)
    WHERE state IN (4, 6);
