-- Plugins shipped through Postgres (`jobhost publish NAME FILE.wasm`).
--
-- Blobs are content-addressed: the same bytes are stored once, whatever
-- name they are published under. A name's versions are an append-only log:
-- its current version is its latest row; `jobhost rollback` appends a row
-- that points back at an earlier publish.
--
-- Privileges: hosts only read these tables (and write their own rows of
-- jobhost.host_plugins); who may publish is whoever may insert into
-- jobhost.plugin_blobs and jobhost.plugin_versions (README: "Shipping a new
-- plugin version" suggests a `jobhost_publisher` role).
create table jobhost.plugin_blobs (
    sha256       text        primary key check (sha256 ~ '^[0-9a-f]{64}$'),
    bytes        bytea       not null,
    size         int4        not null,
    kind         text        not null check (kind in ('xact', 'session')),
    published_at timestamptz not null default clock_timestamp(),
    published_by text        not null
);

create table jobhost.plugin_versions (
    id           bigserial   primary key,
    name         text        not null,
    sha256       text        not null references jobhost.plugin_blobs (sha256),
    action       text        not null check (action in ('publish', 'rollback')),
    -- For a rollback: the publish row it returns to.
    restores     bigint      references jobhost.plugin_versions (id),
    published_at timestamptz not null default clock_timestamp(),
    published_by text        not null
);
create index plugin_versions_name on jobhost.plugin_versions (name, id desc);

-- Which version of each published plugin each host runs, and why not when
-- it could not load the current one.
create table jobhost.host_plugins (
    host_id   text        not null,
    name      text        not null,
    sha256    text,
    loaded_at timestamptz not null default clock_timestamp(),
    error     text,
    primary key (host_id, name)
);
