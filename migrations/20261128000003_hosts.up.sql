-- Host liveness. Each host upserts its row every `host-heartbeat`; a host not
-- seen for `host-lost-after` is dead, and its `running` rows are `lost`. This
-- replaces judging runs by backend pid, which stays alive when only a host's
-- task died, and always behind a transaction pooler.
create table jobhost.hosts (
    id         text        primary key,
    hostname   text        not null,
    pid        integer     not null,
    version    text        not null,
    started_at timestamptz not null,
    last_seen  timestamptz not null,
    -- Set by a graceful shutdown; a stopped host is never live.
    stopped_at timestamptz
);

-- The commit guard of a `session` job's short transactions: sent in the same
-- simple query as COMMIT, it aborts the transaction unless backend `holder`
-- (the run's lock connection, started at `holder_start`) still holds the
-- job's session lock. A run never commits after its lock is gone.
create function jobhost.assert_lock_held(ns integer, key integer, holder integer, holder_start timestamptz)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if not exists (
        select 1
          from pg_catalog.pg_locks l
          join pg_catalog.pg_stat_activity a on a.pid = l.pid
         where l.locktype = 'advisory' and l.granted and l.objsubid = 2
           and l.classid = (ns::bigint & 4294967295)::oid
           and l.objid = (key::bigint & 4294967295)::oid
           and l.database = (select oid from pg_catalog.pg_database where datname = pg_catalog.current_database())
           and l.pid = holder and a.backend_start = holder_start
    ) then
        raise exception 'jobhost: the job''s lock (%, %) is no longer held by its lock connection (pid %); not committing', ns, key, holder
            using errcode = 'JH001';
    end if;
end
$$;

-- What a session holds that must not outlive a run (DESIGN invariant 11,
-- "verify, don't enumerate"): advisory locks other than the job's own
-- (`own_ns`, `own_key`; none at all when they are null), settings changed at
-- session level other than `allowed` (the host's own and the plugin's
-- `SET LOCAL`s, which look the same until the transaction ends; an entry
-- `name=value` allows that setting only with that value, e.g. what a
-- session-mode pooler replays on every server session; skipped when
-- `allowed` is null), temporary objects, holdable cursors, listened
-- channels, SQL-level prepared statements. NULL when clean, otherwise a
-- description.
--
-- `search_path` is judged from the caller's value (inside the function it is
-- the function's own: `set search_path` below keeps a leaked search_path
-- from redirecting this check) against the session's default (`reset_val`).
--
-- PL/pgSQL rather than SQL: its plans are cached per connection, so the
-- check is planned once per pooled connection, not once per run. Reading
-- `pg_settings` is most of its cost (every setting is formatted); it is
-- read once per run, before COMMIT.
create function jobhost.session_state(own_ns integer, own_key integer, allowed text[],
                                      caller_search_path text)
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    found text[] := '{}';
    item text;
    default_search_path text;
    temp_ns oid := pg_my_temp_schema();
begin
    select 'advisory locks ' || string_agg(
               case when l.objsubid = 2
                    then format('(%s, %s)',
                                case when l.classid::int8 >= 2147483648 then l.classid::int8 - 4294967296 else l.classid::int8 end,
                                case when l.objid::int8 >= 2147483648 then l.objid::int8 - 4294967296 else l.objid::int8 end)
                    else ((l.classid::int8 << 32) | l.objid::int8)::text end, ', ')
      into item
      from pg_locks l
     where l.locktype = 'advisory' and l.pid = pg_backend_pid() and l.granted
       and not coalesce(l.objsubid = 2
                        and l.classid::int8 = (own_ns::int8 & 4294967295)
                        and l.objid::int8 = (own_key::int8 & 4294967295), false);
    if item is not null then found := found || item; end if;

    if allowed is not null then
        -- One pass over pg_settings: most of this function's cost.
        select 'session settings ' || string_agg(s.name, ', ' order by s.name)
                   filter (where s.source = 'session' and s.name <> 'search_path'
                                 and s.name <> all (allowed)
                                 and (s.name || '=' || s.setting) <> all (allowed)),
               max(s.reset_val) filter (where s.name = 'search_path')
          into item, default_search_path
          from pg_settings s;
        if item is not null then found := found || item; end if;
        if caller_search_path is distinct from default_search_path
           and not 'search_path' = any (allowed) then
            found := found || format('session settings search_path (%s)', caller_search_path);
        end if;
    end if;

    if temp_ns <> 0 then
        select 'temporary objects ' || string_agg(o.name, ', ')
          into item
          from (select c.relname::text as name from pg_class c where c.relnamespace = temp_ns
                union all
                select p.proname::text || '()' from pg_proc p where p.pronamespace = temp_ns
                union all
                select 'operator ' || o.oprname from pg_operator o where o.oprnamespace = temp_ns
                union all
                select 'type ' || t.typname from pg_type t
                 where t.typnamespace = temp_ns and t.typrelid = 0 and t.typcategory <> 'A') o;
        if item is not null then found := found || item; end if;
    end if;

    select 'holdable cursors ' || string_agg(c.name, ', ') into item from pg_cursors c where c.is_holdable;
    if item is not null then found := found || item; end if;
    select 'listened channels ' || string_agg(ch, ', ') into item from pg_listening_channels() ch;
    if item is not null then found := found || item; end if;
    select 'prepared statements ' || string_agg(p.name, ', ') into item
      from pg_prepared_statements p where p.from_sql;
    if item is not null then found := found || item; end if;

    return nullif(array_to_string(found, '; '), '');
end
$$;

-- The in-transaction form: raises (SQLSTATE JH002) instead of returning, so
-- that it stops the simple query before its COMMIT.
create function jobhost.assert_clean(own_ns integer, own_key integer, allowed text[],
                                     caller_search_path text)
returns boolean
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    found text := jobhost.session_state(own_ns, own_key, allowed, caller_search_path);
begin
    if found is not null then
        raise exception 'session_state_leaked: %', found using errcode = 'JH002';
    end if;
    return true;
end
$$;
