//! The job set: a validated `jobs.toml` with every job's plugin loaded and
//! checked. One function, [`load`], decides whether a set may run, for a
//! fresh start, for a hot reload and for `jobhost check` alike: a reload is
//! never held to less than a start.
//!
//! Checks, for every job whether its plugin changed or not: the plugin is a
//! component of the `xact-plugin` or `session-plugin` world (its kind); it
//! starts within the job's own `max-memory-mib` (both numbers named
//! otherwise); its kind matches the job's `lock`. A plugin already loaded with the same content and limit is
//! reused, not compiled again (one compiled component per distinct plugin).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use sha2::{Digest, Sha256};

use crate::config::JobsConfig;
use crate::metrics::Metrics;
use crate::runner::{self, Job};
use crate::runtime::{Plugin, Runtime};

/// Loads and checks every job of `config`. `previous` is the running set
/// (empty at start): plugins it already has with the same content and memory
/// limit are reused. The first problem stops it, naming the job and file.
/// Counts each compilation in `metrics`, if given.
pub async fn load(
    runtime: &Arc<Runtime>,
    config: &JobsConfig,
    previous: &[Job],
    metrics: Option<&Metrics>,
) -> anyhow::Result<Vec<Job>> {
    config
        .refuse_behind_pooler()
        .map_err(|e| anyhow::anyhow!(e))?;
    // (content sha256, memory limit) → the plugin loaded for it.
    let mut loaded: HashMap<(String, usize), Plugin> = previous
        .iter()
        .map(|j| {
            (
                (j.plugin.sha256.clone(), j.config.max_memory_bytes),
                j.plugin.clone(),
            )
        })
        .collect();
    let mut jobs = Vec::with_capacity(config.jobs.len());
    let mut hashed: HashMap<std::path::PathBuf, String> = HashMap::new();
    for job in &config.jobs {
        if let Some(name) = &job.published
            && job
                .plugin
                .to_str()
                .is_some_and(|p| p.starts_with(crate::config::PUBLISHED))
        {
            anyhow::bail!(
                "job `{}`: plugin `{}{name}` was not fetched from the database",
                job.name,
                crate::config::PUBLISHED
            );
        }
        // Each distinct file is read and hashed once per load (a thousand
        // jobs on one plugin hash it once).
        let sha = match hashed.get(&job.plugin) {
            Some(sha) => sha.clone(),
            None => {
                let sha = file_sha256(&job.plugin).with_context(|| {
                    format!(
                        "job `{}`: cannot read plugin `{}`",
                        job.name,
                        job.plugin.display()
                    )
                })?;
                hashed.insert(job.plugin.clone(), sha.clone());
                sha
            }
        };
        let key = (sha, job.max_memory_bytes);
        let plugin = match loaded.get(&key) {
            Some(p) => p.at(&job.plugin),
            None => {
                let rt = runtime.clone();
                let (path, limit) = (job.plugin.clone(), job.max_memory_bytes);
                // Compiling is CPU-bound; keep it off the async workers.
                let plugin = tokio::task::spawn_blocking(move || rt.load_limited(&path, limit))
                    .await
                    .context("plugin loader panicked")?;
                if let Some(m) = metrics {
                    m.plugin_loaded(plugin.is_ok());
                }
                let plugin = plugin.with_context(|| format!("job `{}`", job.name))?;
                if plugin.sha256 != key.0 {
                    // Written between our hash and the loader's read: the
                    // loader's bytes are what runs, and they will be seen as
                    // a change again.
                    tracing::debug!(job = %job.name, "plugin changed while loading");
                }
                loaded.insert((plugin.sha256.clone(), limit), plugin.clone());
                plugin
            }
        };
        runner::check_plugin_kind(job, &plugin)
            .map_err(|e| anyhow::anyhow!("job `{}`: {e}", job.name))?;
        jobs.push(Job {
            config: job.clone(),
            plugin,
        });
    }
    Ok(jobs)
}

/// The job set a host runs now: the configuration it started with (host
/// settings) and the jobs as last loaded (hot reload replaces them). Shared
/// by the reload path, the stuck-lock watch and the dashboard.
#[derive(Clone)]
pub struct Current {
    base: Arc<JobsConfig>,
    jobs: Arc<std::sync::RwLock<Vec<Job>>>,
}

impl Current {
    /// `jobs`, loaded from `base`.
    pub fn new(base: JobsConfig, jobs: Vec<Job>) -> Self {
        Self {
            base: Arc::new(base),
            jobs: Arc::new(std::sync::RwLock::new(jobs)),
        }
    }

    /// Replaces the jobs (a reload was applied).
    pub fn set(&self, jobs: Vec<Job>) {
        *self.jobs.write().unwrap_or_else(|p| p.into_inner()) = jobs;
    }

    /// The jobs as loaded now.
    pub fn jobs(&self) -> Vec<Job> {
        self.jobs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The configuration with the jobs as loaded now.
    pub fn config(&self) -> JobsConfig {
        JobsConfig {
            jobs: self.jobs().into_iter().map(|j| j.config).collect(),
            ..(*self.base).clone()
        }
    }
}

/// SHA-256 of a file's content, hex (what `plugin_sha256` records).
pub fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}
