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
//! until then).
//!
//! Until then the host reads every job's role at start and at each reload
//! ([`check`]): a role that may create (`CREATE` on a schema) is refused
//! unless the job says `role-may-create = true`, the operator's word that
//! the job is trusted that far (a job that manages partitions needs it);
//! a superuser role, `CREATEROLE`, `BYPASSRLS` and a role that does not
//! exist are warned about.

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
    /// The job is refused for it (not only warned about).
    pub refused: bool,
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
            None => what.push((
                "does not exist: every run of the job fails".to_owned(),
                false,
            )),
            Some((_, superuser, createrole, bypassrls, creates)) => {
                if *superuser {
                    what.push(("is a superuser: the role limits nothing".to_owned(), false));
                }
                if *createrole {
                    what.push(("may create roles (CREATEROLE)".to_owned(), false));
                }
                if *bypassrls {
                    what.push(("bypasses row-level security (BYPASSRLS)".to_owned(), false));
                }
                if let Some(schemas) = creates {
                    what.push((
                        format!(
                            "may create functions (CREATE on schema {schemas}), and a function can RESET ROLE to act as {login}, or SET ROLE to any other job's role"
                        ),
                        !job.role_may_create,
                    ));
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

/// [`audit`]s `jobs` for a start or a reload: logs each finding that is not
/// refused as a warning naming the job and the role, and fails naming every
/// refused one and what to do about it. Fails too if the roles cannot be
/// read: what is not checked does not run.
pub async fn check(pool: &PgPool, jobs: &[JobConfig]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let findings = audit(pool, jobs)
        .await
        .context("cannot read the job roles' privileges (pg_roles)")?;
    let mut refused = Vec::new();
    for f in findings {
        if f.refused {
            refused.push(format!(
                "job `{}`: role `{}` {}; revoke that (`revoke create on schema … from \"{}\"`, and from PUBLIC if every role has it there: before PostgreSQL 15, `revoke create on schema public from public`), or set `role-may-create = true` for the job if it must create and is trusted that far",
                f.job, f.role, f.what, f.role
            ));
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
