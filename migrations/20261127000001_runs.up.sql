-- The host's own tables live in their own schema, apart from application and demo tables.
create schema if not exists jobhost;

-- One row per finished run attempt (and, while a run is in flight, per running attempt).
create table jobhost.runs (
    id            bigserial primary key,
    job           text        not null,
    -- The schedule slot the run served; the same instant on every host of a fleet.
    slot          timestamptz not null,
    attempt       integer     not null default 1,
    host_id       text        not null,
    plugin_sha256 text        not null,
    started_at    timestamptz not null,
    finished_at   timestamptz,
    outcome       text        not null
        check (outcome in ('running', 'ok', 'error', 'trap', 'timeout', 'lock_lost')),
    message       text
);

-- The fleet-wide "at most one success per slot" backstop. The runner also checks
-- for a success row under the job's lock before running, so this index is only
-- hit if that check is ever bypassed.
create unique index runs_one_success_per_slot on jobhost.runs (job, slot) where outcome = 'ok';

create index runs_by_job on jobhost.runs (job, started_at desc);
