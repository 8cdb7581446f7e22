//! Hot reload: new plugin versions and `jobs.toml` edits without a restart.
//!
//! Triggers: debounced file-system events on `jobs.toml` and every plugin file
//! (their directories are watched, so editors' and deploy tools' write-then-
//! rename is seen), SIGHUP, and `NOTIFY jobhost_reload` (what `jobhost reload`
//! sends: every host of the fleet reloads).
//!
//! A reload re-reads and validates `jobs.toml` and compiles every plugin whose
//! content hash changed, off the scheduling path (`spawn_blocking`). Nothing is
//! swapped in that does not load: an invalid `jobs.toml` keeps the running
//! configuration; a plugin that is not a component, has the wrong world, or was
//! caught half-written keeps the job on its previous version. Either way the
//! error names the file, and the next change of the file is tried again. What
//! loads is handed to the scheduler, which swaps it in between runs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::JobsConfig;
use crate::runner::Job;
use crate::runtime::Runtime;

/// The `NOTIFY` channel `jobhost reload` signals.
pub const RELOAD_CHANNEL: &str = "jobhost_reload";

/// Re-reads the configuration and plugins, keeping what works.
pub struct Reloader {
    config_path: PathBuf,
    runtime: Arc<Runtime>,
    jobs: Vec<Job>,
}

impl Reloader {
    /// A reloader whose current state is `jobs` (as loaded at start).
    pub fn new(config_path: &Path, runtime: Arc<Runtime>, jobs: Vec<Job>) -> Self {
        Self {
            config_path: config_path.to_owned(),
            runtime,
            jobs,
        }
    }

    /// `jobs.toml` and every current plugin file.
    pub fn files(&self) -> Vec<PathBuf> {
        std::iter::once(self.config_path.clone())
            .chain(self.jobs.iter().map(|j| j.config.plugin.clone()))
            .collect()
    }

    /// Re-reads everything; returns the new job set if anything changed.
    pub async fn reload(&mut self) -> Option<Vec<Job>> {
        let config = match JobsConfig::from_file(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                error!(file = %self.config_path.display(), error = %chain(&e), "reload rejected: invalid jobs.toml; keeping the running configuration");
                return None;
            }
        };
        let mut next = Vec::with_capacity(config.jobs.len());
        for job in config.jobs {
            let old = self.jobs.iter().find(|j| j.config.name == job.name);
            let unchanged = match file_sha256(&job.plugin) {
                Ok(sha) => old.filter(|o| o.plugin.sha256 == sha && o.plugin.path == job.plugin),
                Err(_) => None,
            };
            let plugin = match unchanged {
                Some(o) => o.plugin.clone(),
                None => {
                    let rt = self.runtime.clone();
                    let path = job.plugin.clone();
                    match tokio::task::spawn_blocking(move || rt.load(&path)).await {
                        Ok(Ok(p)) if let Err(why) = crate::runner::check_plugin_kind(&job, &p) => {
                            error!(job = %job.name, file = %job.plugin.display(), error = %why, "reload rejected: keeping the previous version of the plugin");
                            if let Some(o) = old {
                                next.push(o.clone());
                            }
                            continue;
                        }
                        Ok(Ok(p)) => {
                            info!(job = %job.name, file = %p.path.display(), plugin_sha256 = %p.sha256, "plugin version loaded");
                            p
                        }
                        Ok(Err(e)) => {
                            error!(job = %job.name, file = %job.plugin.display(), error = %chain(&e), "reload rejected: keeping the previous version of the plugin");
                            if let Some(o) = old {
                                next.push(o.clone());
                            }
                            continue;
                        }
                        Err(e) => {
                            error!(job = %job.name, error = %e, "plugin loader panicked");
                            if let Some(o) = old {
                                next.push(o.clone());
                            }
                            continue;
                        }
                    }
                }
            };
            next.push(Job {
                config: job,
                plugin,
            });
        }
        let same = next.len() == self.jobs.len()
            && next
                .iter()
                .zip(&self.jobs)
                .all(|(a, b)| a.config == b.config && a.plugin.sha256 == b.plugin.sha256);
        if same {
            return None;
        }
        info!(jobs = next.len(), "reload applied");
        self.jobs = next.clone();
        Some(next)
    }
}

fn file_sha256(path: &Path) -> std::io::Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
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

/// Reloads on every trigger until `token` is cancelled, sending each changed
/// job set to `updates`. `database_url` enables `NOTIFY jobhost_reload`.
pub async fn watch(
    mut reloader: Reloader,
    watch_files: bool,
    debounce: Duration,
    database_url: Option<String>,
    updates: mpsc::Sender<Vec<Job>>,
    token: CancellationToken,
) {
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
            if events
                .iter()
                .any(|e| e.paths.iter().any(|p| wanted.contains(&canonical(p))))
            {
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

    let signals = tokio::spawn(hangups(trigger.clone()));
    let notifications = database_url.map(|url| tokio::spawn(notifications(url, trigger.clone())));

    loop {
        let why = tokio::select! {
            _ = token.cancelled() => break,
            Some(why) = triggered.recv() => why,
        };
        info!(trigger = why, "reloading");
        if let Some(jobs) = reloader.reload().await {
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

async fn notifications(url: String, trigger: mpsc::Sender<&'static str>) {
    loop {
        let result: sqlx::Result<()> = async {
            let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
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
