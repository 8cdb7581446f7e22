//! Support for the integration tests in `it/`: paths of the guest components
//! that `build.rs` compiles from `plugins/`.

/// Paths of the compiled guest components.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
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

/// A job configuration for tests and benchmarks: `xact`, every 1 s, 20 s
/// timeout, 64 MiB, no role, no HTTP, no retries; `config` as given.
pub fn job_config(name: &str, plugin: &str, config: &[(&str, &str)]) -> jobhost::config::JobConfig {
    use std::time::Duration;
    jobhost::config::JobConfig {
        name: name.into(),
        plugin: plugin.into(),
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
