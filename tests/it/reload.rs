//! Hot reload with real files: new plugin versions and jobs.toml edits are
//! picked up without a restart, never interrupting a run in flight and never
//! replacing a working version with a broken one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobhost::HostOptions;
use jobhost::config::JobsConfig;
use jobhost_tests::guests;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::support::*;

/// The probe component with a custom section appended: a different file (and
/// sha256) that behaves the same, like a rebuilt plugin.
fn variant(tag: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(guests::TEST_CORE_PROBE).unwrap();
    let name = b"jobhost-test-version";
    let mut content = vec![name.len() as u8];
    content.extend_from_slice(name);
    content.extend_from_slice(tag.as_bytes());
    assert!(content.len() < 128, "one-byte LEB128 size");
    bytes.push(0); // custom section id
    bytes.push(content.len() as u8);
    bytes.extend_from_slice(&content);
    bytes
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Replaces `path` the way deploy tools do: write aside, then rename.
fn replace_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct TestHost {
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestHost {
    /// Starts an in-process host over `dir/jobs.toml` (this test's thread, so
    /// a `LogCapture` sees its events).
    async fn start(pool: &PgPool, dir: PathBuf) -> TestHost {
        let config = JobsConfig::from_file(dir.join("jobs.toml")).unwrap();
        let options = HostOptions {
            direct_url: None,
            database_url: database_url(pool).await,
            host_id: "reloader".into(),
            demo: false,
            clock_offset: chrono::TimeDelta::zero(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(jobhost::run(config, options, async {
            let _ = stopped.await;
        }));
        TestHost {
            dir,
            stop: Some(stop),
            task,
        }
    }

    fn write_config(&self, jobs: &str) {
        write_config(&self.dir, jobs);
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn write_config(dir: &Path, jobs: &str) {
    let toml = format!(
        "[host]\npool-size = 3\nreload-debounce = \"100ms\"\nshutdown-grace = \"10s\"\n\n{jobs}"
    );
    replace_atomically(&dir.join("jobs.toml"), toml.as_bytes());
}

fn temp_dir(tag: &str) -> Scratch {
    Scratch::new(&format!("reload-{tag}"))
}

async fn ok_runs_with(pool: &PgPool, sha: &str) -> i64 {
    sqlx::query_scalar(
        "select count(*) from jobhost.runs where outcome = 'ok' and plugin_sha256 = $1",
    )
    .bind(sha)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_plugin_replaced_mid_run_finishes_on_the_old_version(pool: PgPool) {
    create_probe_table(&pool).await;
    let dir = temp_dir("replace");
    let (v1, v2) = (variant("v1"), variant("v2"));
    std::fs::write(dir.join("probe.wasm"), &v1).unwrap();
    write_config(
        &dir,
        "[[job]]\nname = \"slow\"\nplugin = \"probe.wasm\"\nevery = \"1s\"\ntimeout = \"20s\"\n[job.config]\nmode = \"sleep\"\nsleep-ms = \"4000\"\n",
    );
    let logs = LogCapture::start();
    let host = TestHost::start(&pool, dir.to_path_buf()).await;

    // A run of v1 is in flight...
    let (in_flight, _) = wait_for_some(Duration::from_secs(20), "a run in flight", || {
        run_in_plugin(&pool, "slow")
    })
    .await;
    // ...when v2 is deployed.
    let written = Instant::now();
    replace_atomically(&dir.join("probe.wasm"), &v2);
    let v2_sha = sha(&v2);
    wait_for(Duration::from_secs(10), "v2 to be loaded", || async {
        logs.text().contains(&format!("plugin_sha256={v2_sha}"))
    })
    .await;
    let latency = written.elapsed();
    eprintln!("reload latency (file written -> new version loaded): {latency:?}");
    // The 4 s run leaves ample room for the reload even on a loaded CI box; if
    // it had already ended, this test would prove nothing about "mid-run".
    let still: bool = sqlx::query_scalar(
        "select exists (select 1 from jobhost.in_flight where run_id = $1)
            and not exists (select 1 from jobhost.runs where id = $1)",
    )
    .bind(in_flight)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(still, "v2 loaded while the v1 run was in flight");

    wait_for(Duration::from_secs(20), "a run of v2", || async {
        ok_runs_with(&pool, &v2_sha).await >= 1
    })
    .await;
    host.stop().await;

    let (outcome, ran): (String, String) =
        sqlx::query_as("select outcome, plugin_sha256 from jobhost.runs where id = $1")
            .bind(in_flight)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (outcome.as_str(), ran.as_str()),
        ("ok", sha(&v1).as_str()),
        "the run in flight finished on v1"
    );
    assert!(ok_runs_with(&pool, &sha(&v1)).await >= 1);
    let failed: i64 = sqlx::query_scalar("select count(*) from jobhost.runs where outcome <> 'ok'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(failed, 0);
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn broken_and_half_written_plugins_never_replace_a_working_one(pool: PgPool) {
    create_probe_table(&pool).await;
    let dir = temp_dir("garbage");
    let (v1, v2, v3) = (variant("v1"), variant("v2"), variant("v3"));
    std::fs::write(dir.join("probe.wasm"), &v1).unwrap();
    write_config(
        &dir,
        "[[job]]\nname = \"steady\"\nplugin = \"probe.wasm\"\nevery = \"200ms\"\n[job.config]\nmode = \"write\"\n",
    );
    let logs = LogCapture::start();
    let host = TestHost::start(&pool, dir.to_path_buf()).await;
    let v1_sha = sha(&v1);
    wait_for(Duration::from_secs(20), "v1 running", || async {
        ok_runs_with(&pool, &v1_sha).await >= 1
    })
    .await;

    // Garbage: rejected with the file named; v1 keeps running.
    std::fs::write(dir.join("probe.wasm"), b"this is not a component").unwrap();
    wait_for(Duration::from_secs(10), "the rejection", || async {
        let t = logs.text();
        t.contains("reload rejected")
            && t.contains("probe.wasm")
            && t.contains("not a WebAssembly component")
    })
    .await;
    let before = ok_runs_with(&pool, &v1_sha).await;
    wait_for(Duration::from_secs(10), "v1 to keep running", || async {
        ok_runs_with(&pool, &v1_sha).await >= before + 2
    })
    .await;

    // A valid file is picked up on its next change.
    std::fs::write(dir.join("probe.wasm"), &v2).unwrap();
    let v2_sha = sha(&v2);
    wait_for(Duration::from_secs(20), "v2 running", || async {
        ok_runs_with(&pool, &v2_sha).await >= 1
    })
    .await;

    // A partial write is seen and rejected (not merely outrun by the complete
    // one), then the complete write ends on the complete version.
    let rejections = |t: &str| t.matches("reload rejected").count();
    let before = rejections(&logs.text());
    std::fs::write(dir.join("probe.wasm"), &v3[..v3.len() / 2]).unwrap();
    wait_for(
        Duration::from_secs(10),
        "the half-written file's rejection",
        || async { rejections(&logs.text()) > before },
    )
    .await;
    std::fs::write(dir.join("probe.wasm"), &v3).unwrap();
    let v3_sha = sha(&v3);
    wait_for(Duration::from_secs(20), "v3 running", || async {
        ok_runs_with(&pool, &v3_sha).await >= 2
    })
    .await;
    host.stop().await;

    let last: String =
        sqlx::query_scalar("select plugin_sha256 from jobhost.runs order by id desc limit 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(last, v3_sha);
    let failed: i64 = sqlx::query_scalar("select count(*) from jobhost.runs where outcome <> 'ok'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(failed, 0, "no run ever used a broken version");
}

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn jobs_toml_edits_add_change_and_remove_jobs_live(pool: PgPool) {
    create_probe_table(&pool).await;
    let dir = temp_dir("config");
    std::fs::write(dir.join("probe.wasm"), variant("v1")).unwrap();
    let job = |name: &str, every: &str, note: &str| {
        format!(
            "[[job]]\nname = \"{name}\"\nplugin = \"probe.wasm\"\nevery = \"{every}\"\n[job.config]\nmode = \"write\"\nnote = \"{note}\"\n"
        )
    };
    write_config(&dir, &job("a", "200ms", "a1"));
    let logs = LogCapture::start();
    let host = TestHost::start(&pool, dir.to_path_buf()).await;
    let notes = |note: &'static str| notes(&pool, note);
    wait_for(Duration::from_secs(20), "a running", || async {
        notes("a1").await >= 1
    })
    .await;

    // Add b; change a's config.
    host.write_config(&format!(
        "{}{}",
        job("a", "200ms", "a2"),
        job("b", "200ms", "b1")
    ));
    wait_for(Duration::from_secs(20), "b added and a changed", || async {
        notes("b1").await >= 2 && notes("a2").await >= 2
    })
    .await;

    // Remove b: it stops (at most a run in flight finishes).
    host.write_config(&job("a", "200ms", "a2"));
    wait_for(Duration::from_secs(10), "b removed", || async {
        logs.text().contains("job removed")
    })
    .await;
    // A run of b that was in flight at the removal may still finish (b
    // writes every 200 ms: its notes standing still for 500 ms means it has
    // stopped); after it, nothing of b starts again.
    wait_for(Duration::from_secs(10), "b's last run to end", || async {
        let before = notes("b1").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        notes("b1").await == before
    })
    .await;
    let b_after_removal = notes("b1").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(notes("b1").await, b_after_removal, "b no longer runs");

    // An invalid edit keeps the running configuration.
    let invalid = job("a", "200ms", "a3").replacen("[[job]]\n", "[[job]]\nfrequency = 3\n", 1);
    host.write_config(&invalid);
    wait_for(Duration::from_secs(10), "the rejection", || async {
        logs.text().contains("invalid jobs.toml")
    })
    .await;
    let a2 = notes("a2").await;
    wait_for(Duration::from_secs(10), "a to keep running", || async {
        notes("a2").await >= a2 + 2
    })
    .await;
    assert_eq!(notes("a3").await, 0);
    host.stop().await;
    assert_eq!(advisory_locks(&pool).await, 0);
}

#[test]
fn the_compile_cache_serves_a_restart() {
    use jobhost::runtime::Runtime;
    let dir = temp_dir("cache");
    // A component, and a core module the host wraps into one (keyed by the
    // wrapping, which the host's version decides, not by the module).
    for plugin in [guests::TEST_CORE_PROBE, guests::TEST_CORE_PROBE_LEAN] {
        let plugin = Path::new(plugin);
        let cold = Runtime::with_cache(&dir).unwrap();
        let t = Instant::now();
        cold.load(plugin).unwrap();
        let cold_time = t.elapsed();
        assert_eq!(cold.cache_hits(), 0);
        drop(cold);
        // Stored before `load` returned: the very next start maps it.
        let warm = Runtime::with_cache(&dir).unwrap();
        let t = Instant::now();
        warm.load(plugin).unwrap();
        let warm_time = t.elapsed();
        assert_eq!(
            warm.cache_hits(),
            1,
            "a restart reads the compiled plugin from the cache"
        );
        eprintln!(
            "{}: cold compile {cold_time:?}, warm cache {warm_time:?}",
            plugin.display()
        );
    }
    assert_eq!(artifacts(&dir).len(), 2);
}

/// A plugin mapped from the compile cache, in a pooled slot that each run
/// reuses, starts every run from its own initialised memory: the pages a run
/// wrote are restored from the artifact's file (copy-on-write), not kept.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_run_of_a_cached_plugin_starts_from_its_shipped_memory(pool: PgPool) {
    use jobhost::runtime::{Allocation, Runtime};
    let dir = temp_dir("cache-memory");
    let path = guests::TEST_CORE_PROBE;
    Runtime::with_cache(&dir)
        .unwrap()
        .load(Path::new(path))
        .unwrap();
    let runtime = Runtime::with_allocation(Some(&dir), Allocation::pooled(2, 64 << 20)).unwrap();
    let plugin = runtime.load(Path::new(path)).unwrap();
    assert_eq!(runtime.cache_hits(), 1, "mapped from the cache");
    let job = jobhost::runner::Job {
        config: jobhost_tests::job_config("remember", path, &[("mode", "remember")]),
        plugin,
    };
    let runner = jobhost::runner::Runner::new(pool.clone(), Arc::new(runtime), "test-host");
    for n in 1..=3 {
        let result = runner.run(&job, slot(n)).await.unwrap();
        assert_eq!(
            finished(result, jobhost::db::Outcome::Ok),
            "memory said pristine",
            "run {n}"
        );
    }
}

/// The compiled artifacts in a compile cache.
fn artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    found.sort();
    found
}

#[test]
fn a_damaged_compiled_plugin_is_compiled_again() {
    use jobhost::runtime::Runtime;
    let dir = temp_dir("cache-damaged");
    let plugin = Path::new(guests::TEST_CORE_PROBE);
    Runtime::with_cache(&dir).unwrap().load(plugin).unwrap();
    let [artifact] = artifacts(&dir).try_into().expect("one artifact");
    // Cut short, as a disk that filled up under another tool might leave it.
    let bytes = std::fs::read(&artifact).unwrap();
    std::fs::write(&artifact, &bytes[..bytes.len() / 3]).unwrap();

    let runtime = Runtime::with_cache(&dir).unwrap();
    let plugin_loaded = runtime.load(plugin).expect("compiled again");
    assert_eq!(runtime.cache_hits(), 0);
    assert_eq!(
        plugin_loaded.sha256,
        hex::encode(Sha256::digest(std::fs::read(plugin).unwrap()))
    );
    // ... and stored whole again.
    let runtime = Runtime::with_cache(&dir).unwrap();
    runtime.load(plugin).unwrap();
    assert_eq!(runtime.cache_hits(), 1);
    assert_eq!(std::fs::read(&artifact).unwrap().len(), bytes.len());
}

#[test]
fn the_compile_cache_removes_the_least_recently_used_beyond_its_limit() {
    use jobhost::runtime::Runtime;
    let dir = temp_dir("cache-limit");
    let probe = Path::new(guests::TEST_CORE_PROBE);
    let lean = Path::new(guests::TEST_CORE_PROBE_LEAN);
    let runtime = Runtime::with_cache(&dir).unwrap();
    runtime.load(probe).unwrap();
    let [probe_artifact] = artifacts(&dir).try_into().expect("one artifact");
    let one = std::fs::metadata(&probe_artifact).unwrap().len();

    // Room for about one artifact: storing the second removes the first,
    // never the one just written.
    let mut runtime = Runtime::with_cache(&dir).unwrap();
    runtime.set_compile_cache_limit(one + one / 2);
    runtime.load(lean).unwrap();
    let left = artifacts(&dir);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_ne!(left[0], probe_artifact);
    // Within the limit, nothing is removed.
    let mut runtime = Runtime::with_cache(&dir).unwrap();
    runtime.set_compile_cache_limit(100 * one);
    runtime.load(probe).unwrap();
    assert_eq!(runtime.cache_hits(), 0, "the probe's artifact was removed");
    assert_eq!(artifacts(&dir).len(), 2);
}

/// Counts of the reloader's decisions in the captured log.
fn reload_counts(logs: &LogCapture) -> (usize, usize) {
    let t = logs.text();
    (
        // "reloading" in any form: a reload that found nothing to apply
        // still did the work (and would be a loop).
        t.matches("reloading").count(),
        t.matches("reload applied").count(),
    )
}

/// A probe job writing `note` every 200 ms.
fn note_job(note: &str) -> String {
    format!(
        "[[job]]\nname = \"noted\"\nplugin = \"probe.wasm\"\nevery = \"200ms\"\n[job.config]\nmode = \"write\"\nnote = \"{note}\"\n"
    )
}

async fn notes(pool: &PgPool, note: &str) -> i64 {
    sqlx::query_scalar("select count(*) from probe where note = $1")
        .bind(note)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Reloads follow content, not file events: a read and a rewrite with equal
/// bytes cause none, one change causes one, a burst of writes causes one (of
/// the final content). The reload's own reads set nothing off.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn reloads_happen_once_per_content_change(pool: PgPool) {
    create_probe_table(&pool).await;
    let dir = temp_dir("once");
    std::fs::write(dir.join("probe.wasm"), variant("v1")).unwrap();
    write_config(&dir, &note_job("first"));
    let logs = LogCapture::start();
    let host = TestHost::start(&pool, dir.to_path_buf()).await;
    wait_for(Duration::from_secs(20), "the job running", || async {
        notes(&pool, "first").await >= 1
    })
    .await;
    let quiet = Duration::from_millis(1500); // 15 debounce periods

    // A read (what `cat jobs.toml` does), then the plugin read too.
    let config = std::fs::read(dir.join("jobs.toml")).unwrap();
    let _ = std::fs::read(dir.join("probe.wasm")).unwrap();
    tokio::time::sleep(quiet).await;
    assert_eq!(reload_counts(&logs), (0, 0), "a read is not a change");

    // The same bytes written again (in place and by rename).
    std::fs::write(dir.join("jobs.toml"), &config).unwrap();
    replace_atomically(&dir.join("probe.wasm"), &variant("v1"));
    tokio::time::sleep(quiet).await;
    assert_eq!(
        reload_counts(&logs),
        (0, 0),
        "equal content is not a change"
    );

    // One change: one reload, and then silence (no reload loop).
    host.write_config(&note_job("second"));
    wait_for(Duration::from_secs(10), "the change applied", || async {
        notes(&pool, "second").await >= 1
    })
    .await;
    tokio::time::sleep(quiet).await;
    assert_eq!(reload_counts(&logs), (1, 1), "one change, one reload");

    // A burst of writes within the debounce: one reload, of the final content.
    for i in 0..5 {
        std::fs::write(dir.join("jobs.toml"), {
            let toml = format!(
                "[host]\npool-size = 3\nreload-debounce = \"100ms\"\nshutdown-grace = \"10s\"\n\n{}",
                note_job(&format!("burst-{i}"))
            );
            toml.into_bytes()
        })
        .unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    wait_for(
        Duration::from_secs(10),
        "the final content running",
        || async { notes(&pool, "burst-4").await >= 1 },
    )
    .await;
    tokio::time::sleep(quiet).await;
    assert_eq!(reload_counts(&logs), (2, 2), "a burst is one reload");
    for i in 0..4 {
        assert_eq!(
            notes(&pool, &format!("burst-{i}")).await,
            0,
            "an intermediate version ran"
        );
    }
    host.stop().await;
}

/// Updates the way deployments make them: an editor's write-aside-and-rename,
/// `cp` over the file in chunks (never loaded half-written), and a Kubernetes
/// ConfigMap volume, whose files are symlinks through `..data`, swapped
/// atomically to a new timestamped directory.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn deployment_style_updates_each_reload_once(pool: PgPool) {
    create_probe_table(&pool).await;
    let dir = temp_dir("deploy");
    // The ConfigMap layout: cm/..<ts>/jobs.toml, cm/..data -> ..<ts>,
    // cm/jobs.toml -> ..data/jobs.toml. The plugin lives beside it.
    let cm = dir.join("cm");
    let plugin = dir.join("probe.wasm");
    std::fs::write(&plugin, variant("v1")).unwrap();
    let config_for = |note: &str| {
        format!(
            "[host]\npool-size = 3\nreload-debounce = \"100ms\"\nshutdown-grace = \"10s\"\n\n[[job]]\nname = \"noted\"\nplugin = {:?}\nevery = \"200ms\"\n[job.config]\nmode = \"write\"\nnote = \"{note}\"\n",
            plugin.display().to_string()
        )
    };
    let publish = |ts: &str, note: &str| {
        let data = cm.join(format!("..{ts}"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("jobs.toml"), config_for(note)).unwrap();
        let tmp = cm.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..{ts}"), &tmp).unwrap();
        std::fs::rename(&tmp, cm.join("..data")).unwrap();
    };
    std::fs::create_dir_all(&cm).unwrap();
    publish("2026_11_28_v1", "cm-1");
    std::os::unix::fs::symlink("..data/jobs.toml", cm.join("jobs.toml")).unwrap();

    let logs = LogCapture::start();
    let config = JobsConfig::from_file(cm.join("jobs.toml")).unwrap();
    let options = HostOptions {
        direct_url: None,
        database_url: database_url(&pool).await,
        host_id: "deployer".into(),
        demo: false,
        clock_offset: chrono::TimeDelta::zero(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(jobhost::run(config, options, async {
        let _ = stopped.await;
    }));
    wait_for(Duration::from_secs(20), "the job running", || async {
        notes(&pool, "cm-1").await >= 1
    })
    .await;

    // Kubernetes: the ..data swap.
    publish("2026_11_28_v2", "cm-2");
    wait_for(
        Duration::from_secs(10),
        "the ConfigMap update applied",
        || async { notes(&pool, "cm-2").await >= 1 },
    )
    .await;
    assert_eq!(reload_counts(&logs).1, 1, "{}", logs.text());

    // An editor: write aside, rename over.
    let v2 = variant("v2");
    replace_atomically(&plugin, &v2);
    wait_for(Duration::from_secs(10), "v2 running", || async {
        ok_runs_with(&pool, &sha(&v2)).await >= 1
    })
    .await;
    assert_eq!(reload_counts(&logs).1, 2);

    // cp over the file in chunks: truncate, then write it piece by piece.
    let v3 = variant("v3");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&plugin).unwrap();
        for chunk in v3.chunks(v3.len() / 4 + 1) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    wait_for(Duration::from_secs(10), "v3 running", || async {
        ok_runs_with(&pool, &sha(&v3)).await >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = logs.text();
    assert!(
        !text.contains("reload rejected"),
        "a half-written version was tried: {text}"
    );
    assert_eq!(reload_counts(&logs).1, 3, "{text}");

    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let failed: i64 = sqlx::query_scalar("select count(*) from jobhost.runs where outcome <> 'ok'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(failed, 0);
}

/// A reload is validated exactly as a start: `lock = "session"` on an `xact`
/// plugin whose file did not change is refused, and the job keeps running.
#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn a_reload_a_start_would_refuse_is_refused(pool: PgPool) {
    create_probe_table(&pool).await;
    let dir = temp_dir("strict");
    std::fs::write(dir.join("probe.wasm"), variant("v1")).unwrap();
    write_config(&dir, &note_job("steady"));
    let logs = LogCapture::start();
    let host = TestHost::start(&pool, dir.to_path_buf()).await;
    wait_for(Duration::from_secs(20), "the job running", || async {
        notes(&pool, "steady").await >= 1
    })
    .await;
    let refused = note_job("steady").replace("[job.config]", "lock = \"session\"\n[job.config]");
    host.write_config(&refused);
    // A fresh start refuses it too, with the same reason.
    let start = jobhost::load_jobs(
        &runtime(),
        &JobsConfig::from_file(dir.join("jobs.toml")).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{start:#}").contains("set lock = \"xact\""),
        "{start:#}"
    );
    wait_for(Duration::from_secs(10), "the rejection", || async {
        let t = logs.text();
        t.contains("reload rejected") && t.contains("an xact job") && t.contains("set lock =")
    })
    .await;
    let before = notes(&pool, "steady").await;
    wait_for(
        Duration::from_secs(10),
        "the job to keep running",
        || async { notes(&pool, "steady").await >= before + 2 },
    )
    .await;
    host.stop().await;
    let failed: i64 = sqlx::query_scalar("select count(*) from jobhost.runs where outcome <> 'ok'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(failed, 0, "no run used the refused configuration");
}
