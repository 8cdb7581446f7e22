//! Loading a plugin: read, compile (through the compile cache), link against
//! the `xact-plugin` or the `session-plugin` world (which one links is the
//! plugin's kind), and start it once under the job's memory limit.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Store;
use wasmtime::component::Component;

use super::Runtime;
use super::bindings::{SessionPlugin, SessionPluginPre, WIT_PACKAGE, XactPlugin, XactPluginPre};
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
    /// The file is not a WebAssembly component (nor a core module that
    /// carries its WIT world, which the host would wrap into one).
    #[error(
        "plugin `{path}` is not a WebAssembly component (build it as a cdylib for wasm32-wasip2, or for wasm32-unknown-unknown if it needs no WASI)"
    )]
    NotComponent {
        /// The plugin file.
        path: PathBuf,
        /// What wasmtime said.
        #[source]
        source: wasmtime::Error,
    },
    /// The component does not compile with this host's engine (invalid, or
    /// beyond its limits).
    #[error("plugin `{path}` cannot be compiled")]
    Compile {
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
    /// The component implements neither `xact-plugin` nor `session-plugin`.
    #[error(
        "plugin `{path}` implements neither world `xact-plugin` nor `session-plugin` of `{WIT_PACKAGE}` (it must export `xact-job` with `run`, or `session-job` with `run-long`, and import only sql, log, WASI and wasi:http; a plugin built against another version of the package does not link): {reason}"
    )]
    WrongWorld {
        /// The plugin file.
        path: PathBuf,
        /// What did not match, for each world.
        reason: String,
    },
}

/// A loaded plugin: compiled, linked and ready to instantiate.
#[derive(Clone)]
pub struct Plugin {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, hex: which version ran, in the history.
    pub sha256: String,
    /// The lock mode the plugin is written for: the world it implements.
    pub kind: PluginKind,
    pub(super) pre: PluginPre,
}

impl Plugin {
    /// The names of what the plugin imports from the host
    /// (`jobhost:plugin/sql@0.2.1`, `wasi:cli/stdout@0.2.0`, ...).
    pub fn imports(&self) -> Vec<String> {
        let component = match &self.pre {
            PluginPre::Xact(pre) => pre.instance_pre().component(),
            PluginPre::Session(pre) => pre.instance_pre().component(),
        };
        component
            .component_type()
            .imports(component.engine())
            .map(|(name, _)| name.to_owned())
            .collect()
    }
}

/// A plugin linked and ready to instantiate, in its world.
#[derive(Clone)]
pub(super) enum PluginPre {
    /// Implements `xact-plugin`.
    Xact(XactPluginPre<RunState>),
    /// Implements `session-plugin`.
    Session(SessionPluginPre<RunState>),
}

impl PluginPre {
    /// Instantiates the component in `store` (without calling anything).
    pub(super) async fn instantiate(
        &self,
        store: &mut Store<RunState>,
    ) -> wasmtime::Result<Started> {
        Ok(match self {
            PluginPre::Xact(pre) => Started::Xact(pre.instantiate_async(store).await?),
            PluginPre::Session(pre) => Started::Session(pre.instantiate_async(store).await?),
        })
    }
}

/// An instance of either kind of plugin.
pub(super) enum Started {
    /// Of an `xact-plugin`.
    Xact(XactPlugin),
    /// Of a `session-plugin`.
    Session(SessionPlugin),
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
    /// Implements `xact-plugin`: `run` (one lent transaction).
    Xact,
    /// Implements `session-plugin`: `run-long` (a session of short
    /// transactions).
    Session,
}

impl PluginKind {
    /// The function a plugin of this kind exports, and its WIT signature.
    fn export(self) -> (&'static str, &'static str) {
        match self {
            PluginKind::Xact => (
                "xact-job.run",
                "run: func(ctx: context, tx: borrow<transaction>) -> result<report, failure>",
            ),
            PluginKind::Session => (
                "session-job.run-long",
                "run-long: func(ctx: context, session: borrow<session>) -> result<report, failure>",
            ),
        }
    }
}

/// Whether starting a plugin failed because an export it names has another
/// signature (wasmtime checks the types of the exports the host calls when
/// it instantiates, without naming the function): not a trap of the guest.
fn is_signature_mismatch(e: &wasmtime::Error) -> bool {
    e.downcast_ref::<wasmtime::Trap>().is_none()
        && e.chain()
            .any(|c| c.to_string().starts_with("type mismatch"))
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
        self.load_bytes(path, &bytes, max_memory_bytes)
    }

    /// [`Runtime::load_limited`] of bytes in hand (`path` names them in
    /// errors and in the plugin): what `jobhost publish` validates before it
    /// stores anything.
    pub fn load_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        max_memory_bytes: usize,
    ) -> Result<Plugin, PluginError> {
        self.load_hashed(
            path,
            bytes,
            hex::encode(Sha256::digest(bytes)),
            max_memory_bytes,
        )
    }

    /// [`Runtime::load_bytes`] of bytes whose SHA-256 (hex) the caller has
    /// computed already: the job set hashes each file once, and an 18 MB
    /// component costs ~8 ms per pass.
    pub fn load_hashed(
        &self,
        path: &Path,
        bytes: &[u8],
        sha256: String,
        max_memory_bytes: usize,
    ) -> Result<Plugin, PluginError> {
        let component = self.compile(path, bytes, &sha256)?;
        let wrong_world = |reason: String| PluginError::WrongWorld {
            path: path.to_owned(),
            reason: format!("{reason}; {}", built_against(&self.engine, &component)),
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| wrong_world(format!("{e:#}")))?;
        // The world that links is the kind: nothing to ask the plugin.
        let (pre, kind) = match XactPluginPre::new(instance_pre.clone()) {
            Ok(pre) => (PluginPre::Xact(pre), PluginKind::Xact),
            Err(as_xact) => match SessionPluginPre::new(instance_pre) {
                Ok(pre) => (PluginPre::Session(pre), PluginKind::Session),
                Err(as_session) => {
                    return Err(wrong_world(format!(
                        "as xact-plugin: {as_xact:#}; as session-plugin: {as_session:#}"
                    )));
                }
            },
        };
        self.start_within(&pre, max_memory_bytes)
            .map_err(|(source, refused)| match refused {
                Some(needed) => PluginError::MemoryLimit {
                    path: path.to_owned(),
                    needed_mib: needed as f64 / (1 << 20) as f64,
                    limit_mib: max_memory_bytes >> 20,
                },
                None if is_signature_mismatch(&source) => {
                    let (function, expected) = kind.export();
                    wrong_world(format!(
                        "its function `{function}` does not have the type this host calls, `{expected}`: {source:#}"
                    ))
                }
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

    /// The compiled component of the plugin `bytes` (SHA-256 `sha256`):
    /// mapped from the compile cache, or compiled (and stored); a core
    /// module is wrapped into its lean component first.
    fn compile(&self, path: &Path, bytes: &[u8], sha256: &str) -> Result<Component, PluginError> {
        let not_component = |source| PluginError::NotComponent {
            path: path.to_owned(),
            source,
        };
        let lean = wasmparser::Parser::is_core_wasm(bytes);
        if !lean && !wasmparser::Parser::is_component(bytes) {
            return Err(not_component(wasmtime::Error::msg(
                "the file does not start with the WebAssembly magic bytes",
            )));
        }
        // A core module's artifact is keyed by the module and the host's
        // version, whose wit-component makes the component: a hit skips the
        // wrapping too (~12 ms of a 14 ms warm start for a 260 KB module).
        let key = if lean {
            hex::encode(Sha256::digest(format!(
                "lean component by jobhost {}: {sha256}",
                env!("CARGO_PKG_VERSION")
            )))
        } else {
            sha256.to_owned()
        };
        if let Some(cached) = self
            .cache
            .as_ref()
            .and_then(|cache| cache.cached(&self.engine, &key))
        {
            return Ok(cached);
        }
        let wrapped = if lean {
            Some(lean_component(bytes).map_err(not_component)?)
        } else {
            None
        };
        let source = wrapped.as_deref().unwrap_or(bytes);
        match &self.cache {
            Some(cache) => cache.compiled(&self.engine, &key, source),
            None => Component::new(&self.engine, source),
        }
        // A component that does not compile here: invalid, or beyond this
        // engine's limits (the pooling allocator's instances per component).
        .map_err(|source| PluginError::Compile {
            path: path.to_owned(),
            source,
        })
    }

    /// Instantiates the plugin once under `max_memory_bytes`, as a run
    /// would: a plugin that cannot start within its job's limit is refused at
    /// load. Runs on the caller's (blocking) thread. On failure, also returns
    /// the memory growth the limiter refused, if any.
    fn start_within(
        &self,
        pre: &PluginPre,
        max_memory_bytes: usize,
    ) -> Result<(), (wasmtime::Error, Option<usize>)> {
        let state = RunState::new("load".into(), "".into(), None, &[], max_memory_bytes);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(200); // ~1 s of ticks: start-up must not spin
        // No host call and no epoch yield happens here, so a plain executor on
        // this thread suffices (loading may run outside any tokio runtime).
        futures_executor::block_on(pre.instantiate(&mut store))
            .map(drop)
            .map_err(|e| (e, store.data().limits.refused))
    }
}

/// The component of a core module built for `wasm32-unknown-unknown` with
/// wit-bindgen (a job that needs no WASI): wit-bindgen leaves the world in a
/// custom section, and wit-component wraps the module into a component that
/// imports exactly what the module calls. Such a component has five core
/// instances (the module and two small adapters), where a `wasm32-wasip2` one
/// has 19 (most of them the WASI adapter's), so it instantiates about a fifth
/// faster (BENCHMARKS.md, rows 3 and 3l). Deterministic: the same module always makes the
/// same component, so the compile cache keeps working.
fn lean_component(module: &[u8]) -> wasmtime::Result<Vec<u8>> {
    // Without the section, the encoder would make an empty component, which
    // then fails as "the wrong world": say what is really missing.
    let has_world = wasmparser::Parser::new(0).parse_all(module).any(|p| {
        matches!(p, Ok(wasmparser::Payload::CustomSection(c)) if c.name().starts_with("component-type"))
    });
    if !has_world {
        return Err(wasmtime::Error::msg(
            "it is a core module that carries no WIT world: was it built with wit-bindgen, the SDK's `export_job!`?",
        ));
    }
    wit_component::ComponentEncoder::default()
        .module(module)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| {
            wasmtime::Error::msg(format!(
                "it is a core module, and making a component of it failed: {e:#}"
            ))
        })
}

/// Which versions of the `jobhost:plugin` package a component was built
/// against, read from the names of its imports and exports
/// (`jobhost:plugin/xact-job@0.2.1`), for load errors: a plugin built against
/// another contract says so, next to the version this host speaks.
fn built_against(engine: &wasmtime::Engine, component: &Component) -> String {
    let ty = component.component_type();
    let names = ty
        .imports(engine)
        .map(|(name, _)| name)
        .chain(ty.exports(engine).map(|(name, _)| name));
    let mut versions: Vec<String> = names
        .filter_map(|name| {
            let rest = name.strip_prefix("jobhost:plugin/")?;
            let version = rest.split_once('@').map_or("(unversioned)", |(_, v)| v);
            Some(format!("jobhost:plugin@{version}"))
        })
        .collect();
    versions.sort();
    versions.dedup();
    if versions.is_empty() {
        format!("the plugin uses no interface of jobhost:plugin; this host speaks {WIT_PACKAGE}")
    } else {
        format!(
            "the plugin was built against {}; this host speaks {WIT_PACKAGE}",
            versions.join(" and ")
        )
    }
}
