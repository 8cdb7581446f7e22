-- The check before COMMIT reads `pg_settings` only when the session's settings
-- differ from those of a session it already found clean.
--
-- Reading `pg_settings` formats every setting with its descriptions: about
-- three quarters of what the check costs a run that sent SQL (BENCHMARKS.md,
-- row 4′). Reading just the values of the settings a session can change
-- (`current_setting`, no descriptions) costs about a quarter of it. So the
-- check first takes a fingerprint of those values, with the caller's
-- `search_path`; if it is one the host already saw pass the full read (the
-- host keeps a few: `hygiene::Baseline`), the settings are exactly those of a
-- clean session and the read is skipped. Otherwise it reads `pg_settings` as
-- before, and returns the fingerprint when it found nothing, for the host to
-- remember. A value changed at session level is either different (the full
-- read names it) or the same as before (then nothing changed for the next
-- job, and `RESET ALL` follows the check anyway).

-- The settings the fingerprint covers: every one a session can change
-- (contexts `user` and `superuser`), but those that differ from run to run
-- by design: the host's own `SET LOCAL`s (timeouts, `application_name`),
-- the transaction's own characteristics, and those the check's functions set
-- for themselves (`search_path`, passed as the caller's instead;
-- `plan_cache_mode`, which the full read leaves aside too). Refreshed by the
-- host at start (`jobhost.watch_settings`), so a server upgrade's new
-- settings are covered once the host restarts. Readable by every role: a job
-- that logs in as its own role runs the check as that role.
--
-- A role without `pg_read_all_settings` may not read some of them
-- (`dynamic_library_path`, `session_preload_libraries`: `superuser` settings
-- that `pg_settings` hides from it too), so the fingerprint takes the
-- `superuser` settings only for a role that may read them all. A role that
-- was granted `SET` on such a setting (`GRANT SET ON PARAMETER`) without
-- that privilege changes it unfingerprinted: the reset after each run still
-- undoes it.
create table jobhost.watched_settings (
    name    text primary key,
    context text not null
);
grant select on jobhost.watched_settings to public;

create function jobhost.watch_settings() returns void
language sql
set search_path = pg_catalog, pg_temp
as $$
    with wanted as (
        select s.name, s.context from pg_settings s
         where s.context in ('user', 'superuser')
           and s.name not in ('search_path', 'plan_cache_mode',
                              'statement_timeout', 'idle_in_transaction_session_timeout',
                              'application_name', 'transaction_isolation',
                              'transaction_read_only', 'transaction_deferrable')
    ),
    gone as (
        -- Names only: a row whose context changed is updated below, and one
        -- statement must not touch a row twice.
        delete from jobhost.watched_settings w
         where w.name not in (select name from wanted)
    )
    insert into jobhost.watched_settings (name, context)
    select name, context from wanted
    on conflict (name) do update set context = excluded.context
     where watched_settings.context is distinct from excluded.context
$$;
revoke execute on function jobhost.watch_settings() from public;
select jobhost.watch_settings();

-- The in-transaction check with the fingerprint: `clean` lists fingerprints of
-- sessions found clean (`null`: take none, read `pg_settings`, as when the
-- plugin used `SET LOCAL`). Returns the fingerprint when it read
-- `pg_settings` and found nothing, `null` otherwise; raises JH002 on a leak.
-- An overload, not a replacement: hosts of the previous release call the
-- four-argument form until they are replaced.
create function jobhost.assert_clean(own_ns integer, own_key integer, allowed text[],
                                     caller_search_path text, clean text[])
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    fingerprint text;
    privileged boolean;
    found text;
begin
    if allowed is not null and clean is not null then
        privileged := pg_has_role('pg_read_all_settings', 'USAGE');
        begin
            -- In the table's order, not sorted (sorting was a third of
            -- the cost): a refresh that changes the order makes a new
            -- fingerprint, learned at the price of one full read.
            select md5(coalesce(caller_search_path, '') || E'\n'
                       || string_agg(w.name || '=' || coalesce(current_setting(w.name, true), ''),
                                     E'\n'))
              into fingerprint
              from jobhost.watched_settings w
             where w.context = 'user' or privileged;
        exception when insufficient_privilege then
            -- A `user` setting this role may not read (an extension's):
            -- no fingerprint, the full read.
            fingerprint := null;
        end;
        if fingerprint = any (clean) then
            -- The settings of a session the full read passed: skip it.
            allowed := null;
            fingerprint := null;
        end if;
    end if;
    found := jobhost.session_state(own_ns, own_key, allowed, caller_search_path);
    if found is not null then
        raise exception 'session_state_leaked: %', found using errcode = 'JH002';
    end if;
    return fingerprint;
end
$$;
