-- A lean enqueue for plain batches, version 12.
--
-- `enqueue_jobs` serves every batch: ordering keys (the blocked flag, the
-- exclusive barrier, unblocking key heads), dedup keys, hand-offs to waiting
-- streams. Most batches have none of these, bulk enqueues in particular,
-- and paid for them on every row: a wider INSERT, the output numbered by a
-- window over the ids, the settings joined into every row. The broker sends
-- a batch without ordering keys, dedup keys and hand-offs here instead.
-- Same rules otherwise: creates unknown queues, takes their barrier (SHARE)
-- before any sequence, draws ids and sequences in input order; answers one
-- row per job, in id order, which is input order.

CREATE FUNCTION workbroker.enqueue_plain_jobs(
    queues text[], kinds text[], priorities integer[], run_at_us bigint[], delay_us bigint[],
    attempt_limits integer[], lease_us bigint[], payloads bytea[], attribute_texts text[])
RETURNS TABLE (id bigint, sequence bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    names text[] := ARRAY(SELECT DISTINCT q FROM unnest(queues) AS q ORDER BY 1);
    shards integer := (SELECT s.shard_count FROM workbroker.settings s);
BEGIN
    INSERT INTO workbroker.queues (name)
    SELECT n FROM unnest(names) AS n
     WHERE NOT EXISTS (SELECT 1 FROM workbroker.queues q WHERE q.name = n)
    ON CONFLICT (name) DO NOTHING;
    PERFORM workbroker.enqueue_barrier(names, false);
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

REVOKE ALL ON FUNCTION workbroker.enqueue_plain_jobs(text[], text[], integer[], bigint[], bigint[], integer[], bigint[],
                                                    bytea[], text[]) FROM PUBLIC;
