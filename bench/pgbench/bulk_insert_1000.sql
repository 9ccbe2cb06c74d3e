INSERT INTO ceiling_jobs (queue, kind) SELECT 'q', 'k' FROM generate_series(1, 1000);
