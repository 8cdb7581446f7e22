//! Plugins that cannot be used fail at load with the file and what was expected.

use std::path::Path;

use jobhost::runtime::PluginError;
use jobhost_tests::Scratch;

use crate::support::{jobs_file, runtime};

/// `bytes` as the file `name` in a scratch directory of its own (removed
/// when the first is dropped).
fn temp_file(name: &str, bytes: &[u8]) -> (Scratch, std::path::PathBuf) {
    let dir = Scratch::new("loading");
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

#[test]
fn a_file_that_is_not_a_component_is_rejected_with_its_path() {
    let (_dir, path) = temp_file("garbage.wasm", b"definitely not wasm");
    let err = runtime().load(&path).unwrap_err();
    assert!(matches!(err, PluginError::NotComponent { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("garbage.wasm") && text.contains("not a WebAssembly component"),
        "{text}"
    );

    // A core module without a world to wrap it in is not one either.
    let (_dir, path) = temp_file("core.wasm", b"\0asm\x01\0\0\0");
    let err = runtime().load(&path).unwrap_err();
    assert!(matches!(err, PluginError::NotComponent { .. }), "{err:?}");
    let text = format!("{:#}", anyhow::Error::new(err));
    assert!(
        text.contains("core.wasm")
            && text.contains("it is a core module that carries no WIT world"),
        "{text}"
    );
}

#[test]
fn a_component_of_the_wrong_world_is_rejected() {
    // The smallest valid component: no imports, no exports.
    let (_dir, path) = temp_file("empty.wasm", b"\0asm\x0d\0\x01\0");
    let err = runtime().load(&path).unwrap_err();
    assert!(matches!(err, PluginError::WrongWorld { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("empty.wasm")
            && text.contains("xact-plugin")
            && text.contains("session-plugin")
            && text.contains("jobhost:plugin@0.2.1"),
        "{text}"
    );
}

/// A plugin built against another contract is refused naming the function
/// that does not match and the package version it was built against (the
/// error used to say only "type mismatch ... expected `record` found `string`").
#[test]
fn a_plugin_built_against_another_contract_names_the_function_and_its_version() {
    // Exports `xact-job`, but `run` has another type. At this host's version,
    // and at 0.2.0: an earlier patch version is the same contract (the WIT's
    // versioning rule), so the host finds its `xact-job` and judges its type,
    // instead of calling it the wrong world.
    let wrong_type = |version: &str| {
        format!(
            r#"(component
        (core module $m (func (export "run") (result i32) i32.const 0))
        (core instance $i (instantiate $m))
        (func $run (result u32) (canon lift (core func $i "run")))
        (instance $job (export "run" (func $run)))
        (export "jobhost:plugin/xact-job@{version}" (instance $job)))"#
        )
    };
    for version in ["0.2.1", "0.2.0"] {
        let (_dir, path) = temp_file(
            "wrong-type.wasm",
            &wat::parse_str(wrong_type(version)).unwrap(),
        );
        let text = runtime().load(&path).unwrap_err().to_string();
        assert!(text.contains("wrong-type.wasm"), "{text}");
        assert!(
            text.contains("function `xact-job.run`") && text.contains("type mismatch"),
            "names the function ({version}): {text}"
        );
        assert!(
            text.contains(&format!("built against jobhost:plugin@{version}")),
            "names the version it was built against: {text}"
        );
    }

    // Built against a version this host does not speak.
    let (_dir, path) = temp_file(
        "old-version.wasm",
        &wat::parse_str(wrong_type("0.1.0")).unwrap(),
    );
    let text = runtime().load(&path).unwrap_err().to_string();
    assert!(
        text.contains("built against jobhost:plugin@0.1.0")
            && text.contains("this host speaks jobhost:plugin@0.2.1"),
        "{text}"
    );
}

#[test]
fn a_missing_file_is_a_read_error() {
    let err = runtime()
        .load(Path::new("/nonexistent/plugin.wasm"))
        .unwrap_err();
    assert!(matches!(err, PluginError::Read { .. }), "{err:?}");
}

/// Plugins start under the job's own memory limit: one that cannot is refused
/// at load (so at start, reload and `jobhost check`) with both numbers, not
/// trapped on every run; a generous limit lets it start.
#[test]
fn a_plugin_that_cannot_start_within_its_memory_limit_is_refused_with_both_numbers() {
    let path = Path::new(jobhost_tests::guests::TEST_CORE_PROBE);
    let err = runtime().load_limited(path, 1 << 20).unwrap_err();
    let PluginError::MemoryLimit {
        needed_mib,
        limit_mib,
        ..
    } = &err
    else {
        panic!("expected a memory-limit refusal, got {err:?}");
    };
    assert_eq!(*limit_mib, 1);
    assert!(*needed_mib > 1.0, "{needed_mib}");
    let text = err.to_string();
    assert!(
        text.contains("test_core_probe.wasm")
            && text.contains(&format!("{needed_mib:.1} MiB"))
            && text.contains("limit of 1 MiB")
            && text.contains("max-memory-mib"),
        "{text}"
    );
    runtime()
        .load_limited(path, 128 << 20)
        .expect("starts within 128 MiB");
}

/// A plugin's kind is the world it implements, read when it is linked: no
/// call into the plugin decides it.
#[test]
fn the_kind_is_the_world_that_links() {
    use jobhost::runtime::PluginKind;
    let xact = runtime()
        .load(Path::new(jobhost_tests::guests::TEST_CORE_PROBE))
        .unwrap();
    assert_eq!(xact.kind, PluginKind::Xact);
    let session = runtime()
        .load(Path::new(jobhost_tests::guests::TEST_SESSION_PROBE))
        .unwrap();
    assert_eq!(session.kind, PluginKind::Session);
    // And the job set refuses the wrong pairing before anything runs.
    let mut config =
        jobhost_tests::job_config("mismatched", jobhost_tests::guests::TEST_SESSION_PROBE, &[]);
    config.lock = jobhost::config::LockMode::Xact;
    let why = jobhost::runner::check_plugin_kind(&config, &session).unwrap_err();
    assert!(why.contains("set lock = \"session\""), "{why}");
}

#[test]
fn a_component_beyond_the_pooling_limits_is_refused_as_such() {
    // 40 core instances: more than the pooling allocator allows one component
    // (componentize-py's `--stub-wasi` output has 38). The file is a valid
    // component, so the error says it cannot be compiled, and why.
    let instances = "(core instance (instantiate $m))\n".repeat(40);
    let wat = format!("(component (core module $m) {instances})");
    let (_dir, path) = temp_file("many-instances.wasm", &wat::parse_str(&wat).unwrap());
    let pooled = jobhost::runtime::Runtime::with_options(None, true).unwrap();
    let err = pooled.load(&path).unwrap_err();
    assert!(matches!(err, PluginError::Compile { .. }), "{err:?}");
    let text = format!("{:#}", anyhow::Error::new(err));
    assert!(
        text.contains("many-instances.wasm")
            && text.contains("cannot be compiled")
            && text.contains("core module instances"),
        "{text}"
    );
}

/// `JOBHOST_PERFMAP=1` has the engine write Linux perf's map of the code it
/// compiles (`/tmp/perf-<pid>.map`, where `perf` and the `callgrind`
/// scripts of BENCHMARKS.md look), so a profile names a plugin's functions
/// rather than bare addresses. A `jobhost check` child process with it set
/// leaves a map naming the probe's `run`; one without it leaves none.
#[test]
fn a_perf_map_names_a_plugins_functions_when_asked() {
    let (_dir, file) = jobs_file(
        "perfmap",
        &format!(
            "[[job]]\nname = \"probe\"\nplugin = {:?}\nevery = \"1h\"\n",
            jobhost_tests::guests::TEST_CORE_PROBE
        ),
    );
    let args = [
        "--config".to_string(),
        file.display().to_string(),
        "check".into(),
    ];
    let check = |perfmap: bool| {
        let mut command = crate::fleet::host_command(&args);
        command.stdout(std::process::Stdio::null());
        if perfmap {
            command.env(jobhost::runtime::PERFMAP_ENV, "1");
        } else {
            command.env_remove(jobhost::runtime::PERFMAP_ENV);
        }
        let mut child = command.spawn().unwrap();
        let map = std::path::PathBuf::from(format!("/tmp/perf-{}.map", child.id()));
        assert!(child.wait().unwrap().success(), "jobhost check failed");
        let text = std::fs::read_to_string(&map).ok();
        let _ = std::fs::remove_file(&map);
        text
    };
    let map = check(true).expect("no perf map was written");
    assert!(
        map.lines().any(|l| l.ends_with("xact-job@0.2.1#run")),
        "the map does not name the probe's run:\n{}",
        map.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(check(false), None, "a map was written without being asked");
}
