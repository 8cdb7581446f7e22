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
//! [`admit`] then logs in once as each role (a password missing from the
//! password file fails the start or the reload, not every run) and records
//! it in `jobhost.job_roles` for its jobs: the gate and the run's row, which
//! the host writes in the run's transaction through `SECURITY DEFINER`
//! functions, act for a job only when the session's login role is one
//! admitted for it (migration `…_job_roles`). So one job's role cannot gate
//! or record another job's runs.

use anyhow::Context as _;
use sqlx::PgPool;

use crate::config::JobConfig;
use crate::db::quote_ident;
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
    let rows: Vec<Row> = sqlx::query_as(
        "select r.rolname::text, r.rolcanlogin, r.rolsuper, r.rolcreaterole, r.rolbypassrls
           from pg_catalog.pg_roles r
          where r.rolname = any($1)",
    )
    .bind(&roles)
    .persistent(false)
    .fetch_all(pool)
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

/// [`audit`]s `jobs` (for `jobhost check`, and before [`admit`]): logs each
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

/// Admits the roles of `jobs` for a start or a reload: [`check`]s them, logs
/// in once as each (through `runs`, the pools the runs will use), grants each
/// `USAGE` on schema `jobhost` (to call the host's functions in its runs'
/// transactions; its tables stay out of reach) and records which role runs
/// which job in `jobhost.job_roles`. Rows are only added: a reload that is
/// then rejected must not take the running role's right away.
pub async fn admit(runs: &RunPools, jobs: &[JobConfig]) -> anyhow::Result<()> {
    let host = runs.host();
    check(host, jobs).await?;
    let roles = roles_of(jobs);
    if roles.is_empty() {
        return Ok(());
    }
    log_in(runs, jobs).await?;
    let (names, of): (Vec<&str>, Vec<&str>) = jobs
        .iter()
        .filter_map(|j| Some((j.name.as_str(), j.role.as_deref()?)))
        .unzip();
    let grant = format!(
        "grant usage on schema jobhost to {}",
        roles
            .iter()
            .map(|r| quote_ident(r))
            .collect::<Vec<_>>()
            .join(", ")
    );
    crate::db::in_tx!(host, |c| {
        sqlx::raw_sql(sqlx::AssertSqlSafe(grant.clone()))
            .execute(&mut *c)
            .await?;
        sqlx::query(
            "insert into jobhost.job_roles (job, role)
             select * from unnest($1::text[], $2::text[]) on conflict do nothing",
        )
        .bind(&names)
        .bind(&of)
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
    Ok(())
}
