//! The job roles: read at start, at each reload and by `jobhost check`, then
//! admitted for their jobs.
//!
//! A job with a `role` runs on connections that log in as that role
//! ([`crate::pools`]): nothing its code does in the transaction (a function
//! that `RESET ROLE`s, a deferred trigger) reaches the host's rights, since
//! the session's user is the role itself. For that the role must be able to
//! log in, so a role that cannot (`NOLOGIN`, the default of `CREATE ROLE`)
//! or does not exist is refused, naming the job and the fix. A role that
//! limits nothing (a superuser, `BYPASSRLS`) or may create roles
//! (`CREATEROLE`) is warned about: the job then has those rights.
//!
//! [`Admitted::admit`] then logs in once as each role (a password missing
//! from the password file fails the start or the reload, not every run) and
//! claims it in `jobhost.job_roles` for its jobs: the gate and the run's
//! row, which the host writes in the run's transaction through `SECURITY
//! DEFINER` functions, act for a job only when the session's login role is
//! one some host claims for it (migration `…_job_roles`). So one job's role
//! cannot gate or record another job's runs; and the claims follow what the
//! hosts run ([`Admitted`]), so a role the jobs no longer name loses the
//! right once no run of the old configuration can be in flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::PgPool;

use crate::config::JobConfig;
use crate::db::{quote_ident, quote_literal};
use crate::pools::RunPools;

/// One thing about a job's role the operator must know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The job.
    pub job: String,
    /// Its role.
    pub role: String,
    /// What the role may do, or why it cannot serve.
    pub what: String,
    /// The job is refused for it (not only warned about).
    pub refused: bool,
}

/// The distinct roles of `jobs`, sorted.
fn roles_of(jobs: &[JobConfig]) -> Vec<&str> {
    let mut roles: Vec<&str> = jobs.iter().filter_map(|j| j.role.as_deref()).collect();
    roles.sort_unstable();
    roles.dedup();
    roles
}

/// The roles of `jobs`, read from `pg_roles`: each finding names the job, the
/// role and why it matters. Jobs without a `role` are not audited: they run
/// with the host's rights by design (DESIGN §7).
pub async fn audit(pool: &PgPool, jobs: &[JobConfig]) -> sqlx::Result<Vec<Finding>> {
    let roles = roles_of(jobs);
    if roles.is_empty() {
        return Ok(Vec::new());
    }
    type Row = (String, bool, bool, bool, bool);
    // In a transaction of its own, as every host statement with parameters:
    // through a transaction pooler its parse and its execution would
    // otherwise be two syncs that may reach two server sessions
    // (`pooler::job_roles_are_read_through_a_transaction_pooler`).
    let rows: Vec<Row> = crate::db::in_tx!(pool, |c| {
        sqlx::query_as(
            "select r.rolname::text, r.rolcanlogin, r.rolsuper, r.rolcreaterole, r.rolbypassrls
               from pg_catalog.pg_roles r
              where r.rolname = any($1)",
        )
        .bind(&roles)
        .persistent(false)
        .fetch_all(c)
        .await
    })
    .await?;
    let mut findings = Vec::new();
    for job in jobs {
        let Some(role) = job.role.as_deref() else {
            continue;
        };
        let mut what = Vec::new();
        match rows.iter().find(|r| r.0 == role) {
            None => what.push((
                format!("does not exist (`create role {} login`)", quote_ident(role)),
                true,
            )),
            Some((_, can_login, superuser, createrole, bypassrls)) => {
                if !can_login {
                    what.push((
                        format!(
                            "cannot log in, and a job's runs log in as its role (`alter role {} login`)",
                            quote_ident(role)
                        ),
                        true,
                    ));
                }
                if *superuser {
                    what.push(("is a superuser: the role limits nothing".to_owned(), false));
                }
                if *createrole {
                    what.push(("may create roles (CREATEROLE)".to_owned(), false));
                }
                if *bypassrls {
                    what.push(("bypasses row-level security (BYPASSRLS)".to_owned(), false));
                }
            }
        }
        findings.extend(what.into_iter().map(|(what, refused)| Finding {
            job: job.name.clone(),
            role: role.to_owned(),
            what,
            refused,
        }));
    }
    Ok(findings)
}

/// [`audit`]s `jobs` (for `jobhost check`, and before [`Admitted::admit`]): logs each
/// finding that is not refused as a warning naming the job and the role, and
/// fails naming every refused one and what to do about it. Fails too if the
/// roles cannot be read: what is not checked does not run.
pub async fn check(pool: &PgPool, jobs: &[JobConfig]) -> anyhow::Result<()> {
    let findings = audit(pool, jobs)
        .await
        .context("cannot read the job roles (pg_roles)")?;
    let mut refused = Vec::new();
    for f in findings {
        if f.refused {
            refused.push(format!("job `{}`: role `{}` {}", f.job, f.role, f.what));
        } else {
            tracing::warn!(job = %f.job, role = %f.role, event = "job_role_unsafe", "job role `{}` {}", f.role, f.what);
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", refused.join("\n"))
    }
}

/// Logs in once as each role of `jobs` through `runs` (the pools the runs
/// will use): a password missing from the password file, a role out of
/// connections or refused by `pg_hba.conf` fails here, naming the job.
pub async fn log_in(runs: &RunPools, jobs: &[JobConfig]) -> anyhow::Result<()> {
    for role in roles_of(jobs) {
        let job = jobs
            .iter()
            .find(|j| j.role.as_deref() == Some(role))
            .map_or("", |j| j.name.as_str());
        let pool = runs.pool(Some(role))?;
        pool.acquire().await.with_context(|| {
            format!(
                "job `{job}`: cannot log in as its role `{role}` (a job's runs log in as its role: give it a password in the password file, PGPASSFILE or ~/.pgpass, for this host, port and database, or let pg_hba.conf admit it)"
            )
        })?;
    }
    Ok(())
}

/// This host's admissions: which (job, role) pairs it claims in
/// `jobhost.job_roles`, under its host id (migration `…_job_role_claims`).
///
/// The claims follow the jobs the host runs, so a role stops being able to
/// act for a job once no host runs the job as it:
///
/// - [`Admitted::admit`] adds a start's or a reload's pairs before any run
///   uses them (a reload that is then rejected has taken nothing away);
/// - [`Admitted::settle`], once a reload is applied or rejected, retires the
///   pairs the host no longer runs: each stays until a run of the old
///   configuration can no longer be in flight (the job's timeout plus the
///   deadline margin, after which Postgres has ended its transaction);
/// - [`Admitted::renew`], at each heartbeat, makes the host's rows exactly
///   what it holds (deleting the retired ones, writing back any that a
///   reaper took while this host looked dead), and deletes the rows of
///   hosts that are not live;
/// - [`Admitted::release`] deletes them all at a graceful stop.
///
/// One lock orders these, so a heartbeat never writes back a pair a settle
/// has just retired, nor deletes one an admission has just added.
#[derive(Debug, Clone)]
pub struct Admitted {
    host_id: Arc<str>,
    held: Arc<tokio::sync::Mutex<BTreeMap<(String, String), Held>>>,
}

/// How this host holds one (job, role) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// A running (or just admitted) job runs as the role.
    InUse,
    /// No longer: kept until a run that began before can no longer be in
    /// flight.
    RetiredUntil(Instant),
}

impl Admitted {
    /// No admissions yet, for host `host_id`.
    pub fn new(host_id: &str) -> Self {
        Self {
            host_id: host_id.into(),
            held: Arc::default(),
        }
    }

    /// The pairs this host claims now (retired ones included until they
    /// expire), sorted.
    pub async fn held(&self) -> Vec<(String, String)> {
        self.held.lock().await.keys().cloned().collect()
    }

    /// Admits the roles of `jobs` for a start or a reload: [`check`]s them,
    /// logs in once as each (through `runs`, the pools the runs will use),
    /// grants each `USAGE` on schema `jobhost` (to call the host's functions
    /// in its runs' transactions; its tables stay out of reach) and claims
    /// each (job, role) pair in `jobhost.job_roles`. Only adds: what the host
    /// runs now keeps its claims until [`Admitted::settle`].
    pub async fn admit(&self, runs: &RunPools, jobs: &[JobConfig]) -> anyhow::Result<()> {
        let host = runs.host();
        check(host, jobs).await?;
        let roles = roles_of(jobs);
        if roles.is_empty() {
            return Ok(());
        }
        log_in(runs, jobs).await?;
        let pairs = pairs_of(jobs);
        let (names, of): (Vec<&str>, Vec<&str>) =
            pairs.iter().map(|(j, r)| (j.as_str(), r.as_str())).unzip();
        let grant = format!(
            "grant usage on schema jobhost to {}",
            roles
                .iter()
                .map(|r| quote_ident(r))
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Held across the write: a heartbeat in between would delete the
        // rows as not held, or miss them.
        let mut held = self.held.lock().await;
        crate::db::in_tx!(host, |c| {
            sqlx::raw_sql(sqlx::AssertSqlSafe(grant.clone()))
                .execute(&mut *c)
                .await?;
            sqlx::query(
                "insert into jobhost.job_roles (job, role, host_id)
                 select j, r, $3 from unnest($1::text[], $2::text[]) u(j, r)
                 on conflict do nothing",
            )
            .bind(&names)
            .bind(&of)
            .bind(&*self.host_id)
            .persistent(false)
            .execute(&mut *c)
            .await
        })
        .await
        .with_context(|| {
            format!(
                "cannot admit the job roles ({}) in jobhost.job_roles",
                roles.join(", ")
            )
        })?;
        for pair in pairs {
            held.insert(pair, Held::InUse);
        }
        Ok(())
    }

    /// After a reload is applied or rejected: `running` is what the host
    /// runs from now on, `was` what it ran before. A pair no longer in
    /// `running` is retired: kept for the timeout (plus the deadline margin)
    /// of its job in `was`, which bounds a run that began before, or dropped
    /// at the next [`Admitted::renew`] if no running job used it (a rejected
    /// reload's). Writes nothing: the next heartbeat does.
    pub async fn settle(&self, was: &[JobConfig], running: &[JobConfig]) {
        let keep = pairs_of(running);
        let now = Instant::now();
        let mut held = self.held.lock().await;
        for (pair, how) in held.iter_mut() {
            if keep.contains(pair) {
                *how = Held::InUse;
            } else if *how == Held::InUse {
                let ran = was
                    .iter()
                    .find(|j| j.name == pair.0 && j.role.as_deref() == Some(pair.1.as_str()));
                *how = Held::RetiredUntil(
                    ran.map_or(now, |j| now + j.timeout + crate::db::DEADLINE_MARGIN),
                );
            }
        }
        for pair in keep {
            held.entry(pair).or_insert(Held::InUse);
        }
    }

    /// One heartbeat's pass over `jobhost.job_roles`, in one simple query:
    /// this host's rows become exactly the pairs it holds (expired retired
    /// ones dropped; rows deleted while it looked dead written back), and
    /// the rows of hosts not live for `lost_after` (stopped, or not seen),
    /// older than that, are deleted. Rows with the empty host id (written
    /// by hosts of an earlier version) are left to the operator.
    pub async fn renew(&self, pool: &PgPool, lost_after: Duration) -> sqlx::Result<()> {
        self.renew_at(pool, lost_after, Instant::now()).await
    }

    /// [`Admitted::renew`] as a heartbeat at `now` does it (a later instant:
    /// which retired pairs have expired by then).
    pub async fn renew_at(
        &self,
        pool: &PgPool,
        lost_after: Duration,
        now: Instant,
    ) -> sqlx::Result<()> {
        let mut held = self.held.lock().await;
        held.retain(|_, how| !matches!(how, Held::RetiredUntil(t) if *t <= now));
        let list = |pick: fn(&(String, String)) -> &str| {
            let items: Vec<String> = held.keys().map(|p| quote_literal(pick(p))).collect();
            format!("array[{}]::text[]", items.join(", "))
        };
        let (jobs, roles) = (list(|p| &p.0), list(|p| &p.1));
        let me = quote_literal(&self.host_id);
        let lost_after = lost_after.as_secs_f64();
        // Another host's reaper may be deleting the same dead host's rows:
        // `skip locked` lets each take what the other has not, not wait.
        let sql = format!(
            "delete from jobhost.job_roles r
              where r.host_id = {me}
                and (r.job, r.role::text) not in (select * from unnest({jobs}, {roles}));
             insert into jobhost.job_roles (job, role, host_id)
             select j, r, {me} from unnest({jobs}, {roles}) u(j, r)
             on conflict do nothing;
             delete from jobhost.job_roles r
              using (select job, role, host_id from jobhost.job_roles d
                      where d.host_id not in ('', {me})
                        and d.admitted_at < clock_timestamp() - make_interval(secs => {lost_after})
                        and not exists (
                            select 1 from jobhost.hosts h
                             where h.id = d.host_id and h.stopped_at is null
                               and h.last_seen > clock_timestamp() - make_interval(secs => {lost_after}))
                        for update skip locked) gone
              where (r.job, r.role, r.host_id) = (gone.job, gone.role, gone.host_id)"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await?;
        Ok(())
    }

    /// At a graceful stop, once every run has ended: this host's claims are
    /// deleted.
    pub async fn release(&self, pool: &PgPool) -> sqlx::Result<()> {
        let mut held = self.held.lock().await;
        crate::db::in_tx!(pool, |c| {
            sqlx::query("delete from jobhost.job_roles where host_id = $1")
                .bind(&*self.host_id)
                .persistent(false)
                .execute(c)
                .await
        })
        .await?;
        held.clear();
        Ok(())
    }
}

/// The (job, role) pairs of `jobs`.
fn pairs_of(jobs: &[JobConfig]) -> Vec<(String, String)> {
    jobs.iter()
        .filter_map(|j| Some((j.name.clone(), j.role.clone()?)))
        .collect()
}
