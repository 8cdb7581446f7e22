//! Hot reload: new plugin versions and `jobs.toml` edits without a restart.
//!
//! Triggers: debounced file-system events on `jobs.toml` and every plugin file
//! (their directories are watched, so editors' and deploy tools' write-then-
//! rename is seen), SIGHUP, and `jobhost reload` ([`request`]): a row in
//! `jobhost.reload_requests` that every host's heartbeat sees (which works
//! through a transaction pooler), with a `NOTIFY jobhost_reload` that hosts
//! with a direct connection hear at once.
//!
//! File events only ask a question: did the *content* of `jobs.toml` or of a
//! plugin change (SHA-256, read through symlinks)? Reads (a reload's own
//! included), touches and rewrites with equal bytes change nothing and cause
//! nothing; a burst of writes within the debounce is one reload, of the final
//! content. Events on other names in a watched directory also ask (a deploy
//! tool's temp file renamed over ours, a Kubernetes ConfigMap swapping its
//! `..data` symlink).
//!
//! A reload validates the new set exactly as a start does
//! ([`crate::jobset::load`]: config, every plugin's world, memory limit and
//! kind against `lock`, changed or not), compiling only plugins whose content
//! is new, off the scheduling path. Anything that fails keeps the running set
//! whole, with the error naming the job and file; that content is not tried
//! again until it changes. What loads is handed to the scheduler, which swaps
//! it in between runs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use sqlx::postgres::PgConnectOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{JobConfig, JobsConfig};
use crate::runner::Job;
use crate::runtime::Runtime;

/// The `NOTIFY` channel `jobhost reload` signals.
pub const RELOAD_CHANNEL: &str = "jobhost_reload";

/// Re-reads the configuration and plugins, keeping what works.
pub struct Reloader {
    config_path: PathBuf,
    runtime: Arc<Runtime>,
    jobs: Vec<Job>,
    /// Content of every watched file at the last reload attempt: a trigger
    /// whose files all still have it is not a change.
    seen: Fingerprint,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The host has `JOBHOST_DIRECT_URL` (the environment's; a reload of
    /// jobs.toml keeps it).
    direct_url: bool,
    /// Where `published:NAME` plugins come from, and this host's id to
    /// report what it runs ([`crate::published`]).
    published: Option<(sqlx::PgPool, String)>,
    /// The run pools, to admit the new jobs' roles, and this host's
    /// admissions ([`crate::roles::Admitted`]).
    roles: Option<(crate::pools::RunPools, crate::roles::Admitted)>,
}

/// SHA-256 of `jobs.toml` and of every plugin file it names (through
/// symlinks: a Kubernetes ConfigMap's `..data` swap changes what they read).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Fingerprint(Vec<(PathBuf, Option<String>)>);

impl Fingerprint {
    /// What is running: the configuration's text and the plugins as loaded
    /// (not as the files are now: a change between the load and the first
    /// look must still be seen as one).
    fn running(config_path: &Path, config_sha256: &str, jobs: &[Job]) -> Self {
        let mut seen = vec![(config_path.to_owned(), Some(config_sha256.to_owned()))];
        for j in jobs {
            if !seen.iter().any(|(p, _)| *p == j.config.plugin) {
                seen.push((j.config.plugin.clone(), Some(j.plugin.sha256.clone())));
            }
        }
        Self(seen)
    }

    /// Each distinct file of `files` hashed once.
    fn of(files: &[PathBuf]) -> Self {
        let mut seen: Vec<(PathBuf, Option<String>)> = Vec::new();
        for f in files {
            if !seen.iter().any(|(p, _)| p == f) {
                seen.push((f.clone(), crate::jobset::file_sha256(f).ok()));
            }
        }
        Self(seen)
    }

    /// The files whose content differs from `before` (or that are new).
    fn changed_since(&self, before: &Fingerprint) -> Vec<String> {
        self.0
            .iter()
            .filter(|(f, sha)| !before.0.iter().any(|(g, old)| g == f && old == sha))
            .map(|(f, _)| f.display().to_string())
            .collect()
    }
}

impl Reloader {
    /// A reloader whose current state is `jobs`, loaded from `config` at
    /// start.
    pub fn new(config: &JobsConfig, runtime: Arc<Runtime>, jobs: Vec<Job>) -> Self {
        let seen = Fingerprint::running(&config.path, &config.text_sha256, &jobs);
        Self {
            config_path: config.path.clone(),
            runtime,
            jobs,
            seen,
            metrics: None,
            direct_url: config.host.direct_url,
            published: None,
            roles: None,
        }
    }

    /// Admits the job roles of each reload through `runs` into `admitted`
    /// (as a start does) before any plugin is compiled for them, and settles
    /// `admitted` on what runs once the reload is applied or rejected.
    pub fn with_roles(
        mut self,
        runs: crate::pools::RunPools,
        admitted: crate::roles::Admitted,
    ) -> Self {
        self.roles = Some((runs, admitted));
        self
    }

    /// Resolves `published:NAME` plugins through `pool` at each reload, and
    /// reports what `host_id` runs (or why it cannot load a version).
    pub fn with_published(mut self, pool: sqlx::PgPool, host_id: &str) -> Self {
        self.published = Some((pool, host_id.to_owned()));
        self
    }

    /// Counts reloads and plugin loads in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, applied: bool) {
        if let Some(m) = &self.metrics {
            m.reloaded(applied);
        }
    }

    /// `jobs.toml` and every current plugin file.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.config_path.clone()];
        // Once each: a thousand jobs on one plugin watch (and hash) one file.
        for job in &self.jobs {
            if !files.contains(&job.config.plugin) {
                files.push(job.config.plugin.clone());
            }
        }
        files
    }

    /// Reloads if the content of `jobs.toml` or of a plugin changed since the
    /// last attempt (a read, a touch or a rewrite with equal bytes is no
    /// change); returns the new job set if it was applied.
    pub async fn reload_if_changed(&mut self) -> Option<Vec<Job>> {
        let now = Fingerprint::of(&self.files());
        let changed = now.changed_since(&self.seen);
        if changed.is_empty() {
            return None;
        }
        info!(files = ?changed, "content changed; reloading");
        self.reload().await
    }

    /// Re-reads everything and validates it exactly as a start does
    /// ([`crate::jobset::load`]); returns the new job set if anything
    /// changed. Anything that fails keeps the running set whole. Either way
    /// the host's role claims then follow what it runs
    /// ([`crate::roles::Admitted::settle`]).
    pub async fn reload(&mut self) -> Option<Vec<Job>> {
        let Some((_, admitted)) = self.roles.clone() else {
            return self.try_reload().await;
        };
        let was: Vec<JobConfig> = self.jobs.iter().map(|j| j.config.clone()).collect();
        let applied = self.try_reload().await;
        let running: Vec<JobConfig> = self.jobs.iter().map(|j| j.config.clone()).collect();
        admitted.settle(&was, &running).await;
        applied
    }

    async fn try_reload(&mut self) -> Option<Vec<Job>> {
        let direct_url = self.direct_url;
        let config =
            JobsConfig::from_file(&self.config_path).map(|c| c.with_direct_url(direct_url));
        // Whatever happens, this content has been tried: only a new change
        // is tried again (a broken file does not make every event an error).
        let attempted = |this: &mut Self, plugins: &[PathBuf]| {
            let files: Vec<PathBuf> = std::iter::once(this.config_path.clone())
                .chain(plugins.iter().cloned())
                .collect();
            this.seen = Fingerprint::of(&files);
        };
        let config = match config {
            Ok(c) => c,
            Err(e) => {
                let plugins: Vec<PathBuf> =
                    self.jobs.iter().map(|j| j.config.plugin.clone()).collect();
                attempted(self, &plugins);
                error!(file = %self.config_path.display(), error = %chain(&e), "reload rejected: invalid jobs.toml; keeping the running configuration");
                self.count(false);
                return None;
            }
        };
        let mut config = config;
        let resolved = match &self.published {
            Some((pool, _)) => {
                let dir = config.host.published_dir();
                crate::published::resolve(pool, &mut config, &dir).await
            }
            None => Ok(()),
        };
        let plugins: Vec<PathBuf> = config.jobs.iter().map(|j| j.plugin.clone()).collect();
        attempted(self, &plugins);
        // The new jobs' roles, read where the host has its database, before
        // any plugin is compiled for them.
        let resolved = match (resolved, &self.roles, &self.published) {
            (Ok(()), Some((runs, admitted)), _) => admitted.admit(runs, &config.jobs).await,
            (Ok(()), None, Some((pool, _))) => crate::roles::check(pool, &config.jobs).await,
            (resolved, _, _) => resolved,
        };
        let loaded = match resolved {
            Ok(()) => {
                crate::jobset::load(&self.runtime, &config, &self.jobs, self.metrics.as_deref())
                    .await
            }
            Err(e) => Err(e),
        };
        let next = match loaded {
            Ok(next) => next,
            Err(e) => {
                let why = format!("{e:#}");
                error!(file = %self.config_path.display(), error = %why, "reload rejected: the new configuration would not start; keeping the running one");
                self.count(false);
                self.report(&config, Some(&why)).await;
                return None;
            }
        };
        let same = next.len() == self.jobs.len()
            && next
                .iter()
                .zip(&self.jobs)
                .all(|(a, b)| a.config == b.config && a.plugin.sha256 == b.plugin.sha256);
        if same {
            self.report(&config, None).await;
            return None;
        }
        for job in &next {
            let old = self.jobs.iter().find(|o| o.config.name == job.config.name);
            if old.is_none_or(|o| o.plugin.sha256 != job.plugin.sha256) {
                info!(job = %job.config.name, file = %job.plugin.path.display(), plugin_sha256 = %job.plugin.sha256, "plugin version loaded");
            }
        }
        info!(jobs = next.len(), "reload applied");
        self.count(true);
        self.jobs = next.clone();
        self.report(&config, None).await;
        Some(next)
    }

    /// Records in the database which published versions this host runs now.
    async fn report(&self, config: &JobsConfig, error: Option<&str>) {
        if let Some((pool, host_id)) = &self.published
            && let Err(e) = crate::published::report(pool, host_id, config, &self.jobs, error).await
        {
            warn!(error = %e, "cannot record the published plugin versions this host runs");
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// A directory, canonical when it exists.
fn canonical_dir(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned())
}

/// Canonical form used to match file events (the file itself may be gone).
fn canonical(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::canonicalize(dir)
                .map(|d| d.join(name))
                .unwrap_or_else(|_| path.to_owned())
        }
        _ => path.to_owned(),
    }
}

/// The trigger of a `jobhost reload` request seen at a heartbeat.
pub const REQUESTED: &str = "jobhost reload (seen at heartbeat)";

/// Where `jobhost reload` requests reach this host from.
pub struct Requests {
    /// A real session to `LISTEN jobhost_reload` on (a direct connection;
    /// none behind a transaction pooler without `JOBHOST_DIRECT_URL`).
    pub listen: Option<PgConnectOptions>,
    /// Requests the host heartbeat saw in `jobhost.reload_requests`.
    pub polled: mpsc::Receiver<&'static str>,
}

/// Reloads on every trigger until `token` is cancelled, sending each changed
/// job set to `updates`. Triggers: file changes (if `watch_files`),
/// SIGHUP, and `jobhost reload` requests (`requests`).
pub async fn watch(
    mut reloader: Reloader,
    watch_files: bool,
    debounce: Duration,
    requests: Requests,
    updates: mpsc::Sender<Vec<Job>>,
    token: CancellationToken,
) {
    let Requests { listen, mut polled } = requests;
    // Triggers coalesce: one pending reload covers any number of events.
    let (trigger, mut triggered) = mpsc::channel::<&'static str>(1);
    let files: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
    let set_files = |reloader: &Reloader| {
        let mut f = files.lock().unwrap_or_else(|p| p.into_inner());
        *f = reloader.files().iter().map(|p| canonical(p)).collect();
    };
    set_files(&reloader);

    let mut debouncer = None;
    if watch_files {
        let wanted = files.clone();
        let tx = trigger.clone();
        match new_debouncer(debounce, None, move |res: DebounceEventResult| {
            let Ok(events) = res else { return };
            let wanted = wanted.lock().unwrap_or_else(|p| p.into_inner());
            // Reads (ours included: a reload reads every file) are not changes.
            // Anything else on a watched file, or on a name that is no file of
            // ours in a watched directory (a Kubernetes `..data` symlink swap, a
            // deploy tool's temp file renamed over ours), asks for a content
            // check: the hashes decide whether anything changed.
            let relevant = |e: &notify_debouncer_full::DebouncedEvent| {
                !matches!(e.kind, EventKind::Access(_))
                    && e.paths.iter().any(|p| {
                        wanted.contains(&canonical(p))
                            || p.file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with(".."))
                            || p.parent().is_some_and(|d| {
                                wanted.iter().any(|w| w.parent() == Some(&canonical_dir(d)))
                            })
                    })
            };
            if events.iter().any(relevant) {
                let _ = tx.try_send("file change");
            }
        }) {
            Ok(d) => debouncer = Some(d),
            Err(e) => {
                error!(error = %e, "cannot watch files; reload with SIGHUP or `jobhost reload`")
            }
        }
    }
    let mut watched_dirs: HashSet<PathBuf> = HashSet::new();
    let mut watch_dirs = |reloader: &Reloader, debouncer: &mut Option<_>| {
        let Some(d) = debouncer.as_mut() else { return };
        let d: &mut notify_debouncer_full::Debouncer<_, _> = d;
        for file in reloader.files() {
            let dir = canonical(&file)
                .parent()
                .map(Path::to_owned)
                .unwrap_or_default();
            if watched_dirs.insert(dir.clone())
                && let Err(e) = d.watch(&dir, RecursiveMode::NonRecursive)
            {
                warn!(dir = %dir.display(), error = %e, "cannot watch directory");
            }
        }
    };
    watch_dirs(&reloader, &mut debouncer);

    // A change between the start's load and the watch is a change too.
    let _ = trigger.try_send("file change");
    let signals = tokio::spawn(hangups(trigger.clone()));
    let notifications = match listen {
        Some(options) => Some(tokio::spawn(notifications(options, trigger.clone()))),
        None => {
            info!(
                "no LISTEN for reload (a transaction pooler without JOBHOST_DIRECT_URL): `jobhost reload` reaches this host at its next heartbeat; files and SIGHUP work as always"
            );
            None
        }
    };

    loop {
        let why = tokio::select! {
            _ = token.cancelled() => break,
            Some(why) = triggered.recv() => why,
            Some(why) = polled.recv() => why,
        };
        // File events ask whether content changed; SIGHUP and NOTIFY are an
        // operator's explicit request and always re-read.
        let applied = if why == "file change" {
            reloader.reload_if_changed().await
        } else {
            info!(trigger = why, "reloading");
            reloader.reload().await
        };
        if let Some(jobs) = applied {
            set_files(&reloader);
            watch_dirs(&reloader, &mut debouncer);
            if updates.send(jobs).await.is_err() {
                break;
            }
        }
    }
    signals.abort();
    if let Some(n) = notifications {
        n.abort();
    }
}

/// Records a reload request (`jobhost reload`) and notifies the hosts that
/// listen, in one transaction; returns the request's id. Hosts that do not
/// listen (behind a transaction pooler without a direct URL), and any whose
/// listener was away, see the request at their next heartbeat.
pub async fn request(pool: &sqlx::PgPool, by: &str) -> sqlx::Result<i64> {
    crate::db::in_tx!(pool, |c| {
        sqlx::query_scalar(
            "with r as (insert into jobhost.reload_requests (requested_by) values ($1) returning id)
             select r.id from r, pg_notify($2, r.id::text)",
        )
        .bind(by)
        .bind(RELOAD_CHANNEL)
        .persistent(false)
        .fetch_one(c)
        .await
    })
    .await
}

/// What `jobhost reload` tells the operator: which live hosts hear it at
/// once, which at their next heartbeat, and that there are none if so.
pub fn render_request(id: i64, fleet: &[crate::hosts::HostRow], heartbeat: Duration) -> String {
    let live: Vec<&crate::hosts::HostRow> = fleet.iter().filter(|h| h.live).collect();
    if live.is_empty() {
        return format!(
            "reload request {id} recorded, but no host is live on this database; hosts that start later load the current files\n"
        );
    }
    let names = |listening: bool| {
        live.iter()
            .filter(|h| h.listens == listening)
            .map(|h| h.id.as_str())
            .collect::<Vec<_>>()
    };
    let mut out = format!("reload request {id} sent to {} live host(s)\n", live.len());
    let now = names(true);
    if !now.is_empty() {
        out.push_str(&format!("  at once (LISTEN): {}\n", now.join(", ")));
    }
    let later = names(false);
    if !later.is_empty() {
        out.push_str(&format!(
            "  at their next heartbeat (within {}; no LISTEN behind a transaction pooler without JOBHOST_DIRECT_URL): {}\n",
            humantime::format_duration(heartbeat),
            later.join(", ")
        ));
    }
    out
}

async fn hangups(trigger: mpsc::Sender<&'static str>) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGHUP");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let _ = trigger.try_send("SIGHUP");
    }
}

async fn notifications(options: PgConnectOptions, trigger: mpsc::Sender<&'static str>) {
    loop {
        let result: sqlx::Result<()> = async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(options.clone());
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(RELOAD_CHANNEL).await?;
            loop {
                // `recv` reconnects on its own after a lost connection.
                listener.recv().await?;
                let _ = trigger.try_send("NOTIFY jobhost_reload");
            }
        }
        .await;
        if let Err(e) = result {
            warn!(error = %e, "reload listener failed; retrying in 5s");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
