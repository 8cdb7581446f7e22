//! `jobs.toml`: the raw serde shapes (`*Toml`) and the validated configuration (`*Config`).
//!
//! Parsing rejects unknown fields, bad durations, bad cron expressions and unknown
//! time zones with the file, line and column (from the `toml` crate's spans).
//! Validation then checks what a single field cannot: duplicate job names, missing
//! plugin files, colliding lock keys. Plugin paths are relative to the directory of
//! the `jobs.toml` that names them, so a config works from any working directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use sha2::Digest as _;

use crate::lock::LockKey;
use crate::schedule::{CronSchedule, Schedule};

/// Why a `jobs.toml` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a field has the wrong shape; the source
    /// names the line, column, field and what was expected.
    #[error("invalid config file `{path}`")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error, with location.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is well-formed but unusable.
    #[error("invalid config file `{path}`: job `{job}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The job the problem belongs to.
        job: String,
        /// What is wrong, naming the field.
        message: String,
    },
}

/// The top level of `jobs.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JobsToml {
    /// Host-wide settings and per-job defaults.
    #[serde(default)]
    pub host: HostToml,
    /// The jobs, as `[[job]]` tables.
    #[serde(default, rename = "job")]
    pub jobs: Vec<JobToml>,
}

/// `[host]`: settings for the whole process and defaults for every job.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HostToml {
    /// Maximum pooled connections (default 4).
    pub pool_size: Option<u32>,
    /// Default wall-clock budget of one run (default 30s).
    #[serde(default, with = "humantime_serde::option")]
    pub default_timeout: Option<Duration>,
    /// Default cap on a plugin's linear memory, in MiB (default 64).
    pub default_max_memory_mib: Option<u32>,
    /// Default cap on the rows one plugin query may return (default 10000).
    pub default_max_rows: Option<usize>,
    /// On SIGTERM/SIGINT, how long in-flight runs may take to finish before
    /// they are interrupted and rolled back (default 30s).
    #[serde(default, with = "humantime_serde::option")]
    pub shutdown_grace: Option<Duration>,
    /// Directory of compiled plugins, keyed by content hash and engine
    /// (default `.jobhost/compile-cache` beside this file).
    pub compile_cache: Option<PathBuf>,
    /// Size of the compile cache above which its least recently used
    /// artifacts are removed, in MiB (default 2048).
    pub compile_cache_max_mib: Option<u64>,
    /// Watch jobs.toml and plugin files and reload on change (default true).
    pub watch: Option<bool>,
    /// Use wasmtime's pooling instance allocator (default true): cheaper
    /// instantiation, address space reserved up front, sized from this file
    /// (`pool-size`, session jobs, the largest `max-memory-mib`).
    pub pooling_allocator: Option<bool>,
    /// Quiet period after a file event before reloading (default 300ms).
    #[serde(default, with = "humantime_serde::option")]
    pub reload_debounce: Option<Duration>,
    /// How often this host reports itself alive in `jobhost.hosts`
    /// (default 5s).
    #[serde(default, with = "humantime_serde::option")]
    pub heartbeat: Option<Duration>,
    /// A host not seen for this long is dead: its runs in flight are `lost`
    /// and locks its backends hold are STUCK (default 30s; at least two
    /// heartbeats).
    #[serde(default, with = "humantime_serde::option")]
    pub host_lost_after: Option<Duration>,
    /// Serve `/metrics`, `/healthz` and the read-only dashboard on this
    /// address (e.g. `"127.0.0.1:9464"`; off when absent).
    pub listen: Option<std::net::SocketAddr>,
    /// What `DATABASE_URL` leads to: `"none"` (Postgres itself, or a pooler
    /// in session mode; the default) or `"transaction"` (a transaction
    /// pooler such as PgBouncer `pool_mode = transaction`). See
    /// [`Pooler`].
    pub pooler: Option<Pooler>,
    /// How long a host that is not a job's preferred host (rendezvous
    /// hashing over the live fleet) waits before trying a slot, so that the
    /// preferred one has it and the others write nothing (default 50ms;
    /// "0s" turns the preference off).
    #[serde(default, with = "humantime_serde::option")]
    pub fleet_defer: Option<Duration>,
}

/// What stands between the host's pool (`DATABASE_URL`) and Postgres.
///
/// `Transaction`: each transaction (and each protocol sync outside one) may
/// reach another server session. The host then sends nothing whose meaning
/// outlives a transaction through `DATABASE_URL` (no named prepared
/// statements, no session settings, no session locks, no LISTEN), and takes
/// what needs a real session — `session`-mode locks and their heartbeats,
/// LISTEN for reload, migrations — from `JOBHOST_DIRECT_URL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooler {
    /// One server session per client connection.
    #[default]
    None,
    /// A transaction pooler.
    Transaction,
}

/// One `[[job]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JobToml {
    /// Unique job name; also the source of the default lock key.
    pub name: String,
    /// Path of the plugin component, relative to the config file.
    pub plugin: PathBuf,
    /// A fixed cadence (`"30s"`, `"6h"`); exclusive with `cron`.
    #[serde(default, with = "humantime_serde::option")]
    pub every: Option<Duration>,
    /// Where an `every` grid sits in its period: `"auto"` (default, derived
    /// from the name within `min(every, 1m)`, see [`crate::schedule`]) or a
    /// duration shorter than `every` (`"0s"`: aligned to the Unix epoch).
    pub offset: Option<EveryOffset>,
    /// A cron expression, seconds field optional (`"*/10 * * * * *"`).
    pub cron: Option<CronExpr>,
    /// IANA time zone for `cron` (default UTC).
    pub timezone: Option<TimeZoneName>,
    /// How the job's lock is held.
    #[serde(default)]
    pub lock: LockMode,
    /// Wall-clock budget of one run.
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Explicit lock key instead of the one derived from the name.
    pub lock_key: Option<i32>,
    /// Cap on the plugin's linear memory, in MiB.
    pub max_memory_mib: Option<u32>,
    /// Cap on the rows one query may return.
    pub max_rows: Option<usize>,
    /// Postgres role the job's runs log in as (see [`crate::pools`]), so
    /// Postgres enforces which tables the job may touch.
    pub role: Option<String>,
    /// Environment variables the plugin may see (none by default).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Attempts per slot, the first included (default 1: no retry; the next
    /// slot is the retry).
    pub max_attempts: Option<u32>,
    /// Wait before the first retry; doubles for each later one (default 10s).
    #[serde(default, with = "humantime_serde::option")]
    pub retry_backoff: Option<Duration>,
    /// `session` jobs: how often the lock connection is checked; a run whose
    /// lock is lost is interrupted within this interval (default 2s).
    #[serde(default, with = "humantime_serde::option")]
    pub heartbeat: Option<Duration>,
    /// Outbound HTTP grant (`[job.http]`); absent = no HTTP.
    pub http: Option<HttpToml>,
    /// Missed slots: absent = skip to the next slot; a window (`"1h"`) = on
    /// start, run the slots of that window that have no successful run.
    #[serde(default, with = "humantime_serde::option")]
    pub catch_up: Option<Duration>,
    /// Values handed to the plugin in its run context.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
}

/// `[job.http]`: what a job may reach over HTTP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpToml {
    /// `host` or `host:port` entries the job may call.
    pub allow: Vec<String>,
    /// Allow loopback/private/link-local targets (default false).
    #[serde(default)]
    pub allow_private: bool,
    /// Allow HTTPS (default false): its TLS client resolves the host again
    /// before connecting, so unlike plain HTTP it cannot be pinned to the
    /// address that was checked, and a DNS answer that changes in between
    /// (rebinding) is not caught.
    #[serde(default)]
    pub allow_unpinned_https: bool,
    /// Per-request timeout (default 10s).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Response body cap in bytes (default 1 MiB).
    pub max_response_bytes: Option<usize>,
}

/// How a job's advisory lock is held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockMode {
    /// `pg_try_advisory_xact_lock` as the first statement of the job's
    /// transaction; released by COMMIT or ROLLBACK.
    #[default]
    Xact,
    /// `pg_try_advisory_lock` on a connection opened for the run (never a
    /// pooled one), for long jobs whose work commits in short transactions.
    Session,
}

/// A cron expression that parsed.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct CronExpr(pub CronSchedule);

impl TryFrom<String> for CronExpr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        CronSchedule::parse(&s).map(CronExpr)
    }
}

/// `offset` of an `every` job: `"auto"` or a duration.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub enum EveryOffset {
    /// Derived from the job name ([`Schedule::spread_offset`]).
    Auto,
    /// This far past each multiple of the period since the Unix epoch.
    Fixed(Duration),
}

impl TryFrom<String> for EveryOffset {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.trim() == "auto" {
            return Ok(Self::Auto);
        }
        humantime::parse_duration(&s).map(Self::Fixed).map_err(|e| {
            format!("invalid offset `{s}`: {e} (expected `auto` or a duration like `15s`)")
        })
    }
}

/// The `every` schedule of job `name`, validated, with its offset resolved.
fn every_schedule(
    name: &str,
    every: Duration,
    offset: Option<EveryOffset>,
) -> Result<Schedule, String> {
    // Slots are stored in Postgres (`timestamptz`, microseconds) and compared
    // with the ones the schedule computes: keep both exact.
    let whole_ms = |d: Duration| d.subsec_nanos().is_multiple_of(1_000_000);
    if every.is_zero() {
        return Err("`every` must be greater than zero".into());
    }
    if !whole_ms(every) {
        return Err("`every` must be a whole number of milliseconds".into());
    }
    let offset = match offset.unwrap_or(EveryOffset::Auto) {
        EveryOffset::Auto => Schedule::spread_offset(name, every),
        EveryOffset::Fixed(o) if !whole_ms(o) => {
            return Err("`offset` must be a whole number of milliseconds".into());
        }
        EveryOffset::Fixed(o) if o >= every => {
            return Err(format!(
                "`offset` ({}) must be shorter than `every` ({})",
                humantime::format_duration(o),
                humantime::format_duration(every)
            ));
        }
        EveryOffset::Fixed(o) => o,
    };
    Ok(Schedule::Every {
        period: every,
        offset,
    })
}

/// Refuses a retry policy whose retries could never run: the scheduler moves
/// on to the next slot when it comes before a retry, so the backoffs of all
/// retries must fit between two slots.
fn retries_fit(retry: &RetryPolicy, schedule: &Schedule) -> Result<(), String> {
    if retry.max_attempts <= 1 {
        return Ok(());
    }
    let Some(gap) = schedule.min_gap(chrono::Utc::now()) else {
        return Ok(());
    };
    let total: Duration = (1..retry.max_attempts).map(|n| retry.delay_after(n)).sum();
    if total >= gap {
        return Err(format!(
            "`max-attempts` = {} with `retry-backoff` = {} waits {} in all before its last retry, \
             but slots can be {} apart: the next slot would come first and the retries would never run; \
             lower `max-attempts` or `retry-backoff`",
            retry.max_attempts,
            humantime::format_duration(retry.backoff),
            humantime::format_duration(total),
            humantime::format_duration(gap),
        ));
    }
    Ok(())
}

/// An IANA time zone name that exists.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
pub struct TimeZoneName(pub chrono_tz::Tz);

impl TryFrom<String> for TimeZoneName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        chrono_tz::Tz::from_str(&s).map(TimeZoneName).map_err(|_| {
            format!("unknown time zone `{s}`, expected an IANA name like `Europe/Berlin`")
        })
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// Host-wide settings.
    pub host: HostConfig,
    /// The jobs, in file order.
    pub jobs: Vec<JobConfig>,
    /// SHA-256 (hex) of the text this configuration was parsed from: what a
    /// reload compares the file with.
    pub text_sha256: String,
}

/// Validated `[host]` settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Maximum pooled connections.
    pub pool_size: u32,
    /// How long in-flight runs may finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Where compiled plugins are cached.
    pub compile_cache: PathBuf,
    /// The compile cache's size limit ([`crate::runtime::CompileCache`]).
    pub compile_cache_max_bytes: u64,
    /// Whether files are watched for hot reload.
    pub watch: bool,
    /// Whether the pooling instance allocator is used.
    pub pooling_allocator: bool,
    /// Debounce of file events.
    pub reload_debounce: Duration,
    /// Host heartbeat and when a silent host counts as dead.
    pub liveness: crate::hosts::Liveness,
    /// Where `/metrics`, `/healthz` and the dashboard are served, if anywhere.
    pub listen: Option<std::net::SocketAddr>,
    /// What `DATABASE_URL` leads to.
    pub pooler: Pooler,
    /// How long a host that is not a job's preferred one waits before a
    /// slot ([`crate::hosts::LiveHosts`]).
    pub fleet_defer: Duration,
    /// Whether `JOBHOST_DIRECT_URL` is set (the environment's, not
    /// jobs.toml's: see [`JobsConfig::with_direct_url`]).
    pub direct_url: bool,
}

/// What a job may reach over HTTP (`[job.http]`, validated). Configuration
/// only: `runtime::http` enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGrant {
    /// Allowed `host` (any port) or `host:port` entries.
    pub allow: Vec<String>,
    /// Allow loopback, private, link-local and other internal addresses.
    pub allow_private: bool,
    /// Allow HTTPS, which cannot be pinned to the checked address.
    pub allow_unpinned_https: bool,
    /// Per-request timeout (connect, first byte, between bytes).
    pub timeout: Duration,
    /// Largest response body accepted, bytes.
    pub max_response_bytes: usize,
}

/// When a failed slot is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per slot, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry; doubles for each later one.
    pub backoff: Duration,
}

impl RetryPolicy {
    /// The wait after `attempt` failed attempts: backoff × 2^(attempt-1), capped at a day.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.backoff
            .saturating_mul(factor)
            .min(Duration::from_secs(86_400))
    }
}

/// The `plugin` prefix of a plugin published in Postgres.
pub const PUBLISHED: &str = "published:";

/// One validated job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobConfig {
    /// Unique name.
    pub name: String,
    /// Absolute (or config-relative resolved) path of the component. For a
    /// published plugin, the local copy of its current version once
    /// [`crate::published::resolve`] has fetched it (until then the text
    /// `published:NAME`).
    pub plugin: PathBuf,
    /// `plugin = "published:NAME"`: the plugin is the current version of
    /// NAME as published in Postgres (`jobhost publish`), not a file.
    pub published: Option<String>,
    /// When it runs.
    pub schedule: Schedule,
    /// How its lock is held.
    pub lock: LockMode,
    /// Its advisory lock key.
    pub lock_key: LockKey,
    /// Wall-clock budget of one run.
    pub timeout: Duration,
    /// Cap on the plugin's linear memory, in bytes.
    pub max_memory_bytes: usize,
    /// Cap on the rows one query may return.
    pub max_rows: usize,
    /// The role the job's run connections log in as.
    pub role: Option<String>,
    /// Environment variables the plugin sees.
    pub env: Vec<(String, String)>,
    /// Retries of a failed slot.
    pub retry: RetryPolicy,
    /// Catch-up window for missed slots (`None`: skip them).
    pub catch_up: Option<Duration>,
    /// `session` jobs: lock-connection check interval.
    pub heartbeat: Duration,
    /// Outbound HTTP grant.
    pub http: Option<HttpGrant>,
    /// `[job.config]` rendered as strings (TOML strings as-is, other values as TOML).
    pub config: Vec<(String, String)>,
}

/// Whether validation requires every plugin file to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginFiles {
    /// A host's start, reload and `check`: a missing file is an error.
    Required,
    /// Operators' commands (`status`, `locks`, `reload`), which only read
    /// the database: the plugin files may live on other machines.
    NotNeeded,
}

impl HostConfig {
    /// Where the host keeps its copies of published plugins (by hash):
    /// beside the compile cache, not in it (the cache removes its least
    /// recently used files; a published plugin must stay until unpublished).
    pub fn published_dir(&self) -> PathBuf {
        let mut dir = self.compile_cache.clone().into_os_string();
        dir.push("-published");
        PathBuf::from(dir)
    }
}

impl JobsConfig {
    /// Records whether the host has a direct URL (`JOBHOST_DIRECT_URL`),
    /// which decides whether `session` jobs may run behind a transaction
    /// pooler ([`JobsConfig::refuse_behind_pooler`]).
    pub fn with_direct_url(mut self, set: bool) -> Self {
        self.host.direct_url = set;
        self
    }

    /// Behind a transaction pooler without a direct URL, a `session` job
    /// cannot run: its lock must live on one server session for the whole
    /// run, which a transaction pooler does not give. Names the first such
    /// job and what to set.
    pub fn refuse_behind_pooler(&self) -> Result<(), String> {
        if self.host.pooler != Pooler::Transaction || self.host.direct_url {
            return Ok(());
        }
        match self.jobs.iter().find(|j| j.lock == LockMode::Session) {
            Some(job) => Err(format!(
                "job `{}`: lock = \"session\" holds its lock on one server session for the whole run, which a transaction pooler (`[host] pooler = \"transaction\"`) does not give; set JOBHOST_DIRECT_URL to Postgres itself (session locks and their heartbeats go there), or make the job `lock = \"xact\"`",
                job.name
            )),
            None => Ok(()),
        }
    }

    /// Reads and validates `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::read(path.as_ref(), PluginFiles::Required)
    }

    /// Reads and validates `path`, with plugin files `files`.
    pub fn read(path: &Path, files: PluginFiles) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, files)
    }

    /// Parses and validates `text` as if read from `path` (plugin paths resolve
    /// against `path`'s directory). Lets tests use inline TOML.
    pub fn from_str_at(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse(text, path, PluginFiles::Required)
    }

    pub(crate) fn parse(text: &str, path: &Path, files: PluginFiles) -> Result<Self, ConfigError> {
        let raw: JobsToml = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let mut config = raw.validate(path, files)?;
        config.text_sha256 = hex::encode(sha2::Sha256::digest(text.as_bytes()));
        Ok(config)
    }
}

const DEFAULT_POOL_SIZE: u32 = 4;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_MEMORY_MIB: u32 = 64;
const DEFAULT_MAX_ROWS: usize = 10_000;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(10);

impl JobsToml {
    fn validate(self, path: &Path, files: PluginFiles) -> Result<JobsConfig, ConfigError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let invalid = |job: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            job: job.to_owned(),
            message,
        };
        let pool_size = self.host.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
        if pool_size == 0 {
            return Err(invalid("-", "`host.pool-size` must be at least 1".into()));
        }
        let compile_cache_max_mib = self
            .host
            .compile_cache_max_mib
            .unwrap_or(crate::runtime::CompileCache::DEFAULT_LIMIT_BYTES >> 20);
        if compile_cache_max_mib == 0 {
            return Err(invalid(
                "-",
                "`host.compile-cache-max-mib` must be at least 1 (a cache that keeps nothing would compile every plugin at every start)".into(),
            ));
        }
        let default_timeout = self.host.default_timeout.unwrap_or(DEFAULT_TIMEOUT);
        let default_memory = self
            .host
            .default_max_memory_mib
            .unwrap_or(DEFAULT_MAX_MEMORY_MIB);

        let default_rows = self.host.default_max_rows.unwrap_or(DEFAULT_MAX_ROWS);
        let defaults = crate::hosts::Liveness::default();
        let liveness = crate::hosts::Liveness {
            heartbeat: self.host.heartbeat.unwrap_or(defaults.heartbeat),
            lost_after: self.host.host_lost_after.unwrap_or(defaults.lost_after),
        };
        if liveness.heartbeat.is_zero() || liveness.lost_after < liveness.heartbeat * 2 {
            return Err(invalid(
                "-",
                format!(
                    "`host.host-lost-after` ({}) must be at least two `host.heartbeat`s ({}): a host must not be taken for dead between two of its heartbeats",
                    humantime::format_duration(liveness.lost_after),
                    humantime::format_duration(liveness.heartbeat)
                ),
            ));
        }

        let mut jobs: Vec<JobConfig> = Vec::with_capacity(self.jobs.len());
        for job in self.jobs {
            let name = job.name.trim().to_owned();
            if name.is_empty() {
                return Err(invalid("", "`name` must not be empty".into()));
            }
            if jobs.iter().any(|j| j.name == name) {
                return Err(invalid(&name, "duplicate job name".into()));
            }
            let schedule = match (job.every, job.cron) {
                (Some(every), None) => {
                    if job.timezone.is_some() {
                        return Err(invalid(&name, "`timezone` only applies to `cron`".into()));
                    }
                    every_schedule(&name, every, job.offset).map_err(|m| invalid(&name, m))?
                }
                (None, Some(_)) if job.offset.is_some() => {
                    return Err(invalid(&name, "`offset` only applies to `every`".into()));
                }
                (None, Some(CronExpr(cron))) => Schedule::Cron(Box::new(
                    cron.in_zone(job.timezone.map_or(chrono_tz::UTC, |t| t.0)),
                )),
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        &name,
                        "set either `every` or `cron`, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        &name,
                        "missing schedule: set `every = \"30s\"` or `cron = \"*/30 * * * * *\"`"
                            .into(),
                    ));
                }
            };
            let published = match job.plugin.to_str().and_then(|p| p.strip_prefix(PUBLISHED)) {
                Some(n) if crate::published::valid_name(n) => Some(n.to_owned()),
                Some(n) => {
                    return Err(invalid(
                        &name,
                        format!(
                            "`plugin = \"{PUBLISHED}{n}\"`: a published plugin's name is letters, digits, `.`, `_` and `-`"
                        ),
                    ));
                }
                None => None,
            };
            let plugin = match published {
                Some(_) => job.plugin.clone(),
                None => base.join(&job.plugin),
            };
            if files == PluginFiles::Required && published.is_none() && !plugin.is_file() {
                return Err(invalid(
                    &name,
                    format!("`plugin` file `{}` does not exist", plugin.display()),
                ));
            }
            let lock_key = match job.lock_key {
                Some(k) => LockKey::explicit(k),
                None => LockKey::derive(&name),
            };
            if let Some(other) = jobs.iter().find(|j| j.lock_key == lock_key) {
                return Err(invalid(
                    &name,
                    format!(
                        "lock key {} collides with job `{}`; set a distinct `lock-key`",
                        lock_key.key, other.name
                    ),
                ));
            }
            let timeout = job.timeout.unwrap_or(default_timeout);
            if timeout.is_zero() {
                return Err(invalid(&name, "`timeout` must be greater than zero".into()));
            }
            if let Some(role) = &job.role
                && (role.is_empty() || role.len() > 63)
            {
                return Err(invalid(
                    &name,
                    format!("`role` {role:?} is not a valid role name"),
                ));
            }
            if job.heartbeat.is_some_and(|h| h.is_zero()) {
                return Err(invalid(
                    &name,
                    "`heartbeat` must be greater than zero".into(),
                ));
            }
            let max_attempts = job.max_attempts.unwrap_or(1);
            if max_attempts == 0 {
                return Err(invalid(&name, "`max-attempts` must be at least 1".into()));
            }
            let retry = RetryPolicy {
                max_attempts,
                backoff: job.retry_backoff.unwrap_or(DEFAULT_RETRY_BACKOFF),
            };
            retries_fit(&retry, &schedule).map_err(|m| invalid(&name, m))?;
            let config = job
                .config
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        toml::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, v)
                })
                .collect();
            jobs.push(JobConfig {
                name,
                plugin,
                published,
                schedule,
                lock: job.lock,
                lock_key,
                timeout,
                max_memory_bytes: job.max_memory_mib.unwrap_or(default_memory) as usize
                    * 1024
                    * 1024,
                max_rows: job.max_rows.unwrap_or(default_rows),
                role: job.role,
                env: job.env.into_iter().collect(),
                retry,
                catch_up: job.catch_up,
                heartbeat: job.heartbeat.unwrap_or(Duration::from_secs(2)),
                http: job.http.map(|h| HttpGrant {
                    allow: h.allow,
                    allow_private: h.allow_private,
                    allow_unpinned_https: h.allow_unpinned_https,
                    timeout: h.timeout.unwrap_or(Duration::from_secs(10)),
                    max_response_bytes: h.max_response_bytes.unwrap_or(1 << 20),
                }),
                config,
            });
        }
        Ok(JobsConfig {
            text_sha256: String::new(),
            path: path.to_owned(),
            host: HostConfig {
                pool_size,
                shutdown_grace: self.host.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
                compile_cache: base.join(
                    self.host
                        .compile_cache
                        .unwrap_or_else(|| PathBuf::from(".jobhost/compile-cache")),
                ),
                // Saturating: a limit past what a disk holds means none.
                compile_cache_max_bytes: compile_cache_max_mib.saturating_mul(1 << 20),
                watch: self.host.watch.unwrap_or(true),
                pooling_allocator: self.host.pooling_allocator.unwrap_or(true),
                reload_debounce: self
                    .host
                    .reload_debounce
                    .unwrap_or(Duration::from_millis(300)),
                liveness,
                listen: self.host.listen,
                pooler: self.host.pooler.unwrap_or_default(),
                direct_url: false,
                fleet_defer: self.host.fleet_defer.unwrap_or(Duration::from_millis(50)),
            },
            jobs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<JobsConfig, String> {
        // Cargo.toml exists in the crate dir, so it serves as a "plugin file".
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs.toml");
        JobsConfig::from_str_at(text, &path).map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        })
    }

    #[test]
    fn the_compile_cache_limit_is_in_mib_and_at_least_one() {
        let job = "[[job]]\nname = \"r\"\nplugin = \"Cargo.toml\"\nevery = \"10s\"\n";
        let default = parse(job).unwrap();
        assert_eq!(default.host.compile_cache_max_bytes, 2 << 30);
        let set = parse(&format!("[host]\ncompile-cache-max-mib = 300\n{job}")).unwrap();
        assert_eq!(set.host.compile_cache_max_bytes, 300 << 20);
        let e = parse(&format!("[host]\ncompile-cache-max-mib = 0\n{job}")).unwrap_err();
        assert!(
            e.contains("compile-cache-max-mib") && e.contains("at least 1"),
            "{e}"
        );
        // A huge limit is no limit, not an overflow (it was refused as "at
        // least 1").
        let huge = parse(&format!(
            "[host]\ncompile-cache-max-mib = {}\n{job}",
            u64::MAX
        ))
        .unwrap();
        assert_eq!(huge.host.compile_cache_max_bytes, u64::MAX);
    }

    #[test]
    fn retries_that_could_never_run_are_refused() {
        let job = |extra: &str| {
            format!("[[job]]\nname = \"r\"\nplugin = \"Cargo.toml\"\nevery = \"10s\"\n{extra}")
        };
        // 6 s + 12 s of backoff before the third attempt: the next slot, 10 s
        // later, always comes first.
        let e = parse(&job("max-attempts = 3\nretry-backoff = \"6s\"")).unwrap_err();
        assert!(
            e.contains("job `r`") && e.contains("retries would never run"),
            "{e}"
        );
        assert!(e.contains("18s") && e.contains("10s"), "{e}");
        // The default backoff (10 s) with a retry on a 10 s cadence: refused too.
        assert!(parse(&job("max-attempts = 2")).is_err());
        // 2 s + 4 s fit in 10 s.
        let ok = parse(&job("max-attempts = 3\nretry-backoff = \"2s\"")).unwrap();
        assert_eq!(ok.jobs[0].retry.max_attempts, 3);
        // Cron: the least gap counts (every 10 s at :00 :10 ... on a minute).
        let cron = "[[job]]\nname = \"c\"\nplugin = \"Cargo.toml\"\ncron = \"*/10 * * * * *\"\nmax-attempts = 2\nretry-backoff = \"15s\"";
        assert!(parse(cron).is_err());
    }

    #[test]
    fn host_liveness_needs_two_heartbeats() {
        let host = |hb: &str, lost: &str| {
            format!("[host]\nheartbeat = \"{hb}\"\nhost-lost-after = \"{lost}\"\n")
        };
        let e = parse(&host("5s", "8s")).unwrap_err();
        assert!(e.contains("host-lost-after"), "{e}");
        let c = parse(&host("200ms", "1s")).unwrap();
        assert_eq!(c.host.liveness.heartbeat, Duration::from_millis(200));
        assert_eq!(c.host.liveness.lost_after, Duration::from_secs(1));
    }

    #[test]
    fn valid_job_parses_with_defaults() {
        let c = parse(
            r#"
            [[job]]
            name = "a"
            plugin = "Cargo.toml"
            every = "30s"
            [job.config]
            batch-size = 50
            label = "x"
            "#,
        )
        .unwrap();
        let j = &c.jobs[0];
        assert_eq!(
            j.schedule,
            Schedule::Every {
                period: Duration::from_secs(30),
                offset: Schedule::spread_offset("a", Duration::from_secs(30)),
            }
        );
        assert_eq!(j.timeout, DEFAULT_TIMEOUT);
        assert_eq!(
            j.config,
            vec![
                ("batch-size".into(), "50".into()),
                ("label".into(), "x".into())
            ]
        );
        assert_eq!(j.lock_key, LockKey::derive("a"));
    }

    #[test]
    fn unknown_field_names_field_and_position() {
        let e = parse(
            "[[job]]\nname = \"a\"\nplugin = \"Cargo.toml\"\nevery = \"1s\"\nfrequency = 3\n",
        )
        .unwrap_err();
        assert!(e.contains("unknown field `frequency`"), "{e}");
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("jobs.toml"), "{e}");
    }

    #[test]
    fn bad_duration_is_rejected() {
        let e = parse("[[job]]\nname = \"a\"\nplugin = \"Cargo.toml\"\nevery = \"30 parsecs\"\n")
            .unwrap_err();
        assert!(e.contains("line 4"), "{e}");
        assert!(
            e.contains("every") || e.contains("unknown time unit"),
            "{e}"
        );
    }

    #[test]
    fn bad_cron_and_zone_are_rejected() {
        let e = parse("[[job]]\nname = \"a\"\nplugin = \"Cargo.toml\"\ncron = \"61 * * * *\"\n")
            .unwrap_err();
        assert!(e.contains("cron"), "{e}");
        let e = parse(
            "[[job]]\nname = \"a\"\nplugin = \"Cargo.toml\"\ncron = \"* * * * *\"\ntimezone = \"Mars/Olympus\"\n",
        )
        .unwrap_err();
        assert!(e.contains("unknown time zone `Mars/Olympus`"), "{e}");
    }

    #[test]
    fn missing_plugin_duplicate_name_and_schedule_are_rejected() {
        let e =
            parse("[[job]]\nname = \"a\"\nplugin = \"nope.wasm\"\nevery = \"1s\"\n").unwrap_err();
        assert!(
            e.contains("nope.wasm") && e.contains("does not exist"),
            "{e}"
        );
        let e = parse(
            "[[job]]\nname = \"a\"\nplugin = \"Cargo.toml\"\nevery = \"1s\"\n[[job]]\nname = \"a\"\nplugin = \"Cargo.toml\"\nevery = \"1s\"\n",
        )
        .unwrap_err();
        assert!(e.contains("job `a`: duplicate job name"), "{e}");
        let e = parse("[[job]]\nname = \"a\"\nplugin = \"Cargo.toml\"\n").unwrap_err();
        assert!(e.contains("missing schedule"), "{e}");
    }

    #[test]
    fn an_every_offset_is_fixed_auto_or_rejected() {
        let job = |extra: &str| {
            parse(&format!(
                "[[job]]\nname = \"a\"\nplugin = \"Cargo.toml\"\n{extra}\n"
            ))
        };
        let fixed = job("every = \"30s\"\noffset = \"0s\"").unwrap();
        assert_eq!(
            fixed.jobs[0].schedule,
            Schedule::every(Duration::from_secs(30))
        );
        let auto = job("every = \"30s\"\noffset = \"auto\"").unwrap();
        assert_eq!(
            auto.jobs[0].schedule,
            job("every = \"30s\"").unwrap().jobs[0].schedule
        );
        let e = job("every = \"30s\"\noffset = \"30s\"").unwrap_err();
        assert!(
            e.contains("job `a`: `offset` (30s) must be shorter than `every` (30s)"),
            "{e}"
        );
        let e = job("cron = \"* * * * *\"\noffset = \"5s\"").unwrap_err();
        assert!(e.contains("`offset` only applies to `every`"), "{e}");
        let e = job("every = \"30s\"\noffset = \"1500us\"").unwrap_err();
        assert!(
            e.contains("`offset` must be a whole number of milliseconds"),
            "{e}"
        );
        let e = job("every = \"1500us\"").unwrap_err();
        assert!(
            e.contains("`every` must be a whole number of milliseconds"),
            "{e}"
        );
        let e = job("every = \"30s\"\noffset = \"soon\"").unwrap_err();
        assert!(e.contains("invalid offset `soon`"), "{e}");
    }

    #[test]
    fn colliding_explicit_lock_keys_are_rejected() {
        let e = parse(
            "[[job]]\nname = \"a\"\nplugin = \"Cargo.toml\"\nevery = \"1s\"\nlock-key = 7\n[[job]]\nname = \"b\"\nplugin = \"Cargo.toml\"\nevery = \"1s\"\nlock-key = 7\n",
        )
        .unwrap_err();
        assert!(e.contains("collides with job `a`"), "{e}");
    }
}
