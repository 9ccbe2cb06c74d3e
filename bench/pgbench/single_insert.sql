INSERT INTO ceiling_jobs (queue, kind) VALUES ('q', 'k');
