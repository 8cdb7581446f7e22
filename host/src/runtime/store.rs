//! The data of one run's store: an empty WASI, captured stdio, the job's HTTP
//! policy and memory limiter, and the resource table holding the lent handle.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::http::{HttpGrant, HttpPolicy};
use super::{OUTPUT_CAP, bindings, output};

/// Store data of one run.
pub struct RunState {
    pub(super) job: Arc<str>,
    pub(super) slot: Arc<str>,
    pub(super) table: ResourceTable,
    pub(super) wasi: WasiCtx,
    pub(super) http: wasmtime_wasi_http::WasiHttpCtx,
    pub(super) http_policy: HttpPolicy,
    pub(super) output: output::CappedOutput,
    pub(super) limits: MemoryLimit,
    /// The plugin's latest error-level log message: a plugin built without
    /// WASI has no stderr, so the SDK logs a panic there (the trap report
    /// looks for the guest's error in it when the output has none).
    pub(super) last_error: Option<String>,
}

/// The store's resource limiter: the job's memory cap, remembering the
/// largest growth it refused so a load error can name both numbers.
pub(crate) struct MemoryLimit {
    pub(super) tables: StoreLimits,
    pub(super) max_bytes: usize,
    pub(super) refused: Option<usize>,
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
    pub(super) fn new(
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
            last_error: None,
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
