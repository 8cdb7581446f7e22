alter function jobhost.assert_lock_held(integer, integer, integer, timestamptz) security invoker;
drop function jobhost.record_run(text, bigint, text, timestamptz, integer, text, text, timestamptz, text, text, integer);
drop function jobhost.run_gate(text, timestamptz, text, float8, integer, integer);
grant execute on function jobhost.slot_gate(text, timestamptz, text, float8, integer, integer) to public;
drop function jobhost.run_token(bigint, text);
drop function jobhost.assert_may_act_for(text, text);
drop table jobhost.run_secret;
drop table jobhost.job_roles;
