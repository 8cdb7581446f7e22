-- `jobhost reload` as a row: every host notices a new request at its next
-- heartbeat, which works through a transaction pooler (where LISTEN cannot:
-- the pooler drops notifications). Hosts that LISTEN on a direct connection
-- hear the NOTIFY sent with it at once.
create table jobhost.reload_requests (
    id bigserial primary key,
    requested_at timestamptz not null default clock_timestamp(),
    requested_by text not null
);

-- How each host hears a reload request, and the latest it acted on.
alter table jobhost.hosts
    add column listens boolean not null default false,
    add column reload_seen bigint;
