-- The session check as migration 20261128000003 made it: without `role`.
create or replace function jobhost.session_state(own_ns integer, own_key integer, allowed text[],
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
