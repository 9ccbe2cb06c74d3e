-- Vacuum settings, version 5.
--
-- The hot table turns over its whole content every few seconds under load:
-- every lease leaves a dead row version and every ack a dead row. Autovacuum's
-- defaults (vacuum at 20 % dead rows, throttled) let it bloat; these settings
-- vacuum it after a fixed number of dead rows, unthrottled. (Where autovacuum
-- is off, the broker's leader vacuums by itself; see server/src/vacuum.rs.)
ALTER TABLE workbroker.jobs SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.05
);

-- The finished table only grows by inserts and shrinks by retention pruning.
ALTER TABLE workbroker.finished_jobs SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
