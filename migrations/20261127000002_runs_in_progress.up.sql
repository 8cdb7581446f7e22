-- In-progress runs are visible in the history: a run inserts its row as
-- 'running' (committed on its own) before it takes the job's lock, and the
-- locked transaction updates it to the final outcome atomically with the work.
-- A 'running' row whose backend is gone belonged to a host that died mid-run;
-- the next holder of the lock marks it 'lost'.
alter table jobhost.runs add column backend_pid integer;

alter table jobhost.runs drop constraint runs_outcome_check;
alter table jobhost.runs add constraint runs_outcome_check
    check (outcome in ('running', 'ok', 'error', 'trap', 'timeout', 'lock_lost', 'lost', 'interrupted'));

create index runs_running on jobhost.runs (job) where outcome = 'running';
