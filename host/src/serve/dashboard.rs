//! The read-only dashboard: what a person on call looks at first. Jobs (with
//! schedule, next slot, last outcome, success rate and p50/p95 duration over
//! the last 24 hours, paused or not), runs in flight, recent runs and
//! failures with their messages, the hosts of the fleet, advisory locks with
//! STUCK ones marked, and the plugin versions that ran. No forms, no buttons,
//! no scripts: acting is the CLI's business (`jobhost pause`, `run-now`...).

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use sqlx::PgPool;

use crate::config::{JobsConfig, LockMode};
use crate::hosts::{self, HostRow};
use crate::inspect::{self, LockRow};
use crate::runner::Job;

/// One job's line.
pub struct JobView {
    name: String,
    schedule: String,
    lock: &'static str,
    next_slot: Option<DateTime<Utc>>,
    last: Option<(String, DateTime<Utc>)>,
    ok_24h: i64,
    finished_24h: i64,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    paused: bool,
    plugin: String,
}

/// One run's line.
pub struct RunView {
    job: String,
    slot: DateTime<Utc>,
    started_at: DateTime<Utc>,
    duration_ms: Option<i64>,
    outcome: String,
    host: String,
    plugin: String,
    message: String,
}

/// A plugin version that ran.
pub struct PluginView {
    job: String,
    sha: String,
    runs: i64,
    last_run: DateTime<Utc>,
    hosts: String,
}

/// Everything the page shows, read in one go.
pub struct View {
    now: DateTime<Utc>,
    host_id: String,
    jobs: Vec<JobView>,
    in_flight: Vec<RunView>,
    recent: Vec<RunView>,
    failures: Vec<RunView>,
    fleet: Vec<HostRow>,
    locks: Vec<LockRow>,
    plugins: Vec<PluginView>,
}

/// Per job over 24 h: name, ok runs, finished runs, p50 and p95 ms of ok runs.
type JobStats = (String, i64, i64, Option<f64>, Option<f64>);

type RunTuple = (
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<i64>,
    String,
    String,
    String,
    String,
);

const RUN_COLUMNS: &str = "job, slot, started_at,
       (extract(epoch from finished_at - started_at) * 1000)::int8,
       outcome, host_id, left(plugin_sha256, 12), coalesce(message, '')";

/// Runs in flight, as rows of `jobhost.runs`: the published ones, and
/// `running` rows (which hosts of earlier versions write).
const IN_FLIGHT: &str = "(select job, slot, started_at, null::timestamptz as finished_at,
                'running'::text as outcome, host_id, plugin_sha256, null::text as message
           from jobhost.in_flight
         union all
         select job, slot, started_at, finished_at, outcome, host_id, plugin_sha256, message
           from jobhost.runs where outcome = 'running') as r";

async fn runs(
    pool: &PgPool,
    from: &str,
    filter: &str,
    order: &str,
    limit: i64,
) -> sqlx::Result<Vec<RunView>> {
    let sql =
        format!("select {RUN_COLUMNS} from {from} where {filter} order by {order} limit {limit}");
    let rows: Vec<RunTuple> = crate::db::in_tx!(pool, |c| {
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .persistent(false)
            .fetch_all(c)
            .await
    })
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(job, slot, started_at, duration_ms, outcome, host, plugin, message)| RunView {
                job,
                slot,
                started_at,
                duration_ms,
                outcome,
                host,
                plugin,
                message,
            },
        )
        .collect())
}

/// Reads what the page shows.
pub async fn gather(
    pool: &PgPool,
    config: &JobsConfig,
    jobs: &[Job],
    host_id: &str,
) -> anyhow::Result<View> {
    let now: DateTime<Utc> = crate::db::now(pool).await?;
    let stats: Vec<JobStats> = crate::db::in_tx!(pool, |c| sqlx::query_as(
        "select job,
                count(*) filter (where outcome = 'ok'),
                count(*),
                percentile_cont(0.5) within group (order by extract(epoch from finished_at - started_at) * 1000)
                    filter (where outcome = 'ok'),
                percentile_cont(0.95) within group (order by extract(epoch from finished_at - started_at) * 1000)
                    filter (where outcome = 'ok')
           from jobhost.runs
          where outcome <> 'running' and finished_at > clock_timestamp() - interval '24 hours'
          group by job",
    ).persistent(false).fetch_all(c).await).await?;
    let last: Vec<(String, String, DateTime<Utc>)> = crate::db::in_tx!(pool, |c| {
        sqlx::query_as(
            "select distinct on (job) job, outcome, finished_at from jobhost.runs
          where outcome <> 'running' order by job, id desc",
        )
        .persistent(false)
        .fetch_all(c)
        .await
    })
    .await?;
    let paused: Vec<String> = crate::db::in_tx!(pool, |c| {
        sqlx::query_scalar("select job from jobhost.paused")
            .persistent(false)
            .fetch_all(c)
            .await
    })
    .await?;
    let job_views = jobs
        .iter()
        .map(|j| {
            let name = j.config.name.clone();
            let s = stats.iter().find(|s| s.0 == name);
            JobView {
                schedule: j.config.schedule.to_string(),
                lock: match j.config.lock {
                    LockMode::Xact => "xact",
                    LockMode::Session => "session",
                },
                next_slot: j.config.schedule.next_after(now),
                last: last
                    .iter()
                    .find(|l| l.0 == name)
                    .map(|l| (l.1.clone(), l.2)),
                ok_24h: s.map_or(0, |s| s.1),
                finished_24h: s.map_or(0, |s| s.2),
                p50_ms: s.and_then(|s| s.3),
                p95_ms: s.and_then(|s| s.4),
                paused: paused.contains(&name),
                plugin: j.plugin.sha256.chars().take(12).collect(),
                name,
            }
        })
        .collect();
    let plugins: Vec<(String, String, i64, DateTime<Utc>, String)> = crate::db::in_tx!(pool, |c| {
        sqlx::query_as(
            "select job, left(plugin_sha256, 12), count(*), max(started_at),
                string_agg(distinct host_id, ', ')
           from jobhost.runs
          where started_at > clock_timestamp() - interval '24 hours'
          group by 1, 2 order by 1, 4 desc",
        )
        .persistent(false)
        .fetch_all(c)
        .await
    })
    .await?;
    Ok(View {
        now,
        host_id: host_id.to_owned(),
        jobs: job_views,
        in_flight: runs(pool, IN_FLIGHT, "true", "started_at", 100).await?,
        recent: runs(pool, "jobhost.runs", "outcome <> 'running'", "id desc", 20).await?,
        failures: runs(
            pool,
            "jobhost.runs",
            "outcome not in ('ok', 'running')",
            "id desc",
            10,
        )
        .await?,
        fleet: hosts::fleet(pool, config.host.liveness.lost_after).await?,
        locks: inspect::locks(pool, config).await?,
        plugins: plugins
            .into_iter()
            .map(|(job, sha, runs, last_run, hosts)| PluginView {
                job,
                sha,
                runs,
                last_run,
                hosts,
            })
            .collect(),
    })
}

fn when(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0} ms"))
}

const STYLE: &str = "
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1b1f24; }
h1 { font-size: 1.3rem; } h2 { font-size: 1.05rem; margin-top: 1.6rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25rem .6rem; border-bottom: 1px solid #d8dee4; vertical-align: top; }
th { background: #f6f8fa; }
td.msg { font-family: ui-monospace, monospace; font-size: 12px; max-width: 40rem; word-break: break-word; }
.ok { color: #1a7f37; } .bad { color: #cf222e; font-weight: 600; }
tr.stuck td { background: #ffebe9; } .paused { color: #9a6700; font-weight: 600; }
.muted { color: #57606a; }
";

fn outcome_class(outcome: &str) -> &'static str {
    match outcome {
        "ok" => "ok",
        "running" => "muted",
        _ => "bad",
    }
}

fn run_table(rows: &[RunView], empty: &str) -> Markup {
    html! {
        @if rows.is_empty() {
            p.muted { (empty) }
        } @else {
            table {
                tr { th { "job" } th { "slot" } th { "started" } th { "duration" } th { "outcome" } th { "host" } th { "plugin" } th { "message" } }
                @for r in rows {
                    tr {
                        td { (r.job) }
                        td { (when(&r.slot)) }
                        td { (when(&r.started_at)) }
                        td { (r.duration_ms.map_or("-".into(), |d| format!("{d} ms"))) }
                        td class=(outcome_class(&r.outcome)) { (r.outcome) }
                        td { (r.host) }
                        td { code { (r.plugin) } }
                        td.msg { (r.message) }
                    }
                }
            }
        }
    }
}

/// The page.
pub fn render(v: &View) -> Markup {
    let stuck = v.locks.iter().filter(|l| l.stuck).count();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                // A plain reload every 15 s: no script needed.
                meta http-equiv="refresh" content="15";
                title { "jobhost — " (v.host_id) }
                style { (STYLE) }
            }
            body {
                h1 { "jobhost" }
                p.muted {
                    "Host " (v.host_id) " · database time " (when(&v.now)) " · read-only: act with the CLI ("
                    code { "jobhost pause" } ", " code { "run-now" } ", " code { "resume" } ")"
                }
                @if stuck > 0 {
                    p.bad id="stuck-alert" { (stuck) " STUCK advisory lock(s): see Locks below" }
                }
                h2 { "Jobs (last 24 h)" }
                table id="jobs" {
                    tr { th { "job" } th { "schedule" } th { "lock" } th { "next slot" } th { "last outcome" } th { "success" } th { "p50" } th { "p95" } th { "plugin" } th { "state" } }
                    @for j in &v.jobs {
                        tr {
                            td { (j.name) }
                            td { (j.schedule) }
                            td { (j.lock) }
                            td { (j.next_slot.map_or("-".into(), |t| when(&t))) }
                            @match &j.last {
                                Some((outcome, at)) => td class=(outcome_class(outcome)) { (outcome) " " span.muted { (when(at)) } },
                                None => td.muted { "never ran" },
                            }
                            td {
                                @if j.finished_24h > 0 {
                                    (format!("{:.0} %", 100.0 * j.ok_24h as f64 / j.finished_24h as f64)) " of " (j.finished_24h)
                                } @else { span.muted { "-" } }
                            }
                            td { (ms(j.p50_ms)) }
                            td { (ms(j.p95_ms)) }
                            td { code { (j.plugin) } }
                            td { @if j.paused { span.paused { "PAUSED" } } @else { "active" } }
                        }
                    }
                }
                h2 { "Runs in flight" }
                (run_table(&v.in_flight, "none"))
                h2 { "Recent failures" }
                (run_table(&v.failures, "none"))
                h2 { "Recent runs" }
                (run_table(&v.recent, "none yet"))
                h2 { "Hosts" }
                table id="hosts" {
                    tr { th { "host" } th { "state" } th { "version" } th { "machine" } th { "started" } th { "last seen" } }
                    @for h in &v.fleet {
                        tr {
                            td { (h.id) }
                            td class=(if h.live { "ok" } else { "muted" }) { (if h.live { "live" } else { "gone" }) }
                            td { (h.version) }
                            td { (h.hostname) " pid " (h.pid) }
                            td { (when(&h.started_at)) }
                            td { (when(&h.last_seen)) }
                        }
                    }
                }
                h2 { "Advisory locks" }
                @if v.locks.is_empty() {
                    p.muted { "none held" }
                } @else {
                    table id="locks" {
                        tr { th { "key" } th { "job" } th { "pid" } th { "application" } th { "state" } th { "held for" } th { "verdict" } }
                        @for l in &v.locks {
                            tr class=(if l.stuck { "stuck" } else { "" }) {
                                td { (l.key) }
                                td { (l.job.as_deref().unwrap_or("-")) }
                                td { (l.pid) }
                                td { (l.application_name) }
                                td { (l.state) }
                                td { (format!("{:.1} s", l.held_for_secs)) }
                                td class=(if l.stuck { "bad" } else { "" }) { (l.verdict) }
                            }
                        }
                    }
                }
                h2 { "Plugin versions (last 24 h)" }
                table id="plugins" {
                    tr { th { "job" } th { "plugin sha-256" } th { "runs" } th { "last run" } th { "hosts" } }
                    @for p in &v.plugins {
                        tr {
                            td { (p.job) }
                            td { code { (p.sha) } }
                            td { (p.runs) }
                            td { (when(&p.last_run)) }
                            td { (p.hosts) }
                        }
                    }
                }
            }
        }
    }
}
