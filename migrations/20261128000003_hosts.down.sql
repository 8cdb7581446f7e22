drop function if exists jobhost.assert_clean(integer, integer, text[], text);
drop function if exists jobhost.session_state(integer, integer, text[], text);
drop function if exists jobhost.assert_lock_held(integer, integer, integer, timestamptz);
drop table if exists jobhost.hosts;
