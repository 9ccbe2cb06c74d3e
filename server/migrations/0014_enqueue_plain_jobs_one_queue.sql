-- The lean enqueue of a batch of one queue, version 14.
--
-- `enqueue_plain_jobs` (migration 0012) joined every job of a batch with its
-- queue's row, for the queue's sequence and attempt limit, sorted the rows
-- back into input order and collected the batch's distinct queue names with
-- a sort. A bulk enqueue names one queue: its row is now read once, and the
-- jobs are numbered straight from the unnested arrays. Batches of several
-- queues go the way they went. Same arguments, answers and rules (creates
-- unknown queues, takes their barrier before any sequence, draws ids and
-- sequences in input order, answers in id order); brokers of either version
-- call it alike.
--
-- The backend's CPU time per 1,000-job call (one connection, a prepared
-- statement, generic plans, read from /proc): 4.3 to 4.6 ms before, 3.9 to
-- 4.5 ms after.

CREATE OR REPLACE FUNCTION workbroker.enqueue_plain_jobs(
    queues text[], kinds text[], priorities integer[], run_at_us bigint[], delay_us bigint[],
    attempt_limits integer[], lease_us bigint[], payloads bytea[], attribute_texts text[])
RETURNS TABLE (id bigint, sequence bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    one_queue boolean := cardinality(queues) > 0 AND queues[1] = ALL (queues);
    names text[] := CASE WHEN one_queue THEN ARRAY[queues[1]]
                         ELSE ARRAY(SELECT DISTINCT q FROM unnest(queues) AS q ORDER BY 1) END;
    shards integer := (SELECT s.shard_count FROM workbroker.settings s);
    queue_sequence regclass;
    queue_max_attempts integer;
BEGIN
    INSERT INTO workbroker.queues (name)
    SELECT n FROM unnest(names) AS n
     WHERE NOT EXISTS (SELECT 1 FROM workbroker.queues q WHERE q.name = n)
    ON CONFLICT (name) DO NOTHING;
    PERFORM workbroker.enqueue_barrier(names, false);
    IF one_queue THEN
        SELECT q.sequence, q.max_attempts INTO queue_sequence, queue_max_attempts
          FROM workbroker.queues q WHERE q.name = names[1];
        RETURN QUERY
        INSERT INTO workbroker.jobs AS j (id, queue, kind, state, priority, sequence, run_at, max_attempts, shard,
                                          lease_duration, payload, attributes)
        SELECT n.id, n.queue, n.kind, 2, coalesce(n.priority, 0), n.sequence,
               coalesce(timestamptz 'epoch' + n.run_at_us * interval '1 microsecond',
                        now() + coalesce(n.delay_us, 0) * interval '1 microsecond'),
               coalesce(n.attempt_limit, queue_max_attempts),
               workbroker.shard_of(NULL, n.id, shards),
               n.lease_us * interval '1 microsecond',
               coalesce(n.payload, ''::bytea), coalesce(n.attributes::jsonb, '{}'::jsonb)
          FROM (SELECT nextval('workbroker.job_ids') AS id, nextval(queue_sequence) AS sequence, u.*
                  FROM unnest(queues, kinds, priorities, run_at_us, delay_us, attempt_limits, lease_us, payloads,
                              attribute_texts)
                       WITH ORDINALITY AS u(queue, kind, priority, run_at_us, delay_us, attempt_limit, lease_us,
                                            payload, attributes, place)
                 ORDER BY u.place) n
        RETURNING j.id, j.sequence;
        RETURN;
    END IF;
    RETURN QUERY
    INSERT INTO workbroker.jobs AS j (id, queue, kind, state, priority, sequence, run_at, max_attempts, shard,
                                      lease_duration, payload, attributes)
    SELECT n.id, n.queue, n.kind, 2, coalesce(n.priority, 0), n.sequence,
           coalesce(timestamptz 'epoch' + n.run_at_us * interval '1 microsecond',
                    now() + coalesce(n.delay_us, 0) * interval '1 microsecond'),
           coalesce(n.attempt_limit, n.queue_max_attempts),
           workbroker.shard_of(NULL, n.id, shards),
           n.lease_us * interval '1 microsecond',
           coalesce(n.payload, ''::bytea), coalesce(n.attributes::jsonb, '{}'::jsonb)
      FROM (SELECT nextval('workbroker.job_ids') AS id, nextval(p.queue_sequence) AS sequence, p.*
              FROM (SELECT u.*, q.sequence AS queue_sequence, q.max_attempts AS queue_max_attempts
                      FROM unnest(queues, kinds, priorities, run_at_us, delay_us, attempt_limits, lease_us, payloads,
                                  attribute_texts)
                           WITH ORDINALITY AS u(queue, kind, priority, run_at_us, delay_us, attempt_limit, lease_us,
                                                payload, attributes, place)
                      JOIN (SELECT * FROM workbroker.queues WHERE name = ANY(names)) q ON q.name = u.queue
                     ORDER BY u.place) p) n
    RETURNING j.id, j.sequence;
END $$;
