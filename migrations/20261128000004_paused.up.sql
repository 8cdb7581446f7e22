-- Jobs paused fleet-wide (`jobhost pause JOB`): every host's gate skips their
-- slots with reason `paused` until `jobhost resume JOB` deletes the row.
create table jobhost.paused (
    job       text        primary key,
    paused_at timestamptz not null default clock_timestamp(),
    paused_by text        not null
);
