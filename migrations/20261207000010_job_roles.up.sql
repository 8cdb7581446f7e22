-- A job with a `role` runs on a connection that logs in as that role
-- (DESIGN §7): `RESET ROLE` inside the run then goes back to the job's role,
-- never to the host's. The host's bookkeeping in the run's transaction (the
-- gate, the run's row) cannot use the job role's rights, so it goes through
-- the two SECURITY DEFINER functions below, which act for a job only when
-- the session's login role is one the host admitted for that job, or the
-- host itself.

-- Which login roles may run which job: written by the host at start and at
-- each reload (`roles::admit`) for the roles its jobs.toml names. A row is
-- never replaced by a reload (a reload that is then rejected must not take
-- the running role's right away); a role that no longer runs the job keeps
-- its row until an operator deletes it.
create table jobhost.job_roles (
    job         text        not null,
    role        name        not null,
    admitted_at timestamptz not null default now(),
    primary key (job, role)
);

-- The key of the runs' tokens: 32 bytes from `gen_random_uuid()` (the
-- server's strong random source), readable only by the schema's owner.
create table jobhost.run_secret (secret bytea not null);
insert into jobhost.run_secret
select pg_catalog.uuid_send(pg_catalog.gen_random_uuid()) || pg_catalog.uuid_send(pg_catalog.gen_random_uuid());

-- Refuses (JH003) a session whose login role may not `act` for `job`: one
-- that is neither the host (the owner, or a role that may write the runs
-- table itself) nor a role admitted for the job. `session_user`, not `current_user`: called inside the SECURITY
-- DEFINER functions below, the current user is the owner, and a job's code
-- cannot change its session user. Internal (no EXECUTE for PUBLIC), without
-- a SET clause, and PL/pgSQL rather than SQL: a SQL function called from
-- PL/pgSQL is planned again at every call, while PL/pgSQL keeps its plans
-- per session (pgbench, 10 clients, gate and row of a run as a job role
-- against the host's own: 0.68–0.70× with SQL helpers, 0.82–0.89× with
-- these).
create function jobhost.assert_may_act_for(job text, act text) returns void
language plpgsql
stable
as $$
begin
    if not (session_user = current_user
            or exists (select 1 from jobhost.job_roles r
                        where r.job = assert_may_act_for.job and r.role = session_user)
            or pg_catalog.has_table_privilege(session_user, 'jobhost.runs', 'INSERT')) then
        raise exception using errcode = 'JH003',
            message = format('role %I may not %s job %L: it is not the role jobs.toml names for that job',
                             session_user, assert_may_act_for.act, assert_may_act_for.job);
    end if;
end
$$;
revoke execute on function jobhost.assert_may_act_for(text, text) from public;

-- A run's token: what proves that a run's row is written for a run its gate
-- let through. A keyed hash of the run's id and job; the key never leaves
-- the database, so a job's own code cannot make one (it could only reach
-- the gate again, for its own job, under its own lock and history rules).
-- Internal, like `assert_may_act_for`.
create function jobhost.run_token(id bigint, job text) returns text
language plpgsql
stable
as $$
begin
    return pg_catalog.encode(pg_catalog.sha256(
        (select s.secret from jobhost.run_secret s) || pg_catalog.int8send(run_token.id)
        || pg_catalog.convert_to(run_token.job, 'UTF8')), 'hex');
end
$$;
revoke execute on function jobhost.run_token(bigint, text) from public;

-- The gate of a run of a job with a role, whose connection logs in as that
-- role: `slot_gate` (migration ..._in_flight) run with the owner's rights,
-- for a caller that may act for the job, and the run's token with the run's
-- id. (The host's own login calls `slot_gate` and writes `runs` directly:
-- a job without a role pays nothing for this.)
create function jobhost.run_gate(job text, slot timestamptz, host text, lost_after float8,
                                 ns integer, key integer,
                                 out locked boolean, out db_now timestamptz,
                                 out lost bigint, out succeeded boolean,
                                 out attempts integer, out failures integer,
                                 out last_failure timestamptz, out paused boolean,
                                 out run_id bigint, out backend_pid integer,
                                 out run_token text)
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform jobhost.assert_may_act_for(run_gate.job, 'run');
    select g.locked, g.db_now, g.lost, g.succeeded, g.attempts, g.failures, g.last_failure,
           g.paused, g.run_id, g.backend_pid
      into locked, db_now, lost, succeeded, attempts, failures, last_failure, paused, run_id,
           backend_pid
      from jobhost.slot_gate(run_gate.job, run_gate.slot, run_gate.host, run_gate.lost_after,
                             run_gate.ns, run_gate.key) g;
    if run_id is not null then
        run_token := jobhost.run_token(run_id, run_gate.job);
    end if;
end
$$;
revoke execute on function jobhost.slot_gate(text, timestamptz, text, float8, integer, integer) from public;

-- A run's one row, written in the run's transaction (atomic with its work)
-- on a connection that logs in as the job's role: only with the token its
-- gate drew, so only the host, which keeps the token out of the plugin's
-- reach, writes it.
create function jobhost.record_run(run_token text, id bigint, job text, slot timestamptz,
                                   attempt integer, host_id text, plugin_sha256 text,
                                   started_at timestamptz, outcome text, message text,
                                   backend_pid integer)
returns void
language plpgsql
volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform jobhost.assert_may_act_for(record_run.job, 'record runs of');
    if record_run.run_token is distinct from jobhost.run_token(record_run.id, record_run.job) then
        raise exception using errcode = 'JH003',
            message = format('run %s of job %L: not a run its gate let through (wrong token)', record_run.id, record_run.job);
    end if;
    insert into jobhost.runs (id, job, slot, attempt, host_id, plugin_sha256, started_at,
                              finished_at, outcome, message, backend_pid)
    values (record_run.id, record_run.job, record_run.slot, record_run.attempt, record_run.host_id,
            record_run.plugin_sha256, coalesce(record_run.started_at, clock_timestamp()),
            clock_timestamp(), record_run.outcome, record_run.message, record_run.backend_pid);
end
$$;

-- A `session` job's short transactions commit on connections that log in as
-- the job's role, and their commit guard must see the lock connection (the
-- host's own) in `pg_stat_activity`, whose `backend_start` Postgres shows
-- only to roles with the privileges of the session's user: the guard runs
-- with its owner's.
alter function jobhost.assert_lock_held(integer, integer, integer, timestamptz) security definer;
