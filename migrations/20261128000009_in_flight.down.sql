drop function jobhost.slot_gate(text, timestamptz, text, float8, integer, integer);
drop table jobhost.in_flight;

-- The gate of migration ..._slot_gate, as it was.
create function jobhost.slot_gate(job text, slot timestamptz, host text, lost_after float8,
                                  ns integer, key integer,
                                  out locked boolean, out db_now timestamptz,
                                  out lost bigint, out succeeded boolean,
                                  out attempts integer, out failures integer,
                                  out last_failure timestamptz, out paused boolean)
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
    -- The history part reads the snapshot from before the update, where the
    -- rows just marked were still `running`; they are added back into
    -- `attempts` from the update's own result.
    with marked as (
        update jobhost.runs r
           set outcome = 'lost', finished_at = clock_timestamp(),
               message = 'the host running it died or lost its connection before finishing; its work was rolled back'
         where r.job = slot_gate.job and r.outcome = 'running' and r.host_id <> slot_gate.host
           and not exists (select 1 from jobhost.hosts h
                            where h.id = r.host_id and h.stopped_at is null
                              and h.last_seen > clock_timestamp() - make_interval(secs => slot_gate.lost_after))
        returning r.slot
    )
    select (select count(*) from marked),
           coalesce(bool_or(h.outcome = 'ok'), false),
           (count(*) + (select count(*) from marked m where m.slot = slot_gate.slot))::int4,
           (count(*) filter (where h.outcome in ('error', 'trap', 'timeout', 'lock_lost')))::int4,
           max(h.finished_at) filter (where h.outcome in ('error', 'trap', 'timeout', 'lock_lost')),
           exists (select 1 from jobhost.paused p where p.job = slot_gate.job)
      into lost, succeeded, attempts, failures, last_failure, paused
      from jobhost.runs h
     where h.job = slot_gate.job and h.slot = slot_gate.slot and h.outcome <> 'running';
end
$$;
