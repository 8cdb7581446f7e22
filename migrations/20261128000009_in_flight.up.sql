-- A run's row is written once, by its own transaction (issue 17).
--
-- Until now a run inserted a `running` row and committed it on its own
-- before its transaction, then overwrote it with the outcome: per run, one
-- more round trip, one more transaction, and an insert plus a non-HOT update
-- (every index of `runs` written twice). Now the run's closing query inserts
-- the finished row, and runs in flight are published by their host in
-- batches into `jobhost.in_flight` (runs that last past a fraction of a
-- second; see host/src/hosts.rs), where `status` and the dashboard read them
-- and where the next holder of a job's lock finds the runs of dead hosts.
--
-- `run_id` comes from `jobhost.runs`'s sequence (the gate draws it), and the
-- run's final row carries the same id: an entry whose id has a row in
-- `runs` finished, and one without a row did not.
create table jobhost.in_flight (
    run_id        bigint      primary key,
    host_id       text        not null,
    job           text        not null,
    slot          timestamptz not null,
    attempt       integer     not null,
    plugin_sha256 text        not null,
    started_at    timestamptz not null,
    backend_pid   integer
);
create index in_flight_by_job on jobhost.in_flight (job);
create index in_flight_by_host on jobhost.in_flight (host_id);

-- The gate, now also drawing the run's id and judging published runs of
-- dead hosts (the old `running` rows are still judged: a host of an earlier
-- version in the same fleet writes them).
drop function jobhost.slot_gate(text, timestamptz, text, float8, integer, integer);

-- The gate of a run, in one call: try the job's lock, read the database
-- clock, and under the lock record the runs of dead hosts `lost`, read the
-- slot's history (earlier attempts, failures, success, pause), and draw the
-- run's id.
--
-- Why a function: the whole opening of a run is one round trip (it rides in
-- the simple query that also sends BEGIN, the deadline, the savepoint and
-- the role), and PL/pgSQL caches the plans of its statements per server
-- session, so nothing is prepared by the client (safe through a transaction
-- pooler).
--
-- Why it is safe: the function is VOLATILE, so in READ COMMITTED each of its
-- statements takes a fresh snapshot (not the calling query's). The history
-- is read by a statement that starts after the lock is granted, and sees
-- every run committed by the lock's previous holder.
--
-- Recording a dead host's run `lost` under the job's lock is safe: no other
-- transaction of the job is open (an `xact` run holds the lock throughout;
-- a `session` run's lock connection holds it), and a dead host's run died
-- with it (Postgres rolled its transaction back: the run's deadline,
-- keepalives). A published run with a row in `runs` had finished before its
-- host died; it is only unpublished. Runs of live hosts, and this host's
-- own, are never judged here: their host's heartbeat does that.
--
-- `ns` null: the caller holds the job's lock elsewhere (a `session` run's
-- lock connection); nothing is locked here. `lost_after` is in seconds.
-- Returned: `locked`, `db_now`; the rest is null when not locked or when
-- the database clock has not reached `slot`, and `run_id` is null too for a
-- slot that succeeded or a paused job.
create function jobhost.slot_gate(job text, slot timestamptz, host text, lost_after float8,
                                  ns integer, key integer,
                                  out locked boolean, out db_now timestamptz,
                                  out lost bigint, out succeeded boolean,
                                  out attempts integer, out failures integer,
                                  out last_failure timestamptz, out paused boolean,
                                  out run_id bigint, out backend_pid integer)
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
begin
    locked := slot_gate.ns is null or pg_try_advisory_xact_lock(slot_gate.ns, slot_gate.key);
    db_now := clock_timestamp();
    if not locked or db_now < slot_gate.slot then
        return;
    end if;
    -- Runs of dead hosts to record: written only when there are candidates,
    -- so that the usual run (none) pays two index probes, not four
    -- data-modifying statements (pgbench: 18 % of the gate's time, 13 % of
    -- a whole run's database time). The history, read by the next
    -- statement, sees what this one wrote: a run recorded `lost` counts as
    -- an attempt.
    lost := 0;
    if exists (select 1 from jobhost.in_flight f
                where f.job = slot_gate.job and f.host_id <> slot_gate.host)
       or exists (select 1 from jobhost.runs r
                   where r.job = slot_gate.job and r.outcome = 'running' and r.host_id <> slot_gate.host) then
        with unpublished as (
            delete from jobhost.in_flight f
             where f.job = slot_gate.job and f.host_id <> slot_gate.host
               and not exists (select 1 from jobhost.hosts h
                                where h.id = f.host_id and h.stopped_at is null
                                  and h.last_seen > clock_timestamp() - make_interval(secs => slot_gate.lost_after))
            returning f.*
        ), recorded as (
            insert into jobhost.runs as n (id, job, slot, attempt, host_id, plugin_sha256, started_at,
                                      finished_at, outcome, message, backend_pid)
            select u.run_id, u.job, u.slot, u.attempt, u.host_id, u.plugin_sha256, u.started_at,
                   clock_timestamp(), 'lost',
                   'the host running it died or lost its connection before finishing; its work was rolled back',
                   u.backend_pid
              from unpublished u
             where not exists (select 1 from jobhost.runs r where r.id = u.run_id)
            returning n.slot
        ), marked as (
            update jobhost.runs r
               set outcome = 'lost', finished_at = clock_timestamp(),
                   message = 'the host running it died or lost its connection before finishing; its work was rolled back'
             where r.job = slot_gate.job and r.outcome = 'running' and r.host_id <> slot_gate.host
               and not exists (select 1 from jobhost.hosts h
                                where h.id = r.host_id and h.stopped_at is null
                                  and h.last_seen > clock_timestamp() - make_interval(secs => slot_gate.lost_after))
            returning r.slot
        ), written as (
            select w.slot from recorded w union all select m.slot from marked m
        )
        select count(*) into lost from written w;
    end if;
    select coalesce(bool_or(h.outcome = 'ok'), false),
           count(*)::int4,
           (count(*) filter (where h.outcome in ('error', 'trap', 'timeout', 'lock_lost')))::int4,
           max(h.finished_at) filter (where h.outcome in ('error', 'trap', 'timeout', 'lock_lost')),
           exists (select 1 from jobhost.paused p where p.job = slot_gate.job)
      into succeeded, attempts, failures, last_failure, paused
      from jobhost.runs h
     where h.job = slot_gate.job and h.slot = slot_gate.slot and h.outcome <> 'running';
    -- An id only for a slot that may run (the host still applies its retry
    -- rules): a slot found done or paused leaves the sequence alone.
    if not succeeded and not paused then
        run_id := nextval('jobhost.runs_id_seq');
    end if;
    backend_pid := pg_backend_pid();
end
$$;
