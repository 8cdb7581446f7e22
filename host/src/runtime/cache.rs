//! The compile cache: each plugin's compiled artifact, stored as wasmtime
//! serialized it, under a key (the plugin's SHA-256: `plugin.rs` says which)
//! and a hash of the engine's settings, and mapped straight from its file at
//! the next load.
//!
//! Why not wasmtime's own cache (`Config::cache`): it stores each artifact
//! zstd-compressed, and a hit decompresses the whole artifact into memory,
//! hashes the component's bytes again for the key, and copies every
//! initialised linear memory into a memfd of its own. For an 18 MB
//! componentize-py plugin (a 35 MB artifact, 11 MB compressed) that was
//! ~150 ms of a warm start's ~200 ms, and 32 MB of the host's RSS
//! (BENCHMARKS.md, rows 6″ and 8: 10 jobs on it now start in ~45 ms, in
//! 21 MB rather than 53). A file that
//! `Component::deserialize_file` maps is read by the kernel as pages are
//! touched, its code is made executable in place, and its memory images are
//! mapped copy-on-write from the same file: several hosts on one machine
//! share its pages through the page cache.
//!
//! The price is disk: artifacts are stored uncompressed (about three times
//! wasmtime's compressed size, two to three times the plugin's `.wasm`).
//! The directory is kept under a limit (`[host] compile-cache-max-mib`) by
//! removing the least recently used artifacts after each write.
//!
//! Files here are only ever created whole (written to a temporary name,
//! then renamed), never changed in place: a host that maps one can rely on
//! it while another host writes or removes an artifact (a removed file stays
//! readable for as long as it is mapped).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use wasmtime::Engine;
use wasmtime::component::Component;

/// A temporary file older than this was left by a writer that died.
const STALE_TEMP: Duration = Duration::from_secs(3600);
const ARTIFACT: &str = "cwasm";
const TEMP: &str = "tmp";

/// A directory of compiled components (see the module's docs).
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    /// The engine's compatibility hash, in every file name: an engine of
    /// another wasmtime version or with other settings never opens an
    /// artifact it cannot run.
    engine_tag: String,
    soft_limit: u64,
    hits: AtomicUsize,
}

impl CompileCache {
    /// Total size of the artifacts above which the least recently used are
    /// removed, unless configured. A componentize-py artifact is ~35 MB, a
    /// Rust one under 1 MB: room for fifty versions of a Python plugin,
    /// thousands of Rust ones.
    pub const DEFAULT_LIMIT_BYTES: u64 = 2 << 30;

    /// Opens (creating it if need be) the cache in `dir` for `engine`.
    pub fn open(dir: &Path, engine: &Engine) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the compile cache `{}`", dir.display()))?;
        use std::hash::{Hash as _, Hasher as _};
        // SipHash with fixed keys: the same engine gives the same name for as
        // long as the host's binary does not change (a new Rust release
        // might rename every artifact once: a compile each, no harm).
        let mut h = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        remove_wasmtime_cache(dir);
        Ok(Self {
            dir: dir.to_owned(),
            engine_tag: format!("{:016x}", h.finish()),
            soft_limit: Self::DEFAULT_LIMIT_BYTES,
            hits: AtomicUsize::new(0),
        })
    }

    /// Sets the size limit.
    pub fn set_soft_limit(&mut self, bytes: u64) {
        self.soft_limit = bytes;
    }

    /// Loads served from a stored artifact so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// The artifact stored under `key` for this engine, mapped from its
    /// file; `None` if there is none, or if it cannot be used (then it is
    /// logged, and the caller compiles it again: [`CompileCache::compiled`]
    /// replaces it).
    pub fn cached(&self, engine: &Engine, key: &str) -> Option<Component> {
        let path = self.path(key);
        if !path.exists() {
            return None;
        }
        match map(engine, &path) {
            Ok(component) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                // Its age for the pruning: used now.
                let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now()));
                Some(component)
            }
            Err(e) => {
                tracing::warn!(
                    file = %path.display(),
                    error = %format!("{e:#}"),
                    "a cached compiled plugin cannot be used; compiling it again"
                );
                None
            }
        }
    }

    /// Compiles the component `bytes`, stores it under `key` and maps it. A
    /// store that fails (a full disk, a read-only directory) costs the next
    /// start a compile, and is logged; the component compiled is returned
    /// all the same.
    pub fn compiled(
        &self,
        engine: &Engine,
        key: &str,
        bytes: &[u8],
    ) -> wasmtime::Result<Component> {
        let path = self.path(key);
        let compiled = Component::new(engine, bytes)?;
        match self.store(&path, &compiled) {
            // Mapped from the file rather than kept as compiled: its code and
            // memory images then live in the page cache like a warm start's,
            // not in the process's own memory.
            Ok(()) => map(engine, &path).or(Ok(compiled)),
            Err(e) => {
                tracing::warn!(
                    file = %path.display(),
                    error = %format!("{e:#}"),
                    "cannot store a compiled plugin in the compile cache; the next start compiles it again"
                );
                Ok(compiled)
            }
        }
    }

    /// The file of `key`'s artifact for this engine.
    fn path(&self, key: &str) -> PathBuf {
        self.dir
            .join(format!("{key}-{}.{ARTIFACT}", self.engine_tag))
    }

    fn store(&self, path: &Path, component: &Component) -> anyhow::Result<()> {
        let bytes = component.serialize()?;
        // Unique per writer: two loads of one plugin may race (in this
        // process or in another host sharing the directory); the last rename
        // wins, and both wrote the same bytes.
        static WRITES: AtomicUsize = AtomicUsize::new(0);
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let temp = path.with_extension(format!("{}-{n}.{TEMP}", std::process::id()));
        let written = (|| {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e).with_context(|| format!("cannot write `{}`", path.display()));
        }
        self.prune(path);
        Ok(())
    }

    /// Removes the least recently used artifacts (never `keep`, just
    /// written) while the directory holds more than the soft limit, and
    /// temporary files of writers that died. Best effort: what cannot be
    /// read or removed is left.
    fn prune(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        let mut artifacts = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let modified = meta.modified().unwrap_or(now);
            match path.extension().and_then(|e| e.to_str()) {
                Some(ARTIFACT) => artifacts.push((modified, meta.len(), path)),
                Some(TEMP) if now.duration_since(modified).unwrap_or_default() > STALE_TEMP => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {}
            }
        }
        let mut total: u64 = artifacts.iter().map(|(_, len, _)| len).sum();
        artifacts.sort(); // oldest first
        for (_, len, path) in artifacts {
            if total <= self.soft_limit {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                tracing::info!(file = %path.display(), bytes = len, "compile cache: removed the least recently used artifact");
                total -= len;
            }
        }
    }
}

/// Removes what earlier versions of the host left in `dir`: wasmtime's own
/// cache (`modules/wasmtime-<version>/…`, compressed artifacts this host no
/// longer reads). Only a `modules` directory holding nothing but wasmtime's
/// is touched.
fn remove_wasmtime_cache(dir: &Path) {
    let modules = dir.join("modules");
    let Ok(entries) = std::fs::read_dir(&modules) else {
        return;
    };
    let names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
    if names
        .iter()
        .all(|n| n.to_string_lossy().starts_with("wasmtime-"))
    {
        match std::fs::remove_dir_all(&modules) {
            Ok(()) => {
                tracing::info!(dir = %modules.display(), "compile cache: removed the previous format's artifacts")
            }
            Err(e) => {
                tracing::warn!(dir = %modules.display(), error = %e, "compile cache: cannot remove the previous format's artifacts")
            }
        }
    }
}

/// Maps a stored artifact.
#[allow(
    unsafe_code,
    reason = "wasmtime cannot check a compiled artifact's code; see SAFETY"
)]
fn map(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: `deserialize_file` trusts the file to be what
    // `Component::serialize` wrote for a compatible engine, and to stay
    // unchanged while it is mapped. Files of this directory are written only
    // by `CompileCache::store`, whole (renamed into place, never modified:
    // see the module's docs), from a component this host compiled; wasmtime
    // itself refuses a file of another version or of incompatible settings.
    // The directory is the host's own, configured by its operator, as
    // trusted as the host's binary (wasmtime's own cache makes the same
    // assumption of its directory).
    unsafe { Component::deserialize_file(engine, path) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_formats_artifacts_are_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("jobhost-cache-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let old = dir.join("modules/wasmtime-48.0.8");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(
            old.join("8glDHqrG8uXVFrL396kobohFgSJkskuGzVKpxfbJMhA"),
            b"zstd",
        )
        .unwrap();
        let engine = Engine::default();
        CompileCache::open(&dir, &engine).unwrap();
        assert!(!dir.join("modules").exists());

        // A `modules` directory that is not (only) wasmtime's stays.
        let other = dir.join("modules/mine");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::create_dir_all(&old).unwrap();
        CompileCache::open(&dir, &engine).unwrap();
        assert!(other.exists() && old.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
