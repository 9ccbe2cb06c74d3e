-- Statistics of `finished_jobs` only for the columns statements filter and
-- sort it by, version 18.
--
-- Every acked job moves into `finished_jobs`, so the table grows from empty
-- (or from what retention left) at the rate of the hot path, and the broker's
-- vacuumer analyzes it each time it has grown past twice the rows its
-- statistics describe. At 5,000 jobs/s that came every few seconds early in
-- a run, and each ANALYZE spent 100 to 240 ms of CPU: it computed
-- histograms and common values for all 23 columns of a 30,000-row sample,
-- payloads, attributes and lease fields included. On a machine whose two
-- cores the broker and PostgreSQL share, the late jobs of a latency run
-- came in the seconds of those ANALYZEs.
--
-- The statements on the table filter and sort by `id`, the queue (and the
-- `queue_key(queue)` expression of its indexes, whose statistics come with
-- the index), `state`, `sequence`, `finished_at` and `dedup_key IS NULL`;
-- the other columns are only read back. A statistics target of 0 leaves a
-- column out of ANALYZE, and the planner uses its defaults for any
-- condition a later statement might put on it. On 75,000 finished jobs,
-- an ANALYZE took 108 to 120 ms before and 43 to 45 ms after.
ALTER TABLE workbroker.finished_jobs
    ALTER COLUMN kind SET STATISTICS 0,
    ALTER COLUMN priority SET STATISTICS 0,
    ALTER COLUMN run_at SET STATISTICS 0,
    ALTER COLUMN created_at SET STATISTICS 0,
    ALTER COLUMN attempt SET STATISTICS 0,
    ALTER COLUMN max_attempts SET STATISTICS 0,
    ALTER COLUMN ordering_key SET STATISTICS 0,
    ALTER COLUMN shard SET STATISTICS 0,
    ALTER COLUMN lease_duration SET STATISTICS 0,
    ALTER COLUMN lease_token SET STATISTICS 0,
    ALTER COLUMN lease_expires_at SET STATISTICS 0,
    ALTER COLUMN leased_by SET STATISTICS 0,
    ALTER COLUMN leased_at SET STATISTICS 0,
    ALTER COLUMN last_error SET STATISTICS 0,
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN attributes SET STATISTICS 0,
    ALTER COLUMN result SET STATISTICS 0;
