//! Support for the integration tests in `it/`: paths of the guest components
//! that `build.rs` compiles from `plugins/`.

/// Paths of the compiled guest components.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// A directory of a test's (or the benchmark's) own under the system's
/// temporary directory, named `jobhost-{tag}-…`: a `jobs.toml`, plugins,
/// hosts' logs. Removed when dropped, so a run of the suite leaves nothing
/// in `/tmp`; kept when dropped by a failing test (a panic unwinding), and
/// named on stderr, because its host logs are what one reads next.
///
/// Declare it before the hosts that write into it: locals drop in reverse
/// order, so the hosts stop before their directory goes.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    /// A new, empty directory `jobhost-{tag}-<random>`: a name no other
    /// test, or run of the suite, shares.
    pub fn new(tag: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("jobhost-{tag}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make a scratch directory `jobhost-{tag}-…`: {e}"));
        Scratch(dir)
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.disable_cleanup(true);
            eprintln!("kept {} (the test failed)", self.0.path().display());
        }
    }
}

/// `url` with its database name replaced by `db` (query string kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// The test probe component with a custom section (`jobhost-test-version`,
/// `tag`) appended: a valid component that behaves the same, with other
/// bytes and so another SHA-256 (another version of "the same" plugin).
pub fn probe_variant(tag: &str) -> Vec<u8> {
    let name = b"jobhost-test-version";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    assert!(payload.len() < 128, "one LEB128 byte of section size");
    let mut out = std::fs::read(guests::TEST_CORE_PROBE).expect("the probe component");
    out.push(0); // custom section
    out.push(payload.len() as u8);
    out.extend_from_slice(&payload);
    out
}

/// A job configuration for tests and benchmarks: `xact`, every 1 s, 20 s
/// timeout, 64 MiB, no role, no HTTP, no retries; `config` as given.
pub fn job_config(name: &str, plugin: &str, config: &[(&str, &str)]) -> jobhost::config::JobConfig {
    use std::time::Duration;
    jobhost::config::JobConfig {
        name: name.into(),
        plugin: plugin.into(),
        published: None,
        schedule: jobhost::schedule::Schedule::every(Duration::from_secs(1)),
        lock: jobhost::config::LockMode::Xact,
        lock_key: jobhost::lock::LockKey::derive(name),
        timeout: Duration::from_secs(20),
        max_memory_bytes: 64 << 20,
        max_rows: 10_000,
        role: None,
        env: Vec::new(),
        retry: jobhost::config::RetryPolicy {
            max_attempts: 1,
            backoff: Duration::from_secs(10),
        },
        catch_up: None,
        heartbeat: Duration::from_secs(2),
        http: None,
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

pub mod wire_tap;
pub use wire_tap::WireTap;

/// A PgBouncer process of a test's (or the benchmark's) own: Debian's
/// `pgbouncer` on a free loopback port in front of the server
/// `DATABASE_URL` names, stopped when dropped.
pub mod pgbouncer {
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A free loopback port (bound and released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Whether the `pgbouncer` binary is installed.
    pub fn installed() -> bool {
        Command::new("pgbouncer")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A PgBouncer process of the test's own.
    pub struct PgBouncer {
        child: Child,
        dir: PathBuf,
        port: u16,
    }

    impl PgBouncer {
        /// Starts PgBouncer in `pool_mode` in front of the server `DATABASE_URL`
        /// names, with `default_pool_size` server connections per database.
        /// `ignore` lists the startup parameters it lets through unanswered.
        pub fn start(tag: &str, pool_mode: &str, pool_size: u32, ignore: &str) -> PgBouncer {
            Self::start_for(tag, pool_mode, pool_size, ignore, &[])
        }

        /// [`start`](Self::start), letting `users` in besides `postgres` (job
        /// roles, which log in themselves).
        pub fn start_for(
            tag: &str,
            pool_mode: &str,
            pool_size: u32,
            ignore: &str,
            users: &[&str],
        ) -> PgBouncer {
            let url: sqlx::postgres::PgConnectOptions =
                std::env::var("DATABASE_URL").unwrap().parse().unwrap();
            let port = free_port();
            let dir = std::env::temp_dir()
                .join(format!("jobhost-pgbouncer-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let users: String = std::iter::once("postgres")
                .chain(users.iter().copied())
                .map(|u| format!("\"{u}\" \"\"\n"))
                .collect();
            std::fs::write(dir.join("users.txt"), users).unwrap();
            std::fs::write(
                dir.join("pgbouncer.ini"),
                format!(
                    "[databases]\n* = host={} port={}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\npool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 100\nignore_startup_parameters = {ignore}\nlogfile = {}\npidfile = {}\n",
                    url.get_host(),
                    url.get_port(),
                    dir.join("users.txt").display(),
                    dir.join("pgbouncer.log").display(),
                    dir.join("pgbouncer.pid").display(),
                ),
            )
            .unwrap();
            // PgBouncer refuses to run as root: run it as the `postgres` user,
            // which the Debian package creates.
            let mut cmd = if is_root() {
                Command::new("runuser")
            } else {
                Command::new("pgbouncer")
            };
            if is_root() {
                Command::new("chown")
                    .args(["-R", "postgres", &dir.display().to_string()])
                    .status()
                    .unwrap();
                cmd.args(["-u", "postgres", "--", "pgbouncer"]);
            }
            let child = cmd
                .arg(dir.join("pgbouncer.ini"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("pgbouncer (Debian package `pgbouncer`, installed by .ci/run)");
            let bouncer = PgBouncer { child, dir, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "pgbouncer did not listen: {}",
                    std::fs::read_to_string(bouncer.dir.join("pgbouncer.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            bouncer
        }

        /// `url` with PgBouncer's address in place of the server's.
        pub fn url(&self, database_url: &str) -> String {
            let mut options: sqlx::postgres::PgConnectOptions = database_url.parse().unwrap();
            options = options.host("127.0.0.1").port(self.port);
            format!(
                "postgres://{}@127.0.0.1:{}/{}",
                options.get_username(),
                self.port,
                options.get_database().unwrap_or("postgres")
            )
        }
    }

    impl Drop for PgBouncer {
        fn drop(&mut self) {
            // runuser forwards the signal to pgbouncer; kill both to be sure.
            if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn is_root() -> bool {
        // SAFETY-free: `id -u` is enough for a test harness.
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    }
}

/// Builds the Python and JavaScript plugins under `plugins/python` and
/// `plugins/js` with their toolchains (componentize-py, componentize-js),
/// pinned by `./dev test` and `.ci/run`.
///
/// A build takes 10–20 s, so components are cached by content: the key is the
/// SHA-256 of the plugin's sources, of `wit/` and of the tool's version, in
/// `$HOME/.cache/jobhost-polyglot` (outside the clone, so a fresh clone reuses
/// it and an edited source rebuilds).
pub mod polyglot {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Mutex;

    use anyhow::Context as _;
    use sha2::{Digest as _, Sha256};

    /// A guest language with a component toolchain.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Lang {
        /// componentize-py; the module is `app.py`.
        Python,
        /// componentize-js; the module is `app.js`.
        Js,
    }

    impl Lang {
        fn dir(self) -> &'static str {
            match self {
                Lang::Python => "python",
                Lang::Js => "js",
            }
        }
    }

    /// The pinned toolchain versions (`.ci/polyglot-tools` installs these).
    pub const COMPONENTIZE_PY: &str = "0.25.1";
    /// See [`COMPONENTIZE_PY`].
    pub const COMPONENTIZE_JS: &str = "0.23.0";

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn cache_dir() -> PathBuf {
        std::env::var_os("JOBHOST_POLYGLOT_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
                home.join(".cache/jobhost-polyglot")
            })
    }

    /// The componentize-js launcher: `$JOBHOST_COMPONENTIZE_JS`, else the
    /// copy `.ci/polyglot-tools` installs under `$HOME/.cache/jobhost-tools`,
    /// else PATH.
    pub fn componentize_js() -> PathBuf {
        if let Some(p) = std::env::var_os("JOBHOST_COMPONENTIZE_JS") {
            return p.into();
        }
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let local = home.map(|h| {
            h.join(format!(
                ".cache/jobhost-tools/componentize-js-{COMPONENTIZE_JS}/node_modules/.bin/componentize-js"
            ))
        });
        match local {
            Some(p) if p.exists() => p,
            _ => "componentize-js".into(),
        }
    }

    fn tool(lang: Lang) -> (PathBuf, &'static str) {
        match lang {
            Lang::Python => ("componentize-py".into(), COMPONENTIZE_PY),
            Lang::Js => (componentize_js(), COMPONENTIZE_JS),
        }
    }

    fn tool_version(lang: Lang) -> anyhow::Result<String> {
        let (exe, pinned) = tool(lang);
        let out = Command::new(&exe)
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "{} is not installed; `./dev test` installs version {pinned}",
                    exe.display()
                )
            })?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        anyhow::ensure!(
            version.contains(pinned),
            "{} is version `{version}`, the tests pin {pinned}; `./dev test` installs it",
            exe.display()
        );
        Ok(version)
    }

    fn hash_tree(h: &mut Sha256, dir: &Path) -> anyhow::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let name = e.file_name();
            if name == "__pycache__" || name == "node_modules" {
                continue;
            }
            if path.is_dir() {
                hash_tree(h, &path)?;
            } else {
                h.update(name.as_encoded_bytes());
                h.update(std::fs::read(&path)?);
            }
        }
        Ok(())
    }

    /// Builds (or takes from the cache) `plugins/<lang>/<name>` for `world`
    /// (`xact-plugin` or `session-plugin`) against the repository's `wit/`;
    /// returns the component's path.
    pub fn build(lang: Lang, name: &str, world: &str) -> anyhow::Result<PathBuf> {
        let src = root().join("plugins").join(lang.dir()).join(name);
        build_dir(lang, &src, &root().join("wit"), world)
    }

    /// [`build`] of the module in `src` (`app.py` or `app.js`) against the
    /// WIT package in `wit`.
    pub fn build_dir(lang: Lang, src: &Path, wit: &Path, world: &str) -> anyhow::Result<PathBuf> {
        // One build at a time in this process: the tests ask concurrently.
        static BUILDING: Mutex<()> = Mutex::new(());
        let _one = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .context("a plugin directory with a name")?;
        let version = tool_version(lang)?;
        let mut h = Sha256::new();
        h.update(version.as_bytes());
        h.update(world.as_bytes());
        hash_tree(&mut h, src)?;
        hash_tree(&mut h, wit)?;
        let key = hex::encode(&h.finalize()[..12]);
        let dir = cache_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let out = dir.join(format!("{}-{name}-{key}.wasm", lang.dir()));
        if out.exists() {
            return Ok(out);
        }
        let tmp = dir.join(format!(
            "{}-{name}-{key}.{}.tmp",
            lang.dir(),
            std::process::id()
        ));
        let (exe, _) = tool(lang);
        let mut cmd = Command::new(&exe);
        cmd.current_dir(src);
        match lang {
            Lang::Python => cmd
                .arg("-d")
                .arg(wit)
                .args(["-w", world, "componentize", "app", "-o"])
                .arg(&tmp),
            Lang::Js => cmd
                .arg("app.js")
                .arg("--wit")
                .arg(wit)
                .args(["-n", world, "-o"])
                .arg(&tmp),
        };
        let output = cmd
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        anyhow::ensure!(
            output.status.success(),
            "building {} failed ({}):\n{}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::rename(&tmp, &out)?;
        // componentize-py leaves bytecode beside the sources.
        let _ = std::fs::remove_dir_all(src.join("__pycache__"));
        Ok(out)
    }

    /// Builds the Rust plugin crate in `src` (a skeleton of `jobhost new`)
    /// with the guest plugins' lock file and target directory, so the SDK and
    /// its dependencies are the ones already built; returns the component.
    pub fn build_rust(src: &Path) -> anyhow::Result<PathBuf> {
        // <target>/wasm32-wasip2/release/<guest>.wasm
        let target = Path::new(super::guests::TEST_CORE_PROBE)
            .ancestors()
            .nth(3)
            .context("the guests' target directory")?;
        std::fs::copy(root().join("plugins/Cargo.lock"), src.join("Cargo.lock"))?;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(cargo)
            .current_dir(src)
            .args(["build", "--release", "--offline"])
            .env("CARGO_TARGET_DIR", target)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .output()
            .context("running cargo")?;
        anyhow::ensure!(
            output.status.success(),
            "building {} failed ({}):\n{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .context("a crate directory with a name")?
            .replace('-', "_");
        Ok(target.join(format!("wasm32-wasip2/release/{name}.wasm")))
    }
}
