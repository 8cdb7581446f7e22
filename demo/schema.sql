-- Demo tables for the reference jobs. Created only by `jobhost --demo` and by
-- tests; a production host start never runs this file.
create schema if not exists demo;

-- integrity-hash-retry: audit rows waiting for their content hash.
create table if not exists demo.audit_events (
    id           bigserial primary key,
    actor        text        not null,
    action       text        not null,
    payload      jsonb       not null default '{}',
    created_at   timestamptz not null default now(),
    hash_status  text        not null default 'pending' check (hash_status in ('pending', 'complete')),
    content_hash text,
    hashed_at    timestamptz
);
create index if not exists audit_events_pending on demo.audit_events (id) where hash_status = 'pending';

-- activation-drip: users moving through an activation sequence.
create table if not exists demo.users (
    id              bigserial primary key,
    email           text        not null unique,
    activation_step integer     not null default 0,
    last_step_at    timestamptz,
    created_at      timestamptz not null default now()
);
create table if not exists demo.activation_messages (
    id      bigserial primary key,
    user_id bigint      not null references demo.users (id),
    step    integer     not null,
    sent_at timestamptz not null default now(),
    unique (user_id, step)
);

-- db-retention: five tables whose rows expire.
create table if not exists demo.sessions        (id bigserial primary key, created_at timestamptz not null);
create table if not exists demo.job_logs        (id bigserial primary key, created_at timestamptz not null);
create table if not exists demo.notifications   (id bigserial primary key, created_at timestamptz not null);
create table if not exists demo.password_resets (id bigserial primary key, created_at timestamptz not null);
create table if not exists demo.webhook_events  (id bigserial primary key, created_at timestamptz not null);

-- test-scheduler: capabilities to probe over HTTP, one result row per probe.
create table if not exists demo.capabilities (
    id      bigserial primary key,
    name    text    not null unique,
    url     text    not null,
    enabled boolean not null default true
);
create table if not exists demo.test_results (
    id            bigserial primary key,
    capability_id bigint      not null references demo.capabilities (id),
    ok            boolean     not null,
    status        integer,
    latency_ms    bigint      not null,
    error         text,
    probed_at     timestamptz not null default now()
);

-- Per-job roles for the reference jobs (`role = "..."` in jobs.toml): each
-- job's runs log in as its role, so Postgres itself limits each job to its own
-- tables (LOGIN: with trust authentication no password is needed; otherwise
-- give each one in the password file). Roles are cluster-wide; creating them
-- is idempotent and safe when several databases are set up at once.
do $$
declare
    r text;
begin
    foreach r in array array['jobhost_demo_hash', 'jobhost_demo_drip', 'jobhost_demo_retention', 'jobhost_demo_scheduler'] loop
        begin
            execute format('create role %I login', r);
        exception when duplicate_object or unique_violation then
            null;
        end;
        -- A role made by an earlier version of this file could not log in.
        -- Altered only then: two setups altering the same role at once fail
        -- with "tuple concurrently updated" (roles are shared by every
        -- database, and the tests set several up at once).
        if not exists (select 1 from pg_roles where rolname = r and rolcanlogin) then
            execute format('alter role %I login', r);
        end if;
    end loop;
end $$;
grant usage on schema demo to jobhost_demo_hash, jobhost_demo_drip, jobhost_demo_retention,
    jobhost_demo_scheduler;
grant select, update on demo.audit_events to jobhost_demo_hash;
grant select, update on demo.users to jobhost_demo_drip;
grant select, insert on demo.activation_messages to jobhost_demo_drip;
grant usage on sequence demo.activation_messages_id_seq to jobhost_demo_drip;
grant select, delete on demo.sessions, demo.job_logs, demo.notifications, demo.password_resets,
    demo.webhook_events to jobhost_demo_retention;
grant select on demo.capabilities to jobhost_demo_scheduler;
grant insert on demo.test_results to jobhost_demo_scheduler;
grant usage on sequence demo.test_results_id_seq to jobhost_demo_scheduler;
