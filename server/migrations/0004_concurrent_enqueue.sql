-- Concurrent enqueues, version 4.
--
-- Until now every enqueue into a queue updated the queue row's counter and
-- held that row lock until its commit, so enqueues into one queue ran one
-- at a time, whichever replica took them. Now:
--
-- 1. Each queue numbers its jobs from a sequence object of its own
--    (`workbroker.queue_sequence_<id>`, CACHE 1, named in `queues.sequence`),
--    created with the queue by a trigger. nextval takes no lock that lasts.
-- 2. The watermark stays exact through an enqueue barrier of advisory locks:
--    whatever takes a queue's sequences (an enqueue, the commit of a SQL-API
--    enqueue, a redrive) holds the queue's stripe lock in SHARE mode from
--    before it takes them until its commit; reading the watermark takes the
--    stripe lock EXCLUSIVE for the instant of two statements. Under it no
--    sequence is in flight, so every sequence up to the sequence's last value
--    is either committed or abandoned (a harmless gap). Many enqueues share
--    the lock at once; only watermark reads wait for them, and new enqueues
--    wait for such a read. See ARCHITECTURE.md, "the watermark".
-- 3. Jobs with an ordering key still become visible in sequence order, as
--    before: whatever takes sequences for such a job takes the barrier
--    EXCLUSIVE. The lease statement's rule (a keyed job is leasable when no
--    unfinished job of its key has a smaller sequence) is only safe if a
--    job never becomes visible after a later job of its key.
--
-- Stripe locks are two-key advisory locks (class 1466385154, "WBRK" read as
-- int4; stripe 0..15 from a hash of the queue name), so they never collide
-- with an application's one-key advisory locks.

ALTER TABLE workbroker.queues ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY UNIQUE;
ALTER TABLE workbroker.queues ADD COLUMN sequence regclass;

-- The stripe (0..15) of a queue's enqueue barrier.
CREATE FUNCTION workbroker.queue_stripe(queue text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtext(queue) & 15
$$;

-- Takes the enqueue barrier of these queues: SHARE to take sequences,
-- EXCLUSIVE to read watermarks. Stripes in increasing order (the sorted
-- subquery is evaluated before the locks of the outer projection), so takers
-- of either mode cannot deadlock one another.
CREATE FUNCTION workbroker.enqueue_barrier(queues text[], exclusive boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF exclusive THEN
        PERFORM pg_advisory_xact_lock(1466385154, s.stripe)
           FROM (SELECT DISTINCT workbroker.queue_stripe(q) AS stripe FROM unnest(queues) AS q ORDER BY 1) s;
    ELSE
        PERFORM pg_advisory_xact_lock_shared(1466385154, s.stripe)
           FROM (SELECT DISTINCT workbroker.queue_stripe(q) AS stripe FROM unnest(queues) AS q ORDER BY 1) s;
    END IF;
END $$;

-- A new queue gets its sequence in the transaction that creates it (every
-- path creates queues with INSERT ... ON CONFLICT, so this runs once per
-- queue). Security definer: creating the sequence needs CREATE on the schema,
-- which the roles that merely create queues need not have.
CREATE FUNCTION workbroker.create_queue_sequence() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sequence_name text := format('workbroker.%I', 'queue_sequence_' || NEW.id);
BEGIN
    EXECUTE format('CREATE SEQUENCE %s AS bigint MINVALUE 1 CACHE 1', sequence_name);
    UPDATE workbroker.queues q SET sequence = sequence_name::regclass WHERE q.id = NEW.id;
    RETURN NULL;
END $$;

CREATE TRIGGER queues_create_sequence
    AFTER INSERT ON workbroker.queues
    FOR EACH ROW EXECUTE FUNCTION workbroker.create_queue_sequence();

-- Existing queues continue their numbering where the counter left it.
DO $$
DECLARE
    queue record;
    sequence_name text;
BEGIN
    FOR queue IN SELECT q.id, q.name, q.last_sequence FROM workbroker.queues q ORDER BY q.id LOOP
        sequence_name := format('workbroker.%I', 'queue_sequence_' || queue.id);
        EXECUTE format('CREATE SEQUENCE %s AS bigint MINVALUE 1 CACHE 1', sequence_name);
        IF queue.last_sequence > 0 THEN
            PERFORM setval(sequence_name::regclass, queue.last_sequence);
        END IF;
        UPDATE workbroker.queues q SET sequence = sequence_name::regclass WHERE q.id = queue.id;
    END LOOP;
END $$;

ALTER TABLE workbroker.queues DROP COLUMN last_sequence;

-- The last sequence a queue handed out (0 before its first). Exact while the
-- caller holds the queue's barrier EXCLUSIVE.
CREATE FUNCTION workbroker.queue_last_sequence(queue_sequence regclass) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(pg_sequence_last_value(queue_sequence), 0)
$$;

-- SQL-API enqueues: at commit, number every job this transaction inserted
-- without a sequence (only this transaction's own rows can be visible with a
-- NULL sequence: every committed job has one), in id order per queue, under
-- the barrier. The first firing numbers them all; later firings find nothing.
CREATE OR REPLACE FUNCTION workbroker.assign_sequences_at_commit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM workbroker.jobs WHERE sequence IS NULL) THEN
        RETURN NULL;
    END IF;
    PERFORM workbroker.enqueue_barrier(
        ARRAY(SELECT DISTINCT j.queue FROM workbroker.jobs j WHERE j.sequence IS NULL),
        EXISTS (SELECT 1 FROM workbroker.jobs j WHERE j.sequence IS NULL AND j.ordering_key IS NOT NULL));
    UPDATE workbroker.jobs j
       SET sequence = numbered.sequence
      FROM (SELECT p.id, nextval(p.queue_sequence) AS sequence
              FROM (SELECT j.id, q.sequence AS queue_sequence
                      FROM workbroker.jobs j JOIN workbroker.queues q ON q.name = j.queue
                     WHERE j.sequence IS NULL
                     ORDER BY j.id) p) numbered
     WHERE j.id = numbered.id;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION workbroker.queue_stripe(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION workbroker.enqueue_barrier(text[], boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION workbroker.create_queue_sequence() FROM PUBLIC;
REVOKE ALL ON FUNCTION workbroker.queue_last_sequence(regclass) FROM PUBLIC;

-- The broker's enqueue: inserts one batch (one array element per job; an
-- array whose every element is the default may be NULL, since unnest pads
-- it), all in the caller's transaction:
-- - creates unknown queues, then takes their barrier before any sequence
--   (SHARE; EXCLUSIVE when a job has an ordering key), and numbers the jobs
--   in input order (ids and sequences);
-- - inserts a job with a hand-off worker as already LEASED to it, with a
--   fresh token, unless its queue is paused;
-- - skips a job whose dedup key an unfinished job of its queue holds
--   (`inserted` false);
-- - notifies each queue once, the name followed by `notify_suffix`.
-- Answers one row per job; the lease columns are NULL unless handed off.
CREATE FUNCTION workbroker.enqueue_jobs(
    queues text[], kinds text[], priorities integer[], run_at_us bigint[], delay_us bigint[],
    attempt_limits integer[], ordering_keys text[], dedup_keys text[], lease_us bigint[],
    payloads bytea[], attribute_texts text[], handoff_workers text[], handoff_lease_us bigint[],
    notify_suffix text)
RETURNS TABLE (id bigint, sequence bigint, inserted boolean, place bigint, lease_token uuid,
               lease_expires_at timestamptz, max_attempts integer, leased_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    names text[] := ARRAY(SELECT DISTINCT q FROM unnest(queues) AS q ORDER BY 1);
BEGIN
    INSERT INTO workbroker.queues (name)
    SELECT n FROM unnest(names) AS n
     WHERE NOT EXISTS (SELECT 1 FROM workbroker.queues q WHERE q.name = n)
    ON CONFLICT (name) DO NOTHING;
    PERFORM workbroker.enqueue_barrier(names, EXISTS (SELECT 1 FROM unnest(ordering_keys) AS k WHERE k IS NOT NULL));
    RETURN QUERY
    WITH ready AS (
        SELECT n.id, n.queue, n.kind, CASE WHEN n.lease_token IS NULL THEN 2 ELSE 3 END::smallint AS state,
               coalesce(n.priority, 0) AS priority, n.sequence,
               coalesce(timestamptz 'epoch' + n.run_at_us * interval '1 microsecond',
                        now() + coalesce(n.delay_us, 0) * interval '1 microsecond') AS run_at,
               coalesce(n.attempt_limit, n.queue_max_attempts) AS max_attempts,
               n.ordering_key, n.dedup_key, workbroker.shard_of(n.ordering_key, n.id, n.shard_count) AS shard,
               n.lease_us * interval '1 microsecond' AS lease_duration,
               coalesce(n.payload, ''::bytea) AS payload, coalesce(n.attributes::jsonb, '{}'::jsonb) AS attributes,
               CASE WHEN n.lease_token IS NULL THEN 0 ELSE 1 END AS attempt, n.lease_token,
               CASE WHEN n.lease_token IS NOT NULL THEN now() + coalesce(
                   n.handoff_lease_us * interval '1 microsecond', n.lease_us * interval '1 microsecond',
                   n.queue_lease_duration) END AS lease_expires_at,
               CASE WHEN n.lease_token IS NOT NULL THEN n.handoff_worker END AS leased_by,
               CASE WHEN n.lease_token IS NOT NULL THEN now() END AS leased_at,
               n.place
          FROM (SELECT nextval('workbroker.job_ids') AS id, nextval(p.queue_sequence) AS sequence,
                       CASE WHEN p.handoff_worker IS NOT NULL AND NOT p.paused THEN gen_random_uuid() END
                           AS lease_token,
                       p.*
                  FROM (SELECT u.*, q.sequence AS queue_sequence, q.paused, q.max_attempts AS queue_max_attempts,
                               q.lease_duration AS queue_lease_duration, s.shard_count
                          FROM unnest(queues, kinds, priorities, run_at_us, delay_us, attempt_limits,
                                      ordering_keys, dedup_keys, lease_us, payloads, attribute_texts,
                                      handoff_workers, handoff_lease_us)
                               WITH ORDINALITY AS u(queue, kind, priority, run_at_us, delay_us, attempt_limit,
                                                    ordering_key, dedup_key, lease_us, payload, attributes,
                                                    handoff_worker, handoff_lease_us, place)
                          JOIN (SELECT * FROM workbroker.queues WHERE name = ANY(names)) q ON q.name = u.queue
                          CROSS JOIN workbroker.settings s
                         ORDER BY u.place) p) n),
    plain AS (
        INSERT INTO workbroker.jobs (id, queue, kind, state, priority, sequence, run_at, max_attempts, ordering_key,
                                     dedup_key, shard, lease_duration, payload, attributes, attempt, lease_token,
                                     lease_expires_at, leased_by, leased_at)
        SELECT id, queue, kind, state, priority, sequence, run_at, max_attempts, ordering_key, dedup_key, shard,
               lease_duration, payload, attributes, attempt, lease_token, lease_expires_at, leased_by, leased_at
          FROM ready WHERE dedup_key IS NULL),
    keyed AS (
        INSERT INTO workbroker.jobs AS j (id, queue, kind, state, priority, sequence, run_at, max_attempts,
                                          ordering_key, dedup_key, shard, lease_duration, payload, attributes,
                                          attempt, lease_token, lease_expires_at, leased_by, leased_at)
        SELECT id, queue, kind, state, priority, sequence, run_at, max_attempts, ordering_key, dedup_key, shard,
               lease_duration, payload, attributes, attempt, lease_token, lease_expires_at, leased_by, leased_at
          FROM ready WHERE dedup_key IS NOT NULL
        ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
        RETURNING j.id),
    notified AS (SELECT pg_notify('workbroker_jobs', n || notify_suffix) FROM unnest(names) AS n)
    SELECT r.id, r.sequence, r.dedup_key IS NULL OR k.id IS NOT NULL, r.place, r.lease_token, r.lease_expires_at,
           CASE WHEN r.lease_token IS NOT NULL THEN r.max_attempts END, r.leased_at
      FROM ready r LEFT JOIN keyed k ON k.id = r.id
     -- Forces `notified`, which nothing else reads (PostgreSQL skips such a CTE).
     WHERE (SELECT count(*) FROM notified) >= 0;
END $$;

REVOKE ALL ON FUNCTION workbroker.enqueue_jobs(text[], text[], integer[], bigint[], bigint[], integer[], text[],
                                               text[], bigint[], bytea[], text[], text[], bigint[], text) FROM PUBLIC;
