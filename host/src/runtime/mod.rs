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
//!
//! The engine and linker live here; the rest has a file each:
//!
//! - `plugin.rs`: loading a component (compile, link against the world,
//!   start it under the job's memory limit to ask its kind) and its errors;
//! - `cache.rs`: the compile cache, compiled plugins mapped from their files;
//! - `store.rs`: the data of one run's store (WASI, output, HTTP policy,
//!   memory limiter);
//! - `invoke.rs`: one run's instance, made before its handle exists (while
//!   the run's opening query is on the wire), then one call of
//!   `run`/`run-long` with the lent handle, the timeout and the early stops;
//! - `sql.rs`, `values.rs`, `log.rs`, `http.rs`, `output.rs`: the
//!   capabilities a plugin is granted; `packed.rs` the one-buffer layout of
//!   `query-packed`'s rows.

pub mod bindings;
mod cache;
pub mod http;
mod invoke;
mod log;
mod output;
mod packed;
mod plugin;
pub mod sql;
mod store;
mod trap;
mod values;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::Engine;
use wasmtime::component::Linker;

use bindings::XactPlugin;
pub use cache::CompileCache;
#[cfg(feature = "bench")]
pub use invoke::Floor;
pub use invoke::{Instance, Invocation, Lent, Returned, RunLimits, Spent};
pub use plugin::{Plugin, PluginError, PluginKind};
pub use sql::{Closed, LockHolder, SessionHandle, TxHandle, TxScope};
pub use store::{MEMORY_LIMIT_TRAP, RunState};
pub use trap::TrapReport;

/// Set (to anything) to have the engine write a perf map of plugin code.
pub const PERFMAP_ENV: &str = "JOBHOST_PERFMAP";
/// How often the epoch advances: the granularity at which a busy guest yields.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Largest linear memory an instance of the default pool may have
/// ([`Runtime::with_options`]).
pub const MAX_POOLED_MEMORY: usize = 256 << 20;
/// Pool slots per component instance (see [`Runtime::with_allocation`]).
const CORE_INSTANCES_PER_COMPONENT: u32 = 32;
const MEMORIES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 16;
/// Bytes of a pooled memory or table restored by memcpy rather than unmapped
/// when its slot is reused.
const KEEP_RESIDENT: usize = 16 << 20;
/// Cap on captured plugin stdout/stderr per run; the rest is dropped and counted.
const OUTPUT_CAP: usize = 64 * 1024;

/// The process-wide engine and linker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<RunState>,
    ticker_stop: Arc<AtomicBool>,
    cache: Option<CompileCache>,
    allocation: Allocation,
    /// Instances made for runs so far ([`Runtime::instances_made`]).
    instances: std::sync::atomic::AtomicU64,
}

/// How a runtime allocates instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Each instance maps its memory when it starts (`mmap`), and unmaps it
    /// when it ends.
    OnDemand,
    /// wasmtime's pooling allocator: slots for `concurrent` instances at once
    /// (runs, and plugins starting at load), each memory up to
    /// `max_memory_bytes`, reserved up front and reused.
    Pooling {
        /// Component instances alive at once.
        concurrent: u32,
        /// The largest linear memory a slot holds.
        max_memory_bytes: usize,
    },
}

impl Allocation {
    /// Pooling for `concurrent` instances of at most `max_memory_bytes`.
    pub fn pooled(concurrent: u32, max_memory_bytes: usize) -> Self {
        Allocation::Pooling {
            concurrent: concurrent.max(1),
            max_memory_bytes,
        }
    }
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
        Self::build(None, Allocation::OnDemand)
    }

    /// Like [`Runtime::new`], with compiled plugins cached in `dir`
    /// ([`CompileCache`]): each artifact is keyed by the component's content
    /// hash and the engine's settings and version, so a restart (or a reload
    /// of an unchanged file) skips Cranelift, and an incompatible engine never
    /// reads a stale artifact.
    pub fn with_cache(dir: &Path) -> anyhow::Result<Self> {
        Self::with_options(Some(dir), false)
    }

    /// Sets the size of the compile cache above which its least recently
    /// used artifacts are removed (default
    /// [`CompileCache::DEFAULT_LIMIT_BYTES`]); nothing without a cache.
    pub fn set_compile_cache_limit(&mut self, bytes: u64) {
        if let Some(cache) = self.cache.as_mut() {
            cache.set_soft_limit(bytes);
        }
    }

    /// A runtime with an optional compile cache and, with `pooling`, the
    /// pooling instance allocator at its default size ([`Allocation::pooled`]
    /// for 64 runs at once).
    pub fn with_options(cache_dir: Option<&Path>, pooling: bool) -> anyhow::Result<Self> {
        let allocation = if pooling {
            Allocation::pooled(64, MAX_POOLED_MEMORY)
        } else {
            Allocation::OnDemand
        };
        Self::with_allocation(cache_dir, allocation)
    }

    /// A runtime with an optional compile cache and the given allocation.
    pub fn with_allocation(
        cache_dir: Option<&Path>,
        allocation: Allocation,
    ) -> anyhow::Result<Self> {
        Self::build(cache_dir, allocation)
    }

    /// How many instances this runtime has made for runs (tests, benchmarks:
    /// a run that is skipped may or may not have made one).
    pub fn instances_made(&self) -> u64 {
        self.instances.load(Ordering::Relaxed)
    }

    /// How this runtime allocates instances (what a reload must fit in).
    pub fn allocation(&self) -> Allocation {
        self.allocation
    }

    /// Compilations served from the on-disk cache so far.
    pub fn cache_hits(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.hits())
    }

    fn build(cache_dir: Option<&Path>, allocation: Allocation) -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // A profiler sees a plugin's compiled code as bare addresses unless
        // the engine says what lies there: with `JOBHOST_PERFMAP` set, each
        // function it compiles or loads is written to `/tmp/perf-<pid>.map`
        // (Linux perf's format, read by `perf report`; BENCHMARKS.md maps a
        // callgrind profile with it). An environment variable, like
        // `RUST_LOG`: a diagnostic of one process, not a setting of the fleet.
        if std::env::var_os(PERFMAP_ENV).is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        if let Allocation::Pooling {
            concurrent,
            max_memory_bytes,
        } = allocation
        {
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            // Per component: a Rust plugin is a handful of core instances (the
            // WASI adapter's among them); a componentize-py one about a dozen,
            // with several tables. Generous per-component maxima keep a plugin
            // that needs more from failing at run time: it fails at load.
            pool.total_component_instances(concurrent)
                .total_core_instances(concurrent * CORE_INSTANCES_PER_COMPONENT)
                .total_memories(concurrent * MEMORIES_PER_COMPONENT)
                .total_tables(concurrent * TABLES_PER_COMPONENT)
                .total_stacks(concurrent)
                .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
                .max_memories_per_component(MEMORIES_PER_COMPONENT)
                .max_tables_per_component(TABLES_PER_COMPONENT)
                .max_memory_size(max_memory_bytes)
                // A slot goes back to the pool with the pages its last run
                // dirtied restored from the module's image by memcpy (found
                // with Linux's PAGEMAP_SCAN, 6.7+; elsewhere `auto` is off),
                // instead of unmapped: the next run of the same plugin starts
                // without a page fault per page its runtime touches (a Python
                // interpreter writes to hundreds). Measured: instantiation
                // 10 → 5 µs for a Rust plugin, a JavaScript run 1.65 → 1.25 ms
                // (BENCHMARKS.md rows 3 and 9).
                .pagemap_scan(wasmtime::Enabled::Auto)
                .linear_memory_keep_resident(KEEP_RESIDENT)
                .table_keep_resident(KEEP_RESIDENT);
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&config)?;
        let cache = cache_dir
            .map(|dir| CompileCache::open(dir, &engine))
            .transpose()?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // Every plugin may import wasi:http; the per-run policy refuses
        // requests of jobs without a grant.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        // Both worlds import the same interfaces: one registration serves both.
        XactPlugin::add_to_linker::<RunState, wasmtime::component::HasSelf<RunState>>(
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
            allocation,
            instances: Default::default(),
        })
    }
}
