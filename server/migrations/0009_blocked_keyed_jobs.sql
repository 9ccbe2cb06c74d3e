-- Blocked keyed jobs, version 9.
--
-- A job with an ordering key may run only when no earlier unfinished job has
-- its key. The lease statement checked that with one index probe per waiting
-- candidate, so on a queue where most waiting jobs sit behind a few keys
-- every lease that found fewer heads than it wanted walked the whole backlog
-- (50,000 jobs of 1,000 keys: 1 to 2 s per lease statement).
--
-- Now a waiting job that is known not to be its key's head carries
-- `blocked`, and the waiting index leaves it out, so leases never see it:
--
-- * `enqueue_jobs` sets `blocked` on a keyed job when an unfinished job of
--   its key exists or an earlier job of the same call has its key.
-- * Whatever deletes keyed jobs from `jobs` (ack, DEAD, cancel; a trigger,
--   so every path) clears `blocked` on the next job of each key.
-- * `blocked` is a promise one way only: a blocked job is never its key's
--   head, while an unblocked keyed job may or may not be. The lease still
--   checks every keyed candidate as before, so a job left unblocked
--   (redriven jobs, SQL-API jobs of REPEATABLE READ transactions, rows the
--   backfill below did not see) costs a probe, never order.
-- * SQL-API enqueues mark their keyed jobs at commit, when they take their
--   sequences (in READ COMMITTED transactions).
--
-- An enqueue and the finish of the same key's last job can run at once,
-- each seeing the other's row as it was before: the enqueue marks its job
-- blocked because the old head is still there, the finish finds no next job
-- to unblock. Both sides therefore end with `unblock_key_heads`, which takes
-- a per-key lock and only then (in a statement of its own, so with a fresh
-- snapshot) clears `blocked` on each key's first job if it is blocked:
-- whichever of the two runs it second sees the other's commit. A first job
-- that another transaction is deleting still reads as the head, so nothing
-- is cleared for it; that transaction's own trigger clears its successor
-- once the lock is free.
--
-- Waits: the key locks are taken sorted, after the caller's own inserts and
-- deletes. The clearing updates only a blocked first job, and a blocked job
-- is never leased or settled; the one statement that deletes blocked jobs,
-- cancel, takes its job's key lock before it deletes (`Store::job_cancel`),
-- so no holder of a key lock ever waits for a row held by a waiter for that
-- lock. (A hand-written DELETE of a blocked job can still deadlock with a
-- concurrent finish of its key; PostgreSQL then aborts one of the two.)

ALTER TABLE workbroker.jobs ADD COLUMN blocked boolean NOT NULL DEFAULT false;

UPDATE workbroker.jobs j SET blocked = true
 WHERE j.ordering_key IS NOT NULL AND j.state = 2
   AND EXISTS (SELECT 1 FROM workbroker.jobs earlier
                WHERE earlier.queue = j.queue AND earlier.ordering_key = j.ordering_key
                  AND earlier.sequence < j.sequence);

DROP INDEX workbroker.jobs_waiting_idx;
CREATE INDEX jobs_waiting_idx ON workbroker.jobs (queue, priority DESC, run_at, id) WHERE state = 2 AND NOT blocked;

-- Takes the key locks of (queue, key) pairs (pairs with a NULL key are
-- ignored) until the end of the transaction, in increasing order. A key lock
-- is a two-key advisory lock of class 1466385155 (the enqueue barrier's class
-- plus one) on a hash of queue and key; a collision only makes two keys
-- share a lock.
CREATE FUNCTION workbroker.take_key_locks(queues text[], keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1466385155, l.lock)
       FROM (SELECT DISTINCT hashtext(u.queue) # hashtext(u.key) AS lock
               FROM unnest(queues, keys) AS u(queue, key)
              WHERE u.key IS NOT NULL
              ORDER BY 1) l;
END $$;

-- Clears `blocked` on the first unfinished job of each (queue, key) pair
-- given (pairs with a NULL key are ignored), under the keys' locks.
CREATE FUNCTION workbroker.unblock_key_heads(queues text[], keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM workbroker.take_key_locks(queues, keys);
    UPDATE workbroker.jobs j
       SET blocked = false
      FROM (SELECT DISTINCT u.queue, u.key FROM unnest(queues, keys) AS u(queue, key) WHERE u.key IS NOT NULL) k
      CROSS JOIN LATERAL (
          SELECT h.id, h.blocked FROM workbroker.jobs h
           WHERE h.queue = k.queue AND h.ordering_key = k.key
           ORDER BY h.sequence
           LIMIT 1) head
     WHERE j.id = head.id AND head.blocked;
END $$;

CREATE FUNCTION workbroker.unblock_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    queues text[];
    keys text[];
BEGIN
    SELECT array_agg(g.queue), array_agg(g.ordering_key) INTO queues, keys
      FROM gone g WHERE g.ordering_key IS NOT NULL;
    IF keys IS NOT NULL THEN
        PERFORM workbroker.unblock_key_heads(queues, keys);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_unblock_after_delete
    AFTER DELETE ON workbroker.jobs
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION workbroker.unblock_after_delete();

-- `enqueue_jobs` as in version 8, with `blocked` computed for each keyed job
-- and `unblock_key_heads` run for the keys of the call at the end.
CREATE OR REPLACE FUNCTION workbroker.enqueue_jobs(
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
    keyed boolean := EXISTS (SELECT 1 FROM unnest(ordering_keys) AS k WHERE k IS NOT NULL);
    -- By input place: an earlier job of this call has the same queue and key.
    repeated boolean[];
BEGIN
    INSERT INTO workbroker.queues (name)
    SELECT n FROM unnest(names) AS n
     WHERE NOT EXISTS (SELECT 1 FROM workbroker.queues q WHERE q.name = n)
    ON CONFLICT (name) DO NOTHING;
    PERFORM workbroker.enqueue_barrier(names, keyed);
    IF keyed THEN
        repeated := ARRAY(SELECT row_number() OVER (PARTITION BY u.queue, u.key ORDER BY u.place) > 1
                            FROM unnest(queues, ordering_keys) WITH ORDINALITY AS u(queue, key, place)
                           ORDER BY u.place);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM unnest(dedup_keys) AS k WHERE k IS NOT NULL) THEN
        -- No dedup key: every job is inserted, so the rows go straight from
        -- the arrays into the table and the answer comes from RETURNING;
        -- ids are drawn in input order, so their order is the input's.
        RETURN QUERY
        WITH inserted AS (
            INSERT INTO workbroker.jobs AS j (id, queue, kind, state, priority, sequence, run_at, max_attempts,
                                              ordering_key, dedup_key, shard, lease_duration, payload, attributes,
                                              attempt, lease_token, lease_expires_at, leased_by, leased_at, blocked)
            SELECT id, queue, kind, state, priority, sequence, run_at, max_attempts, ordering_key, dedup_key, shard,
                   lease_duration, payload, attributes, attempt, lease_token, lease_expires_at, leased_by, leased_at,
                   blocked
              FROM (SELECT n.id, n.queue, n.kind, CASE WHEN n.lease_token IS NULL THEN 2 ELSE 3 END::smallint AS state,
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
                       n.ordering_key IS NOT NULL AND n.lease_token IS NULL
                           AND (repeated[n.place::integer] OR EXISTS (
                                SELECT 1 FROM workbroker.jobs e
                                 WHERE e.queue = n.queue AND e.ordering_key = n.ordering_key)) AS blocked,
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
                                 ORDER BY u.place) p) n) r
            RETURNING j.id, j.sequence, j.lease_token, j.lease_expires_at, j.max_attempts, j.leased_at)
        SELECT i.id, i.sequence, true, row_number() OVER (ORDER BY i.id), i.lease_token, i.lease_expires_at,
               CASE WHEN i.lease_token IS NOT NULL THEN i.max_attempts END, i.leased_at
          FROM inserted i;
        IF keyed THEN
            PERFORM workbroker.unblock_key_heads(queues, ordering_keys);
        END IF;
        IF notify_suffix IS NOT NULL THEN
            PERFORM pg_notify('workbroker_jobs', n || notify_suffix) FROM unnest(names) AS n;
        END IF;
        RETURN;
    END IF;
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
               n.ordering_key IS NOT NULL AND n.lease_token IS NULL
                   AND (repeated[n.place::integer] OR EXISTS (
                        SELECT 1 FROM workbroker.jobs e
                         WHERE e.queue = n.queue AND e.ordering_key = n.ordering_key)) AS blocked,
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
                                     lease_expires_at, leased_by, leased_at, blocked)
        SELECT id, queue, kind, state, priority, sequence, run_at, max_attempts, ordering_key, dedup_key, shard,
               lease_duration, payload, attributes, attempt, lease_token, lease_expires_at, leased_by, leased_at,
               blocked
          FROM ready WHERE dedup_key IS NULL),
    keyed AS (
        INSERT INTO workbroker.jobs AS j (id, queue, kind, state, priority, sequence, run_at, max_attempts,
                                          ordering_key, dedup_key, shard, lease_duration, payload, attributes,
                                          attempt, lease_token, lease_expires_at, leased_by, leased_at, blocked)
        SELECT id, queue, kind, state, priority, sequence, run_at, max_attempts, ordering_key, dedup_key, shard,
               lease_duration, payload, attributes, attempt, lease_token, lease_expires_at, leased_by, leased_at,
               blocked
          FROM ready WHERE dedup_key IS NOT NULL
        ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
        RETURNING j.id),
    notified AS (SELECT pg_notify('workbroker_jobs', n || notify_suffix) FROM unnest(names) AS n
                  WHERE notify_suffix IS NOT NULL)
    SELECT r.id, r.sequence, r.dedup_key IS NULL OR k.id IS NOT NULL, r.place, r.lease_token, r.lease_expires_at,
           CASE WHEN r.lease_token IS NOT NULL THEN r.max_attempts END, r.leased_at
      FROM ready r LEFT JOIN keyed k ON k.id = r.id
     -- Forces `notified`, which nothing else reads (PostgreSQL skips such a CTE).
     WHERE (SELECT count(*) FROM notified) >= 0;
    IF keyed THEN
        PERFORM workbroker.unblock_key_heads(queues, ordering_keys);
    END IF;
END $$;

-- SQL-API enqueues: as in version 4, and keyed jobs are marked like those of
-- `enqueue_jobs` once they have their sequences; only in READ COMMITTED
-- transactions: the unblocking relies on a snapshot taken after the key
-- locks, which a REPEATABLE READ or SERIALIZABLE transaction does not take
-- (its jobs stay unblocked, which costs the lease a probe each).
CREATE OR REPLACE FUNCTION workbroker.assign_sequences_at_commit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    queues text[];
    keys text[];
    marking boolean := current_setting('transaction_isolation') = 'read committed';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM workbroker.jobs WHERE sequence IS NULL) THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(j.queue), array_agg(j.ordering_key) INTO queues, keys
      FROM workbroker.jobs j WHERE j.sequence IS NULL AND j.ordering_key IS NOT NULL;
    PERFORM workbroker.enqueue_barrier(
        ARRAY(SELECT DISTINCT j.queue FROM workbroker.jobs j WHERE j.sequence IS NULL), keys IS NOT NULL);
    UPDATE workbroker.jobs j
       SET sequence = numbered.sequence,
           blocked = marking AND j.ordering_key IS NOT NULL AND j.state = 2
               AND (numbered.repeated OR EXISTS (
                    SELECT 1 FROM workbroker.jobs e
                     WHERE e.queue = j.queue AND e.ordering_key = j.ordering_key AND e.sequence IS NOT NULL))
      FROM (SELECT p.id, nextval(p.queue_sequence) AS sequence, p.repeated
              FROM (SELECT j.id, q.sequence AS queue_sequence,
                           row_number() OVER (PARTITION BY j.queue, j.ordering_key ORDER BY j.id) > 1 AS repeated
                      FROM workbroker.jobs j JOIN workbroker.queues q ON q.name = j.queue
                     WHERE j.sequence IS NULL
                     ORDER BY j.id) p) numbered
     WHERE j.id = numbered.id;
    IF marking AND keys IS NOT NULL THEN
        PERFORM workbroker.unblock_key_heads(queues, keys);
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION workbroker.take_key_locks(text[], text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION workbroker.unblock_key_heads(text[], text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION workbroker.unblock_after_delete() FROM PUBLIC;
