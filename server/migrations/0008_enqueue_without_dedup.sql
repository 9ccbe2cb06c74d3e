-- Enqueue without dedup keys, version 8.
--
-- `enqueue_jobs` gathered every batch into a materialized set of ready rows,
-- inserted it in two statements (with and without a dedup key) and joined
-- the keyed insert back for its answer. A batch without dedup keys (the
-- broker's common case: bulk enqueues, single enqueues grouped into one
-- statement) now inserts straight from its arrays and answers from
-- RETURNING. Same signature and answer; a batch with dedup keys takes the
-- path of version 7.
--
-- The two branches each spell out how a job's row is computed: sharing it
-- through a set-returning function would materialize the rows again (a
-- volatile SQL function is not inlined), which is the cost this removes.

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
BEGIN
    INSERT INTO workbroker.queues (name)
    SELECT n FROM unnest(names) AS n
     WHERE NOT EXISTS (SELECT 1 FROM workbroker.queues q WHERE q.name = n)
    ON CONFLICT (name) DO NOTHING;
    PERFORM workbroker.enqueue_barrier(names, EXISTS (SELECT 1 FROM unnest(ordering_keys) AS k WHERE k IS NOT NULL));
    IF NOT EXISTS (SELECT 1 FROM unnest(dedup_keys) AS k WHERE k IS NOT NULL) THEN
        -- No dedup key: every job is inserted, so the rows go straight from
        -- the arrays into the table and the answer comes from RETURNING;
        -- ids are drawn in input order, so their order is the input's.
        RETURN QUERY
        WITH inserted AS (
            INSERT INTO workbroker.jobs AS j (id, queue, kind, state, priority, sequence, run_at, max_attempts,
                                              ordering_key, dedup_key, shard, lease_duration, payload, attributes,
                                              attempt, lease_token, lease_expires_at, leased_by, leased_at)
            SELECT id, queue, kind, state, priority, sequence, run_at, max_attempts, ordering_key, dedup_key, shard,
                   lease_duration, payload, attributes, attempt, lease_token, lease_expires_at, leased_by, leased_at
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
    notified AS (SELECT pg_notify('workbroker_jobs', n || notify_suffix) FROM unnest(names) AS n
                  WHERE notify_suffix IS NOT NULL)
    SELECT r.id, r.sequence, r.dedup_key IS NULL OR k.id IS NOT NULL, r.place, r.lease_token, r.lease_expires_at,
           CASE WHEN r.lease_token IS NOT NULL THEN r.max_attempts END, r.leased_at
      FROM ready r LEFT JOIN keyed k ON k.id = r.id
     -- Forces `notified`, which nothing else reads (PostgreSQL skips such a CTE).
     WHERE (SELECT count(*) FROM notified) >= 0;
END $$;
