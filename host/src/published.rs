//! Plugins shipped to the fleet through Postgres: `jobhost publish`,
//! `jobhost rollback`, `jobhost plugins`, and `plugin = "published:NAME"`
//! in jobs.toml.
//!
//! The database every host already shares is the registry:
//!
//! - **publish** validates the component exactly as a host would load it
//!   (a component of the `xact-plugin` or `session-plugin` world, starting
//!   within 64 MiB, at most [`MAX_BYTES`]) *before* storing anything, then,
//!   in one transaction: the bytes (content-addressed by SHA-256, stored
//!   once), a version row naming who published it, and a reload request
//!   ([`crate::reload::request`]). Publishing the current bytes again is a
//!   no-op;
//! - every host hears the request (at once by LISTEN on a direct connection,
//!   otherwise at its next heartbeat: that works through a transaction
//!   pooler) and reloads as for a file change: [`resolve`] fetches versions it
//!   has not seen into a local directory, verifying the hash, and
//!   [`crate::jobset::load`] compiles them off the run path (compile cache)
//!   and swaps them in between runs; a run in flight finishes on its version
//!   (the history's `plugin_sha256` says which ran). A host that cannot load
//!   a version keeps its current one, logs why and records it in
//!   `jobhost.host_plugins` ([`report`]);
//! - **rollback** appends a version row pointing back at the publish before
//!   the current one (repeated rollbacks walk further back);
//! - a host started later resolves the current version at start.
//!
//! Who may publish is a Postgres privilege: insert on `jobhost.plugin_blobs`
//! and `jobhost.plugin_versions`. Hosts only read them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::config::JobsConfig;
use crate::runtime::{PluginKind, Runtime};

/// The largest component `publish` accepts.
pub const MAX_BYTES: usize = 64 << 20;

/// Whether `name` may name a published plugin.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// What `publish` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// A new current version (the version row's id).
    New {
        /// Version id.
        version: i64,
        /// Content hash.
        sha256: String,
    },
    /// These bytes already are NAME's current version: nothing changed.
    AlreadyCurrent {
        /// Content hash.
        sha256: String,
    },
}

/// Validates `bytes` as a plugin and makes it NAME's current version (see
/// the module docs). `runtime` compiles it (and fills the compile cache that
/// hosts sharing this machine's cache then hit).
pub async fn publish(
    pool: &PgPool,
    runtime: &Arc<Runtime>,
    name: &str,
    bytes: Vec<u8>,
    by: &str,
) -> anyhow::Result<Published> {
    anyhow::ensure!(
        valid_name(name),
        "`{name}` cannot name a published plugin: use letters, digits, `.`, `_` and `-`"
    );
    anyhow::ensure!(
        bytes.len() <= MAX_BYTES,
        "the component is {} bytes; at most {MAX_BYTES} are accepted",
        bytes.len()
    );
    let rt = runtime.clone();
    let label = PathBuf::from(format!("{}{name}", crate::config::PUBLISHED));
    let (bytes, loaded) = tokio::task::spawn_blocking(move || {
        let loaded = rt.load_bytes(&label, &bytes, 64 << 20);
        (bytes, loaded)
    })
    .await
    .context("plugin loader panicked")?;
    let plugin = loaded.context("refused: not a plugin this host could run")?;
    let kind = match plugin.kind {
        PluginKind::Xact => "xact",
        PluginKind::Session => "session",
    };
    let sha = plugin.sha256.clone();
    let size = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    let outcome = crate::db::in_tx!(pool, |c| {
        async {
            sqlx::query(
                "insert into jobhost.plugin_blobs (sha256, bytes, size, kind, published_by)
                 values ($1, $2, $3, $4, $5) on conflict (sha256) do nothing",
            )
            .bind(&sha)
            .bind(&bytes)
            .bind(size)
            .bind(kind)
            .bind(by)
            .persistent(false)
            .execute(&mut *c)
            .await?;
            // Serialise publishes of one name (two at once must not both
            // read the same "current").
            sqlx::query("select pg_advisory_xact_lock(hashtext('jobhost.publish:' || $1))")
                .bind(name)
                .persistent(false)
                .execute(&mut *c)
                .await?;
            let current: Option<String> = sqlx::query_scalar(
                "select sha256 from jobhost.plugin_versions where name = $1 order by id desc limit 1",
            )
            .bind(name)
            .persistent(false)
            .fetch_optional(&mut *c)
            .await?;
            if current.as_deref() == Some(sha.as_str()) {
                return Ok(Published::AlreadyCurrent { sha256: sha.clone() });
            }
            let version: i64 = sqlx::query_scalar(
                "insert into jobhost.plugin_versions (name, sha256, action, published_by)
                 values ($1, $2, 'publish', $3) returning id",
            )
            .bind(name)
            .bind(&sha)
            .bind(by)
            .persistent(false)
            .fetch_one(&mut *c)
            .await?;
            Ok::<_, sqlx::Error>(Published::New {
                version,
                sha256: sha.clone(),
            })
        }
        .await
    })
    .await
    .with_context(|| format!("cannot store plugin `{name}`"))?;
    if matches!(outcome, Published::New { .. }) {
        crate::reload::request(pool, by)
            .await
            .context("stored, but cannot tell the hosts (they reload at their next start)")?;
    }
    Ok(outcome)
}

/// What `rollback` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolledBack {
    /// The hash that was current.
    pub from: String,
    /// The hash that is current now.
    pub to: String,
}

/// Makes the publish before NAME's current version current again (a
/// repeated rollback walks further back), and tells the hosts.
pub async fn rollback(pool: &PgPool, name: &str, by: &str) -> anyhow::Result<RolledBack> {
    let done = crate::db::in_tx!(pool, |c| {
        async {
            sqlx::query("select pg_advisory_xact_lock(hashtext('jobhost.publish:' || $1))")
                .bind(name)
                .persistent(false)
                .execute(&mut *c)
                .await?;
            // The current row, and the publish it stands for.
            let current: Option<(i64, String, Option<i64>)> = sqlx::query_as(
                "select id, sha256, restores from jobhost.plugin_versions
                  where name = $1 order by id desc limit 1",
            )
            .bind(name)
            .persistent(false)
            .fetch_optional(&mut *c)
            .await?;
            let Some((id, from, restores)) = current else {
                return Ok(None);
            };
            let base = restores.unwrap_or(id);
            let target: Option<(i64, String)> = sqlx::query_as(
                "select id, sha256 from jobhost.plugin_versions
                  where name = $1 and action = 'publish' and id < $2 and sha256 <> $3
                  order by id desc limit 1",
            )
            .bind(name)
            .bind(base)
            .bind(&from)
            .persistent(false)
            .fetch_optional(&mut *c)
            .await?;
            let Some((restores, to)) = target else {
                return Ok(Some(Err(from)));
            };
            sqlx::query(
                "insert into jobhost.plugin_versions (name, sha256, action, restores, published_by)
                 values ($1, $2, 'rollback', $3, $4)",
            )
            .bind(name)
            .bind(&to)
            .bind(restores)
            .bind(by)
            .persistent(false)
            .execute(&mut *c)
            .await?;
            Ok::<_, sqlx::Error>(Some(Ok(RolledBack { from, to })))
        }
        .await
    })
    .await
    .with_context(|| format!("cannot roll back plugin `{name}`"))?;
    match done {
        None => anyhow::bail!("plugin `{name}` was never published"),
        Some(Err(current)) => anyhow::bail!(
            "plugin `{name}` has no version before the current one ({})",
            short(&current)
        ),
        Some(Ok(rolled)) => {
            crate::reload::request(pool, by)
                .await
                .context("rolled back, but cannot tell the hosts")?;
            Ok(rolled)
        }
    }
}

/// Replaces the `plugin` path of every `published:NAME` job of `config` with
/// a local copy of NAME's current version under `dir`, fetching versions not
/// there yet and verifying their hash. The first problem stops it, naming
/// the job.
pub async fn resolve(pool: &PgPool, config: &mut JobsConfig, dir: &Path) -> anyhow::Result<()> {
    let names: Vec<String> = config
        .jobs
        .iter()
        .filter_map(|j| j.published.clone())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let current: Vec<(String, String)> = crate::db::in_tx!(pool, |c| {
        sqlx::query_as(
            "select distinct on (name) name, sha256 from jobhost.plugin_versions
              where name = any($1) order by name, id desc",
        )
        .bind(&names)
        .persistent(false)
        .fetch_all(c)
        .await
    })
    .await
    .context("cannot read the published plugins' current versions")?;
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the published plugins' directory `{}`",
            dir.display()
        )
    })?;
    for job in &mut config.jobs {
        let Some(name) = &job.published else { continue };
        let Some((_, sha)) = current.iter().find(|(n, _)| n == name) else {
            anyhow::bail!(
                "job `{}`: plugin `{}{name}` has no published version (`jobhost publish {name} FILE.wasm`)",
                job.name,
                crate::config::PUBLISHED
            );
        };
        let path = dir.join(format!("{sha}.wasm"));
        if !path.is_file() {
            fetch(pool, sha, &path).await.with_context(|| {
                format!("job `{}`: plugin `{name}` version {}", job.name, short(sha))
            })?;
        }
        job.plugin = path;
    }
    Ok(())
}

/// Downloads the blob `sha` to `path` (through a temporary name, renamed
/// into place once its hash is verified).
async fn fetch(pool: &PgPool, sha: &str, path: &Path) -> anyhow::Result<()> {
    let bytes: Vec<u8> = crate::db::in_tx!(pool, |c| {
        sqlx::query_scalar("select bytes from jobhost.plugin_blobs where sha256 = $1")
            .bind(sha)
            .persistent(false)
            .fetch_one(c)
            .await
    })
    .await
    .context("cannot fetch the published bytes")?;
    let got = hex::encode(Sha256::digest(&bytes));
    anyhow::ensure!(
        got == sha,
        "the stored bytes hash to {got}, not to {sha}: refused"
    );
    // A name of this fetch's own: hosts sharing the directory (or one
    // process running several) may fetch the same version at once.
    static FETCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = FETCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    std::fs::write(&tmp, &bytes).with_context(|| format!("cannot write `{}`", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write `{}`", path.display()))?;
    Ok(())
}

/// Records in `jobhost.host_plugins` what this host runs of each published
/// plugin of `config` (`jobs`, as loaded), or, with `error`, why it could
/// not load the current version (keeping the version it runs).
pub async fn report(
    pool: &PgPool,
    host_id: &str,
    config: &JobsConfig,
    jobs: &[crate::runner::Job],
    error: Option<&str>,
) -> sqlx::Result<()> {
    let mut rows: Vec<(String, Option<String>)> = Vec::new();
    for job in &config.jobs {
        let Some(name) = &job.published else { continue };
        if rows.iter().any(|(n, _)| n == name) {
            continue;
        }
        let running = jobs
            .iter()
            .find(|j| j.config.published.as_deref() == Some(name.as_str()))
            .map(|j| j.plugin.sha256.clone());
        rows.push((name.clone(), running));
    }
    for (name, sha) in rows {
        crate::db::in_tx!(pool, |c| {
            sqlx::query(
                "insert into jobhost.host_plugins (host_id, name, sha256, error)
                 values ($1, $2, $3, $4)
                 on conflict (host_id, name) do update
                    set sha256 = coalesce(excluded.sha256, jobhost.host_plugins.sha256),
                        error = excluded.error, loaded_at = clock_timestamp()",
            )
            .bind(host_id)
            .bind(&name)
            .bind(&sha)
            .bind(error)
            .persistent(false)
            .execute(c)
            .await
        })
        .await?;
    }
    Ok(())
}

/// One version of a published plugin, as `jobhost plugins` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    /// Plugin name.
    pub name: String,
    /// Version id.
    pub id: i64,
    /// Content hash.
    pub sha256: String,
    /// Size in bytes.
    pub size: i32,
    /// `xact` or `session`.
    pub kind: String,
    /// `publish` or `rollback`.
    pub action: String,
    /// When.
    pub published_at: DateTime<Utc>,
    /// By whom.
    pub published_by: String,
    /// Whether it is the name's current version.
    pub current: bool,
    /// Live hosts running this content, with any load error they report.
    pub hosts: Vec<String>,
}

type VersionTuple = (
    String,
    i64,
    String,
    i32,
    String,
    String,
    DateTime<Utc>,
    String,
    bool,
    Vec<String>,
);

/// Every version of every published plugin, newest first per name, with
/// the live hosts (seen within `lost_after`) that run each.
pub async fn list(pool: &PgPool, lost_after: std::time::Duration) -> sqlx::Result<Vec<VersionRow>> {
    let rows: Vec<VersionTuple> = crate::db::in_tx!(pool, |c| {
        sqlx::query_as(
            "select v.name, v.id, v.sha256, b.size, b.kind, v.action, v.published_at, v.published_by,
                    v.id = max(v.id) over (partition by v.name),
                    coalesce((select array_agg(hp.host_id || coalesce(' (cannot load the current version: ' || hp.error || ')', '')
                                               order by hp.host_id)
                                from jobhost.host_plugins hp
                                join jobhost.hosts h on h.id = hp.host_id
                               where hp.name = v.name and hp.sha256 = v.sha256
                                 and h.stopped_at is null
                                 and h.last_seen > clock_timestamp() - make_interval(secs => $1)
                                 and v.id = (select max(v2.id) from jobhost.plugin_versions v2
                                              where v2.name = v.name and v2.sha256 = v.sha256)),
                             '{}')
               from jobhost.plugin_versions v
               join jobhost.plugin_blobs b on b.sha256 = v.sha256
              order by v.name, v.id desc",
        )
        .bind(lost_after.as_secs_f64())
        .persistent(false)
        .fetch_all(c)
        .await
    })
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(name, id, sha256, size, kind, action, published_at, published_by, current, hosts)| {
                VersionRow {
                    name,
                    id,
                    sha256,
                    size,
                    kind,
                    action,
                    published_at,
                    published_by,
                    current,
                    hosts,
                }
            },
        )
        .collect())
}

/// `jobhost plugins`, as text.
pub fn render_list(rows: &[VersionRow]) -> String {
    if rows.is_empty() {
        return "no plugin has been published on this database (`jobhost publish NAME FILE.wasm`)\n"
            .to_owned();
    }
    let mut out = String::from(
        "NAME                 VERSION  SHA256        SIZE      KIND     ACTION    PUBLISHED                 BY            HOSTS\n",
    );
    for r in rows {
        out.push_str(&format!(
            "{:<20} {:<8} {:<13} {:<9} {:<8} {:<9} {:<25} {:<13} {}\n",
            format!("{}{}", r.name, if r.current { " *" } else { "" }),
            r.id,
            short(&r.sha256),
            r.size,
            r.kind,
            r.action,
            r.published_at.format("%Y-%m-%d %H:%M:%S UTC"),
            r.published_by,
            r.hosts.join(", "),
        ));
    }
    out.push_str("(* current version)\n");
    out
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}
