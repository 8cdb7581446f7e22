//! Builds the guest plugins (`plugins/`) for wasm32-wasip2 and tells the tests
//! where the components are (`guests.rs` in OUT_DIR).
//!
//! The guests build into OUT_DIR with their own target dir: the outer cargo
//! holds the lock on `target/`. `JOBHOST_SKIP_GUESTS=1` skips the build (for
//! lint-only jobs); the tests then fail to find the files.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: &[&str] = &[
    "integrity-hash-retry",
    "activation-drip",
    "db-retention",
    "test-core-probe",
    "test-sandbox-hostile",
    "test-session-probe",
    "test-scheduler",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let plugins = manifest.join("../plugins");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = out.join("guests");

    for p in ["Cargo.toml", "Cargo.lock", "sdk", ".cargo"] {
        println!("cargo:rerun-if-changed={}", plugins.join(p).display());
    }
    for g in GUESTS {
        println!("cargo:rerun-if-changed={}", plugins.join(g).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../wit").display()
    );
    println!("cargo:rerun-if-env-changed=JOBHOST_SKIP_GUESTS");

    if std::env::var_os("JOBHOST_SKIP_GUESTS").is_none() {
        build(&plugins, &target_dir);
    }

    let mut consts = String::new();
    for g in GUESTS {
        let file = target_dir
            .join("wasm32-wasip2/release")
            .join(format!("{}.wasm", g.replace('-', "_")));
        consts.push_str(&format!(
            "/// The `{g}` component.\npub const {}: &str = {:?};\n",
            g.replace('-', "_").to_uppercase(),
            file.display().to_string()
        ));
    }
    // The probe again as a core module for wasm32-unknown-unknown: a job
    // without WASI, which the host wraps into a lean component at load.
    consts.push_str(&format!(
        "/// The `test-core-probe` core module, built for wasm32-unknown-unknown.\npub const TEST_CORE_PROBE_LEAN: &str = {:?};\n",
        target_dir
            .join("wasm32-unknown-unknown/release/test_core_probe.wasm")
            .display()
            .to_string()
    ));
    std::fs::write(out.join("guests.rs"), consts).expect("write guests.rs");
}

fn build(plugins: &Path, target_dir: &Path) {
    cargo_build(plugins, target_dir, &["--target", "wasm32-wasip2"]);
    cargo_build(
        plugins,
        target_dir,
        &[
            "--target",
            "wasm32-unknown-unknown",
            "-p",
            "test-core-probe",
        ],
    );
}

fn cargo_build(plugins: &Path, target_dir: &Path, args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(plugins)
        .args(["build", "--release"])
        .args(args)
        .env("CARGO_TARGET_DIR", target_dir)
        // Flags meant for the host build must not leak into the guest build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");
    if std::env::var_os("CI").is_some() {
        cmd.env("RUSTFLAGS", "-D warnings");
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the guest plugins");
    if !status.success() {
        panic!(
            "building the guest plugins failed (see above). If the target is missing: \
             `rustup target add wasm32-wasip2 wasm32-unknown-unknown`"
        );
    }
}
