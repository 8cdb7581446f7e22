//! `jobhost new` writes skeletons that build with their toolchains, load, and
//! run under the host, in each language.

use std::path::PathBuf;

use jobhost::config::{JobsConfig, PluginFiles};
use jobhost::db::Outcome;
use jobhost::scaffold::{Lang, NewPlugin, new_plugin};
use jobhost_tests::polyglot;
use sqlx::PgPool;

use crate::support::*;

#[sqlx::test(migrator = "jobhost::db::MIGRATOR")]
async fn new_skeletons_build_load_and_run_in_every_language(pool: PgPool) {
    let dir = Scratch::new("new");
    let config = dir.join("jobs.toml");
    let sdk = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    let wit = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../wit");

    for (lang, name) in [
        (Lang::Rust, "hello-rust"),
        (Lang::Python, "hello-python"),
        (Lang::Js, "hello-js"),
    ] {
        let req = NewPlugin {
            name: name.into(),
            lang,
            dir: dir.to_path_buf(),
            config: config.clone(),
            sdk: Some(sdk.clone()),
        };
        let written = new_plugin(&req).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        // Build as the printed command would, into where jobs.toml expects it.
        let built = match lang {
            Lang::Rust => polyglot::build_rust(&written.dir),
            Lang::Python => {
                // The skeleton's own copy of the WIT is what it builds against.
                assert_eq!(
                    std::fs::read_to_string(written.dir.join("wit/jobhost.wit")).unwrap(),
                    std::fs::read_to_string(wit.join("jobhost.wit")).unwrap()
                );
                polyglot::build_dir(
                    polyglot::Lang::Python,
                    &written.dir,
                    &written.dir.join("wit"),
                    "xact-plugin",
                )
            }
            Lang::Js => polyglot::build_dir(
                polyglot::Lang::Js,
                &written.dir,
                &written.dir.join("wit"),
                "xact-plugin",
            ),
        }
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let target = dir.join(&written.plugin);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&built, &target).unwrap();

        // A second `new` of the same name refuses rather than overwrites.
        let again = new_plugin(&req).unwrap_err().to_string();
        assert!(again.contains("already has a job named"), "{again}");
    }

    // The configuration `new` wrote is valid, and every plugin loads from it.
    let jobs_config = JobsConfig::read(&config, PluginFiles::Required).unwrap();
    let jobs = jobhost::load_jobs(&runtime(), &jobs_config).await.unwrap();
    assert_eq!(jobs.len(), 3);
    let runner = runner(&pool);
    for (n, job) in jobs.iter().enumerate() {
        let msg = finished(runner.run(job, slot(n as i64)).await.unwrap(), Outcome::Ok);
        let name = &job.config.name;
        assert!(
            msg.starts_with(&format!("hello from {name} at ")),
            "{name}: {msg}"
        );
    }
}
