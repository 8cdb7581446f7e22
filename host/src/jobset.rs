//! The job set: a validated `jobs.toml` with every job's plugin loaded and
//! checked. One function, [`load`], decides whether a set may run, for a
//! fresh start, for a hot reload and for `jobhost check` alike: a reload is
//! never held to less than a start.
//!
//! Checks, for every job whether its plugin changed or not: the plugin is a
//! component of the `xact-plugin` or `session-plugin` world (its kind); it
//! starts within the job's own `max-memory-mib` (both numbers named
//! otherwise); its kind matches the job's `lock`; the set fits the runtime's
//! instance pool, which [`runtime`] sized from the configuration at start. A
//! plugin already loaded with the same content and limit is reused, not
//! compiled again (one compiled component per distinct plugin).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use sha2::{Digest, Sha256};

use crate::config::{JobsConfig, LockMode};
use crate::metrics::Metrics;
use crate::runner::{self, Job};
use crate::runtime::{Allocation, Plugin, Runtime};

/// Instances that may start while runs go on: a plugin loading (start,
/// reload, each loaded alone) plus room for a reload's overlap.
const LOAD_SLACK: u32 = 4;
/// The smallest pooled memory: what a plugin gets at load without a job's
/// limit (the runtime's default of 64 MiB).
const MIN_POOLED_MEMORY: usize = 64 << 20;

/// The engine a host with `config` runs on: its compile cache, and, unless
/// `[host] pooling-allocator = false`, the pooling allocator sized by
/// [`allocation`].
pub fn runtime(config: &JobsConfig) -> anyhow::Result<Runtime> {
    let allocation = if config.host.pooling_allocator {
        allocation(config)
    } else {
        Allocation::OnDemand
    };
    let mut runtime = Runtime::with_allocation(Some(&config.host.compile_cache), allocation)
        .context("cannot start the WebAssembly engine")?;
    runtime.set_compile_cache_limit(config.host.compile_cache_max_bytes);
    Ok(runtime)
}

/// The instance pool `config` needs. An `xact` run instantiates its plugin
/// only once it holds a pooled connection, so at most `pool-size` of them run
/// at once; each `session` job holds its own lock connection, so each may run
/// beside them (counted twice: a run finishing as the next one starts);
/// loading takes a few more. Every slot holds the largest `max-memory-mib`.
pub fn allocation(config: &JobsConfig) -> Allocation {
    let sessions = config
        .jobs
        .iter()
        .filter(|j| j.lock == LockMode::Session)
        .count() as u32;
    let max_memory = config
        .jobs
        .iter()
        .map(|j| j.max_memory_bytes)
        .max()
        .unwrap_or(0)
        .max(MIN_POOLED_MEMORY);
    Allocation::pooled(
        config.host.pool_size + 2 * sessions + LOAD_SLACK,
        max_memory,
    )
}

/// Refuses a job the running runtime's pool cannot hold: the pool is sized
/// at start, so a reload that raises a memory limit past it needs a restart.
fn fits_memory(runtime: &Runtime, job: &crate::config::JobConfig) -> anyhow::Result<()> {
    match runtime.allocation() {
        Allocation::Pooling {
            max_memory_bytes, ..
        } if job.max_memory_bytes > max_memory_bytes => anyhow::bail!(
            "job `{}`: max-memory-mib {} is more than the instance pool's {} MiB, sized when this host started: restart the host to apply it",
            job.name,
            job.max_memory_bytes >> 20,
            max_memory_bytes >> 20
        ),
        _ => Ok(()),
    }
}

/// Refuses a job set needing more instances at once than the running
/// runtime's pool holds (more session jobs than at start): a restart resizes.
fn fits_concurrency(runtime: &Runtime, config: &JobsConfig) -> anyhow::Result<()> {
    if let (
        Allocation::Pooling { concurrent, .. },
        Allocation::Pooling {
            concurrent: needed, ..
        },
    ) = (runtime.allocation(), allocation(config))
        && needed > concurrent
    {
        anyhow::bail!(
            "this job set needs an instance pool of {needed} (pool-size + 2 per session job + {LOAD_SLACK}); this host started with {concurrent}: restart the host to apply it"
        );
    }
    Ok(())
}

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
    // Each distinct file is read and hashed once per load (a thousand jobs on
    // one plugin hash it once); its bytes are kept until they are loaded.
    let mut read: HashMap<std::path::PathBuf, (String, Option<Vec<u8>>)> = HashMap::new();
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
        let (sha, bytes) = match read.get_mut(&job.plugin) {
            Some((sha, bytes)) => (sha.clone(), bytes.take()),
            None => {
                let bytes = std::fs::read(&job.plugin).with_context(|| {
                    format!(
                        "job `{}`: cannot read plugin `{}`",
                        job.name,
                        job.plugin.display()
                    )
                })?;
                let sha = hex::encode(Sha256::digest(&bytes));
                read.insert(job.plugin.clone(), (sha.clone(), None));
                (sha, Some(bytes))
            }
        };
        fits_memory(runtime, job)?;
        let key = (sha, job.max_memory_bytes);
        let plugin = match loaded.get(&key) {
            Some(p) => p.at(&job.plugin),
            None => {
                let rt = runtime.clone();
                let (path, limit, sha) = (job.plugin.clone(), job.max_memory_bytes, key.0.clone());
                // Compiling is CPU-bound; keep it off the async workers. The
                // bytes read and hashed above are loaded as they are; the same
                // file under another memory limit is read (and hashed) again.
                let plugin = tokio::task::spawn_blocking(move || match bytes {
                    Some(bytes) => rt.load_hashed(&path, &bytes, sha, limit),
                    None => rt.load_limited(&path, limit),
                })
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
    fits_concurrency(runtime, config)?;
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::PluginFiles;

    fn config(toml: &str) -> JobsConfig {
        JobsConfig::parse(toml, Path::new("jobs.toml"), PluginFiles::NotNeeded).unwrap()
    }

    const TWO_JOBS: &str = r#"
        [host]
        pool-size = 6
        [[job]]
        name = "short"
        plugin = "a.wasm"
        every = "1m"
        [[job]]
        name = "long"
        plugin = "b.wasm"
        every = "1h"
        lock = "session"
        max-memory-mib = 128
    "#;

    #[test]
    fn the_instance_pool_is_sized_from_the_configuration() {
        assert_eq!(
            allocation(&config(TWO_JOBS)),
            Allocation::Pooling {
                concurrent: 6 + 2 + LOAD_SLACK,
                max_memory_bytes: 128 << 20,
            }
        );
        // Small limits still leave room for a plugin loading under the default.
        let small = TWO_JOBS.replace("max-memory-mib = 128", "max-memory-mib = 16");
        assert!(matches!(
            allocation(&config(&small)),
            Allocation::Pooling { max_memory_bytes, .. } if max_memory_bytes == MIN_POOLED_MEMORY
        ));
    }

    #[test]
    fn a_job_set_that_outgrows_the_pool_is_refused_until_a_restart() {
        let started = config(TWO_JOBS);
        let runtime = Runtime::with_allocation(None, allocation(&started)).unwrap();
        fits_concurrency(&runtime, &started).unwrap();
        for job in &started.jobs {
            fits_memory(&runtime, job).unwrap();
        }

        let bigger = config(&TWO_JOBS.replace("max-memory-mib = 128", "max-memory-mib = 512"));
        let e = fits_memory(&runtime, &bigger.jobs[1])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("job `long`: max-memory-mib 512") && e.contains("restart the host"),
            "{e}"
        );

        let more = config(&format!(
            "{TWO_JOBS}{}",
            (0..3)
                .map(|i| format!("[[job]]\nname = \"long{i}\"\nplugin = \"b.wasm\"\nevery = \"1h\"\nlock = \"session\"\n"))
                .collect::<String>()
        ));
        let e = fits_concurrency(&runtime, &more).unwrap_err().to_string();
        assert!(
            e.contains("needs an instance pool of 18") && e.contains("started with 12"),
            "{e}"
        );

        // Without the pooling allocator there is nothing to outgrow.
        let on_demand = Runtime::with_allocation(None, Allocation::OnDemand).unwrap();
        fits_concurrency(&on_demand, &more).unwrap();
        fits_memory(&on_demand, &bigger.jobs[1]).unwrap();
    }
}
