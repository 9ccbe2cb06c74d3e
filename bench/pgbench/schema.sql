-- A job table shaped like workbroker.jobs, for raw SQL ceilings.
CREATE TABLE ceiling_jobs (
    id          bigserial PRIMARY KEY,
    queue       text NOT NULL,
    kind        text NOT NULL,
    state       smallint NOT NULL DEFAULT 2,
    priority    integer NOT NULL DEFAULT 0,
    run_at      timestamptz NOT NULL DEFAULT now(),
    lease_token uuid,
    leased_by   integer,
    payload     bytea NOT NULL DEFAULT '',
    attributes  jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX ceiling_jobs_waiting ON ceiling_jobs (queue, priority DESC, run_at, id) WHERE state = 2;
