-- The SQL enqueue API, version 1: jobs created inside the application's own
-- transaction. They are invisible to workers until that transaction commits,
-- reach waiting workers right after the commit (pg_notify is delivered at
-- commit), and vanish with a rollback.
--
-- Sequences: a job inserted through this API gets its sequence at COMMIT
-- time, from a deferred constraint trigger that takes the queue's counter row
-- lock only for the instant of the commit. So a transaction held open for
-- minutes neither blocks other enqueues into the queue nor can it make a
-- sequence appear below a completed watermark already published: its jobs
-- are numbered after everything committed before it.

ALTER TABLE workbroker.jobs ALTER COLUMN sequence DROP NOT NULL;

ALTER TABLE workbroker.settings
    ADD COLUMN max_payload_bytes integer NOT NULL DEFAULT 1048576 CHECK (max_payload_bytes > 0);

-- One job to enqueue; every field but queue and kind may be NULL (default).
CREATE TYPE workbroker.new_job_v1 AS (
    queue          text,
    kind           text,
    payload        bytea,
    attributes     jsonb,
    priority       integer,
    run_at         timestamptz,
    delay          interval,
    max_attempts   integer,
    ordering_key   text,
    dedup_key      text,
    lease_duration interval
);

-- Raises invalid_parameter_value naming the field, like INVALID_ARGUMENT on the wire.
CREATE FUNCTION workbroker.reject_v1(field text, reason text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'workbroker: %: %', field, reason
        USING ERRCODE = 'invalid_parameter_value', COLUMN = field;
END $$;

CREATE FUNCTION workbroker.check_new_job_v1(job workbroker.new_job_v1, prefix text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    limit_bytes integer;
    attribute record;
BEGIN
    IF job.queue IS NULL OR job.queue !~ '^[A-Za-z0-9._:-]{1,128}$' THEN
        PERFORM workbroker.reject_v1(prefix || 'queue', 'must be 1 to 128 characters of [A-Za-z0-9._:-]');
    END IF;
    IF job.kind IS NULL OR job.kind !~ '^[A-Za-z0-9._:-]{1,128}$' THEN
        PERFORM workbroker.reject_v1(prefix || 'kind', 'must be 1 to 128 characters of [A-Za-z0-9._:-]');
    END IF;
    SELECT s.max_payload_bytes INTO limit_bytes FROM workbroker.settings s;
    IF octet_length(coalesce(job.payload, ''::bytea)) > limit_bytes THEN
        PERFORM workbroker.reject_v1(prefix || 'payload', format('is %s bytes; the limit is %s', octet_length(job.payload), limit_bytes));
    END IF;
    IF job.attributes IS NOT NULL THEN
        IF jsonb_typeof(job.attributes) <> 'object' THEN
            PERFORM workbroker.reject_v1(prefix || 'attributes', 'must be a JSON object of strings');
        END IF;
        IF (SELECT count(*) FROM jsonb_object_keys(job.attributes)) > 64 THEN
            PERFORM workbroker.reject_v1(prefix || 'attributes', 'must have at most 64 entries');
        END IF;
        FOR attribute IN SELECT key, value FROM jsonb_each(job.attributes) LOOP
            IF jsonb_typeof(attribute.value) <> 'string' THEN
                PERFORM workbroker.reject_v1(prefix || 'attributes', format('value of %s must be a string', attribute.key));
            END IF;
            IF octet_length(attribute.key) NOT BETWEEN 1 AND 256 THEN
                PERFORM workbroker.reject_v1(prefix || 'attributes', 'keys must be 1 to 256 bytes');
            END IF;
        END LOOP;
        IF octet_length(job.attributes::text) > 32768 THEN
            PERFORM workbroker.reject_v1(prefix || 'attributes', 'keys and values must total at most 16 KiB');
        END IF;
    END IF;
    IF job.run_at IS NOT NULL AND job.delay IS NOT NULL THEN
        PERFORM workbroker.reject_v1(prefix || 'run_at', 'and delay are mutually exclusive');
    END IF;
    IF job.delay IS NOT NULL AND (job.delay < interval '0' OR job.delay > interval '365 days') THEN
        PERFORM workbroker.reject_v1(prefix || 'delay', 'must be between 0 and 365 days');
    END IF;
    IF job.max_attempts IS NOT NULL AND job.max_attempts NOT BETWEEN 1 AND 1000 THEN
        PERFORM workbroker.reject_v1(prefix || 'max_attempts', 'must be 1 to 1000 (NULL: queue default)');
    END IF;
    IF octet_length(coalesce(job.ordering_key, '')) > 256 THEN
        PERFORM workbroker.reject_v1(prefix || 'ordering_key', 'must be at most 256 bytes');
    END IF;
    IF octet_length(coalesce(job.dedup_key, '')) > 256 THEN
        PERFORM workbroker.reject_v1(prefix || 'dedup_key', 'must be at most 256 bytes');
    END IF;
    IF job.lease_duration IS NOT NULL AND job.lease_duration NOT BETWEEN interval '1 second' AND interval '24 hours' THEN
        PERFORM workbroker.reject_v1(prefix || 'lease_duration', 'must be between 1 second and 24 hours');
    END IF;
END $$;

-- At commit: number every job this transaction inserted without a sequence
-- (only this transaction's own rows can be visible with a NULL sequence: every
-- committed job has one). The first firing numbers them all, queue rows locked
-- in name order; later firings find nothing left.
CREATE FUNCTION workbroker.assign_sequences_at_commit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM workbroker.jobs WHERE sequence IS NULL) THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM workbroker.queues q
     WHERE q.name IN (SELECT DISTINCT j.queue FROM workbroker.jobs j WHERE j.sequence IS NULL)
     ORDER BY q.name
       FOR NO KEY UPDATE;
    WITH pending AS (
        SELECT j.id, j.queue,
               row_number() OVER (PARTITION BY j.queue ORDER BY j.id) AS position,
               count(*) OVER (PARTITION BY j.queue) AS pending_count
          FROM workbroker.jobs j WHERE j.sequence IS NULL),
    counters AS (
        UPDATE workbroker.queues q
           SET last_sequence = q.last_sequence + c.pending_count
          FROM (SELECT DISTINCT queue, pending_count FROM pending) c
         WHERE q.name = c.queue
        RETURNING q.name, q.last_sequence - c.pending_count AS base)
    UPDATE workbroker.jobs j
       SET sequence = c.base + p.position
      FROM pending p JOIN counters c ON c.name = p.queue
     WHERE j.id = p.id;
    RETURN NULL;
END $$;

CREATE INDEX jobs_unsequenced_idx ON workbroker.jobs (id) WHERE sequence IS NULL;

CREATE CONSTRAINT TRIGGER jobs_assign_sequence_at_commit
    AFTER INSERT ON workbroker.jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.sequence IS NULL)
    EXECUTE FUNCTION workbroker.assign_sequences_at_commit();

-- Enqueues 1 to 1000 jobs inside the caller's transaction, all or nothing.
-- Returns, in input order, each job's id as the gRPC API shows it and whether
-- an unfinished job with the same queue and dedup key was returned instead.
CREATE FUNCTION workbroker.enqueue_batch_v1(jobs workbroker.new_job_v1[])
RETURNS TABLE (job_id text, deduplicated boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    job workbroker.new_job_v1;
    position integer := 0;
    new_id bigint;
    inserted_id bigint;
    shards integer;
BEGIN
    IF jobs IS NULL OR cardinality(jobs) NOT BETWEEN 1 AND 1000 THEN
        PERFORM workbroker.reject_v1('jobs', 'must have 1 to 1000 jobs');
    END IF;
    FOREACH job IN ARRAY jobs LOOP
        PERFORM workbroker.check_new_job_v1(job, format('jobs[%s].', position));
        position := position + 1;
    END LOOP;
    INSERT INTO workbroker.queues (name)
    SELECT DISTINCT j.queue FROM unnest(jobs) AS j ORDER BY 1
    ON CONFLICT (name) DO NOTHING;
    SELECT s.shard_count INTO shards FROM workbroker.settings s;
    FOREACH job IN ARRAY jobs LOOP
        new_id := nextval('workbroker.job_ids');
        inserted_id := NULL;
        INSERT INTO workbroker.jobs AS j (id, queue, kind, state, priority, sequence, run_at, max_attempts,
                                          ordering_key, dedup_key, shard, lease_duration, payload, attributes)
        SELECT new_id, job.queue, job.kind, 2, coalesce(job.priority, 0), NULL,
               coalesce(job.run_at, now() + coalesce(job.delay, interval '0')),
               coalesce(job.max_attempts, q.max_attempts), nullif(job.ordering_key, ''), nullif(job.dedup_key, ''),
               workbroker.shard_of(nullif(job.ordering_key, ''), new_id, shards),
               job.lease_duration, coalesce(job.payload, ''::bytea), coalesce(job.attributes, '{}'::jsonb)
          FROM workbroker.queues q WHERE q.name = job.queue
        ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
        RETURNING j.id INTO inserted_id;
        IF inserted_id IS NULL THEN
            SELECT j.id INTO inserted_id FROM workbroker.jobs j
             WHERE j.queue = job.queue AND j.dedup_key = nullif(job.dedup_key, '');
            job_id := inserted_id::text;
            deduplicated := true;
        ELSE
            job_id := inserted_id::text;
            deduplicated := false;
        END IF;
        RETURN NEXT;
    END LOOP;
    PERFORM pg_notify('workbroker_jobs', q.queue)
       FROM (SELECT DISTINCT j.queue FROM unnest(jobs) AS j) q;
END $$;

-- Enqueues one job inside the caller's transaction; returns its id.
CREATE FUNCTION workbroker.enqueue_v1(
    queue          text,
    kind           text,
    payload        bytea       DEFAULT NULL,
    attributes     jsonb       DEFAULT NULL,
    priority       integer     DEFAULT NULL,
    run_at         timestamptz DEFAULT NULL,
    delay          interval    DEFAULT NULL,
    max_attempts   integer     DEFAULT NULL,
    ordering_key   text        DEFAULT NULL,
    dedup_key      text        DEFAULT NULL,
    lease_duration interval    DEFAULT NULL
) RETURNS text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT e.job_id FROM workbroker.enqueue_batch_v1(ARRAY[ROW(
        queue, kind, payload, attributes, priority, run_at, delay, max_attempts,
        ordering_key, dedup_key, lease_duration)::workbroker.new_job_v1]) AS e
$$;

-- Least privilege: functions are not callable by PUBLIC; the role
-- workbroker_enqueuer may call the enqueue functions and nothing else.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA workbroker FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA workbroker FROM PUBLIC;
REVOKE ALL ON SCHEMA workbroker FROM PUBLIC;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'workbroker_enqueuer') THEN
        BEGIN
            CREATE ROLE workbroker_enqueuer NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'cannot create role workbroker_enqueuer: create it, then run migrate again to grant it';
        END;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'workbroker_enqueuer') THEN
        GRANT USAGE ON SCHEMA workbroker TO workbroker_enqueuer;
        GRANT USAGE ON TYPE workbroker.new_job_v1 TO workbroker_enqueuer;
        GRANT EXECUTE ON FUNCTION workbroker.enqueue_v1(text, text, bytea, jsonb, integer, timestamptz, interval,
                                                       integer, text, text, interval) TO workbroker_enqueuer;
        GRANT EXECUTE ON FUNCTION workbroker.enqueue_batch_v1(workbroker.new_job_v1[]) TO workbroker_enqueuer;
    END IF;
END $$;
