-- Admissions as claims of the hosts that hold them (DESIGN §7): a row of
-- `jobhost.job_roles` says that host `host_id` runs `job` as `role`, so the
-- set shrinks as well as grows:
--
-- - a host keeps its own rows equal to the jobs it runs (and, after a reload
--   that changed or dropped a job's role, to the old pair until a run of the
--   old configuration can no longer be in flight: its timeout plus the
--   deadline margin), re-writing any that are missing at each heartbeat;
-- - a graceful stop deletes the host's rows;
-- - a host that is not live (stopped, or not seen for `host-lost-after`) has
--   its rows deleted by the next heartbeat of any live host, once they are
--   older than `host-lost-after` (a host admits its roles before it
--   registers, and a start may take that long to load its plugins).
--
-- `jobhost.assert_may_act_for` is unchanged: a role may act for a job while
-- any host claims that pair, which the primary key's prefix finds.
--
-- Rows written before this migration, and by hosts of an earlier version
-- during a rolling upgrade, have the empty host id: no heartbeat renews or
-- deletes them. Once every host runs this version, an operator deletes them
-- (`delete from jobhost.job_roles where host_id = ''`); the hosts re-claim
-- what they run at their next heartbeat.
alter table jobhost.job_roles add column host_id text not null default '';
alter table jobhost.job_roles drop constraint job_roles_pkey;
alter table jobhost.job_roles add primary key (job, role, host_id);
