drop index if exists jobhost.runs_running;
delete from jobhost.runs where outcome in ('running', 'lost', 'interrupted');
alter table jobhost.runs drop constraint runs_outcome_check;
alter table jobhost.runs add constraint runs_outcome_check
    check (outcome in ('running', 'ok', 'error', 'trap', 'timeout', 'lock_lost'));
alter table jobhost.runs drop column backend_pid;
