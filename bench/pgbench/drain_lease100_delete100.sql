WITH picked AS (
    SELECT id FROM ceiling_jobs WHERE queue = 'q' AND state = 2
     ORDER BY priority DESC, run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)
UPDATE ceiling_jobs j SET state = 3, lease_token = gen_random_uuid(), leased_by = :client_id
  FROM picked WHERE j.id = picked.id;
DELETE FROM ceiling_jobs WHERE state = 3 AND leased_by = :client_id;
