-- Finished-job counters, version 6.
--
-- Queue stats counted COMPLETED, DEAD and CANCELLED jobs with count(*) over
-- finished_jobs: a cost that grows with retention (an hour at 30,000 jobs/s
-- is a hundred million rows), paid by every metrics refresh and every
-- GetQueueStats. Now each statement that adds or removes finished jobs
-- adjusts per-queue, per-state counters, through statement-level triggers
-- (one counter update per statement, not per job).
--
-- Counters are spread over 64 slots per queue and state, picked by the
-- writing backend's pid: concurrent statements of different connections
-- seldom touch the same row, so they do not queue behind each other's
-- commit. A count is the sum of its slots.

CREATE TABLE workbroker.finished_counts (
    queue text NOT NULL,
    state smallint NOT NULL,
    slot  smallint NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (queue, state, slot)
);

INSERT INTO workbroker.finished_counts (queue, state, slot, count)
SELECT f.queue, f.state, 0, count(*) FROM workbroker.finished_jobs f GROUP BY f.queue, f.state;

-- Adds `delta` × (rows per queue and state of `changed`) to the counters;
-- rows in (queue, state) order, so concurrent statements cannot deadlock.
CREATE FUNCTION workbroker.count_finished_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO workbroker.finished_counts AS c (queue, state, slot, count)
    SELECT n.queue, n.state, (pg_backend_pid() % 64)::smallint, count(*)
      FROM inserted_rows n GROUP BY n.queue, n.state ORDER BY n.queue, n.state
    ON CONFLICT (queue, state, slot) DO UPDATE SET count = c.count + excluded.count;
    RETURN NULL;
END $$;

CREATE FUNCTION workbroker.count_finished_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO workbroker.finished_counts AS c (queue, state, slot, count)
    SELECT d.queue, d.state, (pg_backend_pid() % 64)::smallint, -count(*)
      FROM deleted_rows d GROUP BY d.queue, d.state ORDER BY d.queue, d.state
    ON CONFLICT (queue, state, slot) DO UPDATE SET count = c.count + excluded.count;
    RETURN NULL;
END $$;

CREATE TRIGGER finished_jobs_count_inserted
    AFTER INSERT ON workbroker.finished_jobs
    REFERENCING NEW TABLE AS inserted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION workbroker.count_finished_inserted();

CREATE TRIGGER finished_jobs_count_deleted
    AFTER DELETE ON workbroker.finished_jobs
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION workbroker.count_finished_deleted();

-- Rows of finished jobs never change state in place (a job leaves the table
-- to change it); refuse it, so the counters cannot silently drift.
CREATE FUNCTION workbroker.refuse_finished_state_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'workbroker: finished_jobs.state and queue do not change in place';
END $$;

CREATE TRIGGER finished_jobs_state_is_final
    BEFORE UPDATE OF state, queue ON workbroker.finished_jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.queue IS DISTINCT FROM NEW.queue)
    EXECUTE FUNCTION workbroker.refuse_finished_state_change();

REVOKE ALL ON FUNCTION workbroker.count_finished_inserted() FROM PUBLIC;
REVOKE ALL ON FUNCTION workbroker.count_finished_deleted() FROM PUBLIC;
REVOKE ALL ON FUNCTION workbroker.refuse_finished_state_change() FROM PUBLIC;
REVOKE ALL ON TABLE workbroker.finished_counts FROM PUBLIC;
