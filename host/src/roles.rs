//! What a job's role may do that would undo what the role is for: limiting
//! the job to its own tables.
//!
//! A run's transaction is `SET LOCAL ROLE` the job's role, but its
//! connection logs in as the host's role, and Postgres lets any code in the
//! transaction `RESET ROLE` (or `SET ROLE NONE`) back to the login role, or
//! `SET ROLE` to any role the login role may become (every other job's):
//! only `SECURITY DEFINER` functions are refused that. The guard refuses such a
//! statement from the plugin, but cannot see into the bodies of functions
//! the job's role creates. So a job role that may create functions (`CREATE`
//! on any schema) can run as the host's login role, and a superuser login
//! can run programs on the database server (`COPY ... TO PROGRAM`). The hole
//! closes only when a run's connection logs in as the job's role (DESIGN §7,
//! the test `hygiene::a_job_role_cannot_become_the_hosts_login_role`, ignored
//! until then). Until then the host says so, at start and at each reload,
//! for each job whose role is such a role, or no role at all that exists.

use sqlx::PgPool;

use crate::config::JobConfig;

/// One thing a job's role may do that it should not, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The job.
    pub job: String,
    /// Its role.
    pub role: String,
    /// What the role may do, and what that means.
    pub what: String,
}

/// The roles of `jobs`, read from `pg_roles`: each finding names the job, the
/// role and why it matters. Jobs without a `role` are not audited: they run
/// with the host's rights by design (DESIGN §7).
pub async fn audit(pool: &PgPool, jobs: &[JobConfig]) -> sqlx::Result<Vec<Finding>> {
    let mut roles: Vec<&str> = jobs.iter().filter_map(|j| j.role.as_deref()).collect();
    roles.sort_unstable();
    roles.dedup();
    if roles.is_empty() {
        return Ok(Vec::new());
    }
    type Row = (String, bool, bool, bool, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "select r.rolname::text, r.rolsuper, r.rolcreaterole, r.rolbypassrls,
                (select string_agg(n.nspname::text, ', ' order by n.nspname)
                   from pg_catalog.pg_namespace n
                  where pg_catalog.has_schema_privilege(r.oid, n.oid, 'CREATE')
                    and n.nspname <> 'pg_toast' and n.nspname not like 'pg\\_temp\\_%'
                    and n.nspname not like 'pg\\_toast\\_temp\\_%')
           from pg_catalog.pg_roles r
          where r.rolname = any($1)",
    )
    .bind(&roles)
    .persistent(false)
    .fetch_all(pool)
    .await?;
    let login_is_superuser: bool =
        sqlx::query_scalar("select rolsuper from pg_catalog.pg_roles where rolname = session_user")
            .persistent(false)
            .fetch_one(pool)
            .await?;
    let login = if login_is_superuser {
        "the host's login role, a superuser (so also run programs on the database server)"
    } else {
        "the host's login role"
    };
    let mut findings = Vec::new();
    for job in jobs {
        let Some(role) = job.role.as_deref() else {
            continue;
        };
        let mut what = Vec::new();
        match rows.iter().find(|r| r.0 == role) {
            None => what.push("does not exist: every run of the job fails".to_owned()),
            Some((_, superuser, createrole, bypassrls, creates)) => {
                if *superuser {
                    what.push("is a superuser: the role limits nothing".to_owned());
                }
                if *createrole {
                    what.push("may create roles (CREATEROLE)".to_owned());
                }
                if *bypassrls {
                    what.push("bypasses row-level security (BYPASSRLS)".to_owned());
                }
                if let Some(schemas) = creates {
                    what.push(format!(
                        "may create functions (CREATE on schema {schemas}), and a function can RESET ROLE to act as {login}, or SET ROLE to any other job's role"
                    ));
                }
            }
        }
        findings.extend(what.into_iter().map(|what| Finding {
            job: job.name.clone(),
            role: role.to_owned(),
            what,
        }));
    }
    Ok(findings)
}

/// [`audit`]s `jobs` and logs each finding as a warning naming the job and
/// the role; a failure to read the roles is logged too, never fatal.
pub async fn warn_about(pool: &PgPool, jobs: &[JobConfig]) {
    match audit(pool, jobs).await {
        Ok(findings) => {
            for f in findings {
                tracing::warn!(job = %f.job, role = %f.role, event = "job_role_unsafe", "job role `{}` {}", f.role, f.what);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the job roles' privileges (pg_roles)");
        }
    }
}
