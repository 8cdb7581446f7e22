//! Loading a plugin: read, compile (through the engine's cache), link against
//! the `job-plugin` world, and start it once under the job's memory limit to
//! ask its kind.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Store;
use wasmtime::component::Component;

use super::Runtime;
use super::bindings::{self, JobPluginPre};
use super::store::RunState;

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
    pub(super) pre: JobPluginPre<RunState>,
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

impl Runtime {
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
}
