-- workbroker schema, version 1.
--
-- Jobs live in two tables so the hot path stays small:
--   workbroker.jobs           waiting (state 2: SCHEDULED or AVAILABLE, told apart by run_at)
--                             and leased (state 3) jobs: everything not yet terminal;
--   workbroker.finished_jobs  COMPLETED (4), DEAD (5) and CANCELLED (6) jobs.
-- A job moves between them in one statement (DELETE ... RETURNING feeding an INSERT),
-- so it is always in exactly one of them. State numbers equal the JobState enum of
-- proto/workbroker/v1/job.proto.

CREATE SCHEMA IF NOT EXISTS workbroker;

-- Cluster-wide settings stored with the data.
CREATE TABLE workbroker.settings (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    shard_count integer NOT NULL DEFAULT 64 CHECK (shard_count BETWEEN 1 AND 65536)
);
INSERT INTO workbroker.settings DEFAULT VALUES;

-- One row per queue: its settings and its sequence counter. Enqueues lock the
-- row while they take sequence numbers, so sequences of one queue become
-- visible in increasing order (see ARCHITECTURE.md, "the watermark").
CREATE TABLE workbroker.queues (
    name                text PRIMARY KEY,
    last_sequence       bigint NOT NULL DEFAULT 0,
    paused              boolean NOT NULL DEFAULT false,
    max_attempts        integer NOT NULL DEFAULT 25 CHECK (max_attempts BETWEEN 1 AND 1000),
    lease_duration      interval NOT NULL DEFAULT '30 seconds',
    backoff_initial     interval NOT NULL DEFAULT '1 second',
    backoff_max         interval NOT NULL DEFAULT '1 hour',
    backoff_multiplier  double precision NOT NULL DEFAULT 2.0,
    backoff_jitter      double precision NOT NULL DEFAULT 0.2,
    completed_retention interval NOT NULL DEFAULT '1 hour',
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE workbroker.job_ids AS bigint;

CREATE TABLE workbroker.jobs (
    id               bigint PRIMARY KEY,
    queue            text NOT NULL REFERENCES workbroker.queues (name),
    kind             text NOT NULL,
    state            smallint NOT NULL CHECK (state IN (2, 3)),
    priority         integer NOT NULL DEFAULT 0,
    sequence         bigint NOT NULL,
    run_at           timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    ordering_key     text,
    dedup_key        text,
    shard            integer NOT NULL,
    lease_duration   interval,
    lease_token      uuid,
    lease_expires_at timestamptz,
    leased_by        text,
    leased_at        timestamptz,
    last_error       text,
    payload          bytea NOT NULL,
    attributes       jsonb NOT NULL DEFAULT '{}',
    CHECK ((state = 3) = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL))
);

-- What the lease statement reads: waiting jobs of a queue by priority, then run_at.
CREATE INDEX jobs_waiting_idx ON workbroker.jobs (queue, priority DESC, run_at, id) WHERE state = 2;
-- What the reaper reads.
CREATE INDEX jobs_lease_expiry_idx ON workbroker.jobs (lease_expires_at) WHERE state = 3;
-- Ordering keys: is there an earlier unfinished job with my key?
CREATE INDEX jobs_ordering_idx ON workbroker.jobs (queue, ordering_key, sequence) WHERE ordering_key IS NOT NULL;
-- The watermark (lowest unfinished sequence) and listing by queue.
CREATE INDEX jobs_queue_sequence_idx ON workbroker.jobs (queue, sequence);
-- Dedup keys are unique among unfinished jobs, which are exactly the rows here.
CREATE UNIQUE INDEX jobs_dedup_idx ON workbroker.jobs (queue, dedup_key) WHERE dedup_key IS NOT NULL;

CREATE TABLE workbroker.finished_jobs (
    id               bigint PRIMARY KEY,
    queue            text NOT NULL REFERENCES workbroker.queues (name),
    kind             text NOT NULL,
    state            smallint NOT NULL CHECK (state IN (4, 5, 6)),
    priority         integer NOT NULL,
    sequence         bigint NOT NULL,
    run_at           timestamptz NOT NULL,
    created_at       timestamptz NOT NULL,
    attempt          integer NOT NULL,
    max_attempts     integer NOT NULL,
    ordering_key     text,
    dedup_key        text,
    shard            integer NOT NULL,
    lease_duration   interval,
    lease_token      uuid,
    lease_expires_at timestamptz,
    leased_by        text,
    leased_at        timestamptz,
    last_error       text,
    payload          bytea NOT NULL,
    attributes       jsonb NOT NULL,
    finished_at      timestamptz NOT NULL,
    result           bytea
);

CREATE INDEX finished_jobs_queue_state_sequence_idx ON workbroker.finished_jobs (queue, state, sequence);
CREATE INDEX finished_jobs_retention_idx ON workbroker.finished_jobs (finished_at) WHERE state IN (4, 6);

-- Reads that do not care where a job lives. `state` here is the public JobState:
-- a waiting job whose run_at is still ahead reads as SCHEDULED (1).
CREATE VIEW workbroker.all_jobs AS
    SELECT id, queue, kind, CASE WHEN state = 2 AND run_at > now() THEN 1::smallint ELSE state END AS state,
           priority, sequence, run_at, created_at, attempt, max_attempts,
           ordering_key, dedup_key, shard, lease_duration, lease_token, lease_expires_at, leased_by,
           leased_at, last_error, payload, attributes,
           NULL::timestamptz AS finished_at, NULL::bytea AS result
      FROM workbroker.jobs
    UNION ALL
    SELECT id, queue, kind, state, priority, sequence, run_at, created_at, attempt, max_attempts,
           ordering_key, dedup_key, shard, lease_duration, lease_token, lease_expires_at, leased_by,
           leased_at, last_error, payload, attributes, finished_at, result
      FROM workbroker.finished_jobs;

-- The shard of a job: from its ordering key when it has one, else from its id.
CREATE FUNCTION workbroker.shard_of(ordering_key text, job_id bigint, shard_count integer)
RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ((hashtextextended(coalesce(ordering_key, job_id::text), 0) & 2147483647) % shard_count)::integer
$$;

-- Retry delay after a failed attempt, in microseconds: exponential from
-- `initial`, capped at `maximum`, minus a random fraction of at most `jitter`.
CREATE FUNCTION workbroker.backoff_micros(
    attempt integer, initial interval, maximum interval, multiplier double precision, jitter double precision
) RETURNS bigint LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT (least(extract(epoch FROM maximum)::double precision,
                  extract(epoch FROM initial)::double precision
                      * power(multiplier, least(greatest(attempt - 1, 0), 64)::double precision))
            * (1.0 - jitter * random()) * 1e6)::bigint
$$;
