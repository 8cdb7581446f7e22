//! The WebAssembly side: one engine and linker for the process, one compiled and
//! pre-instantiated component per plugin, one fresh store per run.
//!
//! What a plugin can reach is exactly what the linker grants: the `sql`
//! transaction lent for the run, `log`, and a WASI environment with nothing in
//! it (no directories, no environment variables, no sockets, no inherited
//! stdio; clocks and randomness only). Its stdout and stderr are captured into
//! a capped buffer (`output.rs`: past the cap bytes are dropped and counted,
//! never refused) and logged with the job's fields after the run.
//!
//! Guest code runs on tokio's threads without blocking them: imports are async,
//! and epoch interruption makes a busy guest yield every tick, so the run's
//! timeout (a plain `tokio::time::timeout`) can stop even an endless loop.

pub mod bindings;
pub mod http;
mod log;
mod output;
pub mod sql;
mod values;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, Resource, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use bindings::types::{Context, Failure, Report};
use bindings::{JobPlugin, JobPluginPre};
use http::{HttpGrant, HttpPolicy};
pub use sql::{Closed, LockHolder, SessionHandle, TxHandle, TxScope};

/// How often the epoch advances: the granularity at which a busy guest yields.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Largest linear memory a pooled instance may have.
const MAX_POOLED_MEMORY: usize = 256 << 20;
/// Cap on captured plugin stdout/stderr per run; the rest is dropped and counted.
const OUTPUT_CAP: usize = 64 * 1024;

/// Why a plugin file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file could not be read.
    #[error("cannot read plugin `{path}`")]
    Read {
        /// The plugin file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The plugin trapped while reporting its kind.
    #[error("plugin `{path}` failed to initialise")]
    Init {
        /// The plugin file.
        path: PathBuf,
        /// What happened.
        #[source]
        source: wasmtime::Error,
    },
    /// The file is not a WebAssembly component (a core module, or garbage).
    #[error(
        "plugin `{path}` is not a WebAssembly component (build it for wasm32-wasip2 as a cdylib)"
    )]
    NotComponent {
        /// The plugin file.
        path: PathBuf,
        /// What wasmtime said.
        #[source]
        source: wasmtime::Error,
    },
    /// Instantiating the plugin needs more linear memory than the job allows.
    #[error(
        "plugin `{path}` needs {needed_mib:.1} MiB of linear memory to start, more than its limit of {limit_mib} MiB (raise `max-memory-mib` for the job)"
    )]
    MemoryLimit {
        /// The plugin file.
        path: PathBuf,
        /// What it asked for, in MiB.
        needed_mib: f64,
        /// The job's `max-memory-mib`.
        limit_mib: usize,
    },
    /// The component does not fit the `jobhost:plugin/job-plugin` world.
    #[error(
        "plugin `{path}` does not implement world `jobhost:plugin/job-plugin@0.1.0` (it must export `jobhost:plugin/job` and import only sql, log, WASI and wasi:http)"
    )]
    WrongWorld {
        /// The plugin file.
        path: PathBuf,
        /// What did not match.
        #[source]
        source: wasmtime::Error,
    },
}

/// A loaded plugin: compiled, linked and ready to instantiate.
#[derive(Clone)]
pub struct Plugin {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, hex: which version ran, in the history.
    pub sha256: String,
    /// The lock mode the plugin says it is written for (`job.kind`).
    pub kind: PluginKind,
    pre: JobPluginPre<RunState>,
}

impl Plugin {
    /// The same compiled plugin, named by another path with the same content
    /// (shared, not compiled again).
    pub fn at(&self, path: &Path) -> Plugin {
        Plugin {
            path: path.to_owned(),
            ..self.clone()
        }
    }
}

/// The lock mode a plugin is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Implements `run` (one lent transaction).
    Xact,
    /// Implements `run-long` (a session of short transactions).
    Session,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// Store data of one run.
pub struct RunState {
    job: Arc<str>,
    slot: Arc<str>,
    table: ResourceTable,
    wasi: WasiCtx,
    http: wasmtime_wasi_http::WasiHttpCtx,
    http_policy: HttpPolicy,
    output: output::CappedOutput,
    limits: MemoryLimit,
}

/// The store's resource limiter: the job's memory cap, remembering the
/// largest growth it refused so a load error can name both numbers.
pub(crate) struct MemoryLimit {
    tables: StoreLimits,
    max_bytes: usize,
    refused: Option<usize>,
}

/// The message of the trap a refused memory growth raises (the runner maps
/// it to the job's limit).
pub const MEMORY_LIMIT_TRAP: &str = "memory limit exceeded";

impl wasmtime::ResourceLimiter for MemoryLimit {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.refused = Some(self.refused.map_or(desired, |r| r.max(desired)));
            return Err(wasmtime::Error::msg(format!(
                "{MEMORY_LIMIT_TRAP}: the plugin asked for {:.1} MiB of linear memory, its limit is {} MiB",
                desired as f64 / (1 << 20) as f64,
                self.max_bytes >> 20
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.tables.table_growing(current, desired, maximum)
    }
}

impl RunState {
    /// Fresh store data for one run: an empty WASI (no files, no sockets, only
    /// the declared environment), captured stdio, the job's HTTP policy and
    /// memory limit.
    fn new(
        job: Arc<str>,
        slot: Arc<str>,
        http: Option<HttpGrant>,
        env: &[(String, String)],
        max_memory_bytes: usize,
    ) -> Self {
        let output = output::CappedOutput::new(OUTPUT_CAP);
        let wasi = wasmtime_wasi::WasiCtx::builder()
            .stdout(output.clone())
            .stderr(output.clone())
            .envs(env)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            http_policy: HttpPolicy::new(job.clone(), http),
            job,
            slot,
            table: ResourceTable::new(),
            wasi,
            output,
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            limits: MemoryLimit {
                tables: StoreLimitsBuilder::new().trap_on_grow_failure(true).build(),
                max_bytes: max_memory_bytes,
                refused: None,
            },
        }
    }
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_http::WasiHttpView for RunState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_policy,
        }
    }
}

impl bindings::types::Host for RunState {}

/// What the plugin is lent for its run.
pub enum Lent {
    /// The run's locked transaction (`xact` jobs).
    Transaction(TxHandle),
    /// A session to begin short transactions from (`session` jobs).
    Session(SessionHandle),
}

/// Per-run limits.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    /// Wall-clock budget of instantiate + run.
    pub timeout: Duration,
    /// Cap on linear memory, bytes.
    pub max_memory_bytes: usize,
}

/// How the plugin's `run` ended.
#[derive(Debug)]
pub enum Returned {
    /// `run` returned (ok or err).
    Value(Result<Report, Failure>),
    /// The guest trapped (panic, memory limit, host-side failure).
    Trap(wasmtime::Error),
    /// The timeout elapsed; the guest was interrupted.
    Timeout,
    /// The host aborted the run (shutdown past its grace period).
    Interrupted,
    /// The job's session lock was lost (its connection died); the run was
    /// interrupted.
    LockLost,
}

/// The result of one invocation, with the transaction handed back.
pub struct Invocation {
    /// How `run` ended.
    pub returned: Returned,
    /// The lent handle, back from the plugin: the runner commits or rolls back
    /// an `xact` transaction; a session's leftover transactions are rolled back.
    pub lent: Lent,
    /// Captured stdout + stderr of the guest, up to its cap.
    pub output: String,
    /// Bytes the guest wrote past the cap (dropped, not an error).
    pub output_dropped: u64,
}

/// The process-wide engine and linker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<RunState>,
    ticker_stop: Arc<AtomicBool>,
    cache: Option<wasmtime::Cache>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Builds the engine (epoch interruption on) and the linker with the
    /// capabilities every plugin gets, and starts the epoch ticker. Compiles
    /// without an on-disk cache.
    pub fn new() -> anyhow::Result<Self> {
        Self::build(None, false)
    }

    /// Like [`Runtime::new`], with compiled plugins cached in `dir`.
    ///
    /// wasmtime's cache keys each artifact by the module's content hash, the
    /// compiler settings and the wasmtime version, so a restart (or a reload
    /// of an unchanged file) skips Cranelift, and an incompatible engine never
    /// reads a stale artifact.
    pub fn with_cache(dir: &Path) -> anyhow::Result<Self> {
        Self::with_options(Some(dir), false)
    }

    /// A runtime with an optional compile cache and, with `pooling`, the
    /// pooling instance allocator: memories and instances are reserved up
    /// front and reused (copy-on-write images reset between runs), which makes
    /// instantiation much cheaper at the cost of reserved virtual memory.
    pub fn with_options(cache_dir: Option<&Path>, pooling: bool) -> anyhow::Result<Self> {
        let cache = match cache_dir {
            Some(dir) => Some(Self::open_cache(dir)?),
            None => None,
        };
        Self::build(cache, pooling)
    }

    fn open_cache(dir: &Path) -> anyhow::Result<wasmtime::Cache> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the compile cache `{}`", dir.display()))?;
        // wasmtime wants an absolute directory.
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("cannot resolve the compile cache `{}`", dir.display()))?;
        let mut config = wasmtime::CacheConfig::new();
        config.with_directory(&dir);
        wasmtime::Cache::new(config)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("cannot open the compile cache `{}`", dir.display()))
    }

    /// Compilations served from the on-disk cache so far.
    pub fn cache_hits(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.cache_hits())
    }

    fn build(cache: Option<wasmtime::Cache>, pooling: bool) -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cache(cache.clone());
        if pooling {
            // Sized for a host running up to 64 runs at once, each plugin up to
            // MAX_POOLED_MEMORY of linear memory (jobs.toml limits are lower).
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            pool.total_component_instances(64)
                .total_core_instances(64 * 8)
                .total_memories(64 * 4)
                .total_tables(64 * 4)
                .total_stacks(64)
                .max_memory_size(MAX_POOLED_MEMORY);
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // Every plugin may import wasi:http; the per-run policy refuses
        // requests of jobs without a grant.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        JobPlugin::add_to_linker::<RunState, wasmtime::component::HasSelf<RunState>>(
            &mut linker,
            |s| s,
        )?;

        // A plain thread, not a tokio task: it must tick even when every tokio
        // worker is busy, or a guest that never yields could never be stopped.
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let stop = ticker_stop.clone();
        let ticking = engine.clone();
        std::thread::Builder::new()
            .name("jobhost-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })?;
        Ok(Self {
            engine,
            linker,
            ticker_stop,
            cache,
        })
    }

    /// Reads, compiles and links a plugin, starting it under the default
    /// memory limit (64 MiB). CPU-heavy: call it off the async executor
    /// (`spawn_blocking`) when the host is running.
    pub fn load(&self, path: &Path) -> Result<Plugin, PluginError> {
        self.load_limited(path, 64 << 20)
    }

    /// [`Runtime::load`], starting the plugin (to ask its kind) under
    /// `max_memory_bytes`, the job's own limit: a plugin that cannot start
    /// within it is refused here, with both numbers, not on every run.
    pub fn load_limited(
        &self,
        path: &Path,
        max_memory_bytes: usize,
    ) -> Result<Plugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            path: path.to_owned(),
            source,
        })?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let component =
            Component::new(&self.engine, &bytes).map_err(|source| PluginError::NotComponent {
                path: path.to_owned(),
                source,
            })?;
        let wrong_world = |source| PluginError::WrongWorld {
            path: path.to_owned(),
            source,
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = JobPluginPre::new(instance_pre).map_err(wrong_world)?;
        let kind =
            self.kind_of(&pre, max_memory_bytes)
                .map_err(|(source, refused)| match refused {
                    Some(needed) => PluginError::MemoryLimit {
                        path: path.to_owned(),
                        needed_mib: needed as f64 / (1 << 20) as f64,
                        limit_mib: max_memory_bytes >> 20,
                    },
                    None => PluginError::Init {
                        path: path.to_owned(),
                        source,
                    },
                })?;
        Ok(Plugin {
            path: path.to_owned(),
            sha256,
            kind,
            pre,
        })
    }

    /// Instantiates `plugin` in a fresh store and drops it (benchmarks).
    /// Returns how long building the run's store data took (WASI context,
    /// output pipe, limits) and, separately, how long instantiation and
    /// teardown took: the second is what the pooling allocator speeds up.
    pub async fn instantiate_only(&self, plugin: &Plugin) -> anyhow::Result<(Duration, Duration)> {
        let t = std::time::Instant::now();
        let state = RunState::new("bench".into(), "".into(), None, &[], 64 << 20);
        let built = t.elapsed();
        let t = std::time::Instant::now();
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        plugin.pre.instantiate_async(&mut store).await?;
        drop(store);
        Ok((built, t.elapsed()))
    }

    /// Asks a freshly instantiated plugin for its `kind`. Runs on the caller's
    /// (blocking) thread: the call is tiny and loading is off the async
    /// executor already.
    /// On failure, also returns the memory growth the limiter refused, if any.
    fn kind_of(
        &self,
        pre: &JobPluginPre<RunState>,
        max_memory_bytes: usize,
    ) -> Result<PluginKind, (wasmtime::Error, Option<usize>)> {
        let state = RunState::new("load".into(), "".into(), None, &[], max_memory_bytes);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(200); // ~1 s of ticks: `kind` must not spin
        // No host call and no epoch yield happens here, so a plain executor on
        // this thread suffices (loading may run outside any tokio runtime).
        let kind = futures_executor::block_on(async {
            let instance = pre.instantiate_async(&mut store).await?;
            instance.jobhost_plugin_job().call_kind(&mut store).await
        })
        .map_err(|e| (e, store.data().limits.refused))?;
        Ok(match kind {
            bindings::job::JobKind::Xact => PluginKind::Xact,
            bindings::job::JobKind::Session => PluginKind::Session,
        })
    }

    /// Instantiates `plugin` in a fresh store and calls `run`, lending it
    /// `lent`. Always hands the handle back, whatever the guest did. `stop`
    /// resolves to why the run must end early (shutdown, lost lock).
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; each argument is a distinct part of the run"
    )]
    pub async fn invoke(
        &self,
        plugin: &Plugin,
        ctx: Context,
        lent: Lent,
        limits: RunLimits,
        env: &[(String, String)],
        http: Option<HttpGrant>,
        stop: impl Future<Output = Returned>,
    ) -> Invocation {
        let mut state = RunState::new(
            ctx.job.as_str().into(),
            ctx.slot.as_str().into(),
            http,
            env,
            limits.max_memory_bytes,
        );
        let output = state.output.clone();
        // The table is fresh, so the push cannot fail (it only fails when full).
        let (rep, is_session) = match lent {
            Lent::Transaction(h) => match state.table.push(h) {
                Ok(r) => (r.rep(), false),
                Err(_) => unreachable!("a fresh resource table has room for one entry"),
            },
            Lent::Session(h) => match state.table.push(h) {
                Ok(r) => (r.rep(), true),
                Err(_) => unreachable!("a fresh resource table has room for one entry"),
            },
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);

        let call = async {
            let instance = plugin.pre.instantiate_async(&mut store).await?;
            let job = instance.jobhost_plugin_job();
            if is_session {
                let lent = Resource::<SessionHandle>::new_own(rep);
                job.call_run_long(&mut store, &ctx, lent).await
            } else {
                let lent = Resource::<TxHandle>::new_own(rep);
                job.call_run(&mut store, &ctx, lent).await
            }
        };
        let returned = tokio::select! {
            r = tokio::time::timeout(limits.timeout, call) => match r {
                Ok(Ok(value)) => Returned::Value(value),
                Ok(Err(trap)) => Returned::Trap(trap),
                Err(_elapsed) => Returned::Timeout,
            },
            why = stop => why,
        };
        let table = &mut store.data_mut().table;
        // The runner's entry is only ever removed here.
        let lent = if is_session {
            let session = match table.delete(Resource::<SessionHandle>::new_own(rep)) {
                Ok(s) => s,
                Err(e) => unreachable!("the lent session vanished from the table: {e}"),
            };
            // Roll back whatever the plugin left open. A plugin that was cut
            // off may have left a statement half-way through the protocol:
            // close those connections instead (Postgres rolls back).
            let cut_off = !matches!(returned, Returned::Value(_) | Returned::Trap(_));
            for &tx in session.began() {
                if let Ok(mut h) = table.delete(Resource::<TxHandle>::new_own(tx)) {
                    if cut_off {
                        h.abandon();
                    } else {
                        h.rollback().await;
                    }
                }
            }
            Lent::Session(session)
        } else {
            match table.delete(Resource::<TxHandle>::new_own(rep)) {
                Ok(h) => Lent::Transaction(h),
                Err(e) => unreachable!("the lent transaction vanished from the table: {e}"),
            }
        };
        let (output, output_dropped) = output.contents();
        Invocation {
            returned,
            lent,
            output,
            output_dropped,
        }
    }
}
