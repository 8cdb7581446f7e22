//! The connections runs use: the host's pool for jobs without a `role`, and
//! one pool per job role whose connections **log in as that role**.
//!
//! Why log in as the role, rather than `SET LOCAL ROLE` on the host's
//! connection: Postgres lets any code in a transaction `RESET ROLE` back to
//! the session's login role (or `SET ROLE` to any role the login may
//! become), and the guard cannot see into the body of a function a job's
//! role created. On a connection that logs in as the job's role there is
//! nothing above it to go back to: the session user is the job's role, for
//! its statements, the functions they call and its deferred triggers alike.
//! The host's own bookkeeping in that transaction (the gate, the run's row)
//! goes through `SECURITY DEFINER` functions that act only for a role
//! admitted for the job (migration `…_job_roles`, [`crate::roles::Admitted::admit`]).
//!
//! Every pool is sized like the host's, and runs share one budget of
//! `pool-size` connections across them all ([`RunPools::acquire`]): the
//! instance pool is sized by that budget ([`crate::jobset::allocation`]), so
//! a host with many roles runs no more at once than a host with one. A role
//! pool's idle connections close after [`ROLE_IDLE_TIMEOUT`].
//!
//! A role's password comes from the libpq password file (`PGPASSFILE`, or
//! `~/.pgpass`), matched on the host, port, database and the role's name;
//! never from `DATABASE_URL`, which is the host's. Trust, peer or
//! certificate authentication needs none.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgPool, Postgres};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::config::Pooler;

/// How long a job role's connection may sit idle in its pool before it is
/// closed: a role whose job runs every few minutes does not keep a server
/// session for ever.
pub const ROLE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a run waits for a connection (or its place in the budget).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many runs in a row may take a connection straight from the run before
/// them (`Leased::give_back`) before it goes back through its pool, where
/// whatever else waits for it gets its turn.
pub const HAND_ON_LIMIT: u32 = 4;

/// How long a connection may sit idle in a pool and still be lent without
/// a check (see [`pool_options`]).
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The options every pool of the host is made from (the host's and each
/// role's): a connection that sat idle for [`PING_AFTER_IDLE`] or more is
/// checked with a round trip before it is lent; one used more recently is
/// lent as it is.
///
/// Why not sqlx's default, which checks every connection at every acquire:
/// that check is a round trip of its own (a `Sync`, answered by
/// `ReadyForQuery`), in front of the two a run is made of. On a busy host,
/// whose connections go from run to run, it was one more round trip in
/// three for no news, and more where the database is a network hop away.
/// A connection the server closed a moment ago (a restart,
/// `pg_terminate_backend`, `idle_session_timeout`) is then found by the
/// first statement sent on it, and opening a transaction replaces it
/// ([`crate::tx::OpenTx::begin`]). A connection that sat idle long enough
/// for such news to be likely is still checked first, so the host's work
/// outside runs (heartbeats, publications, both tried again at their next
/// turn) meets a closed connection only when the server closed it within
/// the last [`PING_AFTER_IDLE`].
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// The run connections (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct RunPools {
    inner: Arc<Inner>,
}

struct Inner {
    /// `DATABASE_URL`'s pool: jobs without a role, and the host's own work.
    host: Arc<Lane>,
    /// What a role's connect options are made from.
    template: Template,
    /// The role pools made so far.
    roles: Mutex<HashMap<String, Arc<Lane>>>,
    /// Connections runs may hold at once, across every pool.
    budget: Arc<Semaphore>,
    size: u32,
}

/// One pool of [`RunPools`] and the runs waiting for one of its connections.
pub(crate) struct Lane {
    pool: PgPool,
    waiting: Mutex<Waiting>,
}

/// The runs waiting for a [`Lane`]'s connection, longest first, each with the
/// number its [`Waiter`] removes it by.
#[derive(Default)]
struct Waiting {
    next: u64,
    queue: VecDeque<(u64, oneshot::Sender<Leased>)>,
}

/// A run's place in a [`Lane`]'s queue: left when it is dropped (the run got
/// a connection another way, or stopped waiting).
struct Waiter<'a> {
    lane: &'a Lane,
    id: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut waiting = self.lane.waiting();
        if let Some(at) = waiting.queue.iter().position(|(id, _)| *id == self.id) {
            waiting.queue.remove(at);
        }
    }
}

impl Lane {
    fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            waiting: Mutex::default(),
        })
    }

    /// Only pushes and pops under the lock: a poisoned one is whole.
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the queue: what a finished run hands on arrives on the receiver.
    fn wait(&self) -> (Waiter<'_>, oneshot::Receiver<Leased>) {
        let (send, receive) = oneshot::channel();
        let mut waiting = self.waiting();
        let id = waiting.next;
        waiting.next += 1;
        waiting.queue.push_back((id, send));
        (Waiter { lane: self, id }, receive)
    }

    /// A connection from the pool, in the budget's place `permit`.
    async fn lend(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> sqlx::Result<Leased> {
        let conn = self.pool.acquire().await?;
        Ok(Leased {
            conn,
            permit: Some(permit),
            lane: Some(self.clone()),
            handed: 0,
        })
    }
}

/// A run's connection with its place in the budget; both are given back
/// when it is dropped, or handed on together (`Leased::give_back`).
pub struct Leased {
    /// The connection.
    pub conn: PoolConnection<Postgres>,
    /// Its place in [`RunPools`]' budget (`None`: a connection taken outside
    /// it, as tests do).
    pub permit: Option<OwnedSemaphorePermit>,
    /// The pool it came from and its queue; `None`: taken outside
    /// [`RunPools`], never replaced nor handed on.
    lane: Option<Arc<Lane>>,
    /// How many runs in a row it was handed to without going back.
    handed: u32,
}

impl Leased {
    /// The pool the connection came from, for a replacement if it turns out
    /// to be gone ([`crate::tx::OpenTx::begin`]).
    pub fn pool(&self) -> Option<&PgPool> {
        self.lane.as_ref().map(|lane| &lane.pool)
    }

    /// Gives back a connection **proven clean** (its transaction ended and the
    /// session check found nothing left: [`crate::tx::OpenTx`] only calls
    /// this then): to the run that has waited longest for one of its pool,
    /// with the place in the budget, unless [`HAND_ON_LIMIT`] runs in a row
    /// had it already; otherwise (or if no run waits) back to the pool, which
    /// checks it (see the module docs).
    pub(crate) fn give_back(mut self) {
        let Some(lane) = self.lane.clone() else {
            return;
        };
        if self.handed >= HAND_ON_LIMIT {
            return;
        }
        self.handed += 1;
        loop {
            let Some((_, next)) = lane.waiting().queue.pop_front() else {
                return;
            };
            // Refused only by a run that stopped waiting a moment ago.
            match next.send(self) {
                Ok(()) => return,
                Err(back) => self = back,
            }
        }
    }
}

/// What a role pool's connect options are made from.
pub enum Template {
    /// The host's `DATABASE_URL` without its password, with the host's
    /// adjustments ([`crate::db::connect_options`]): parsed again with each
    /// role as its user, so that the password file is searched for that
    /// role (never for the host's user).
    Url {
        /// The URL, without its password.
        url: url::Url,
        /// What it leads to.
        pooler: Pooler,
        /// The connections' `application_name`.
        application_name: String,
    },
    /// These options with the role as their user: for a pool made without a
    /// URL (tests), where no password is involved.
    Options(Box<PgConnectOptions>),
}

impl Template {
    /// The host's `DATABASE_URL`, `url`, as a template (its password dropped).
    pub fn from_url(url: &str, pooler: Pooler, application_name: &str) -> anyhow::Result<Self> {
        let mut url = url::Url::parse(url)
            .context("invalid DATABASE_URL (expected postgres://user@host:port/db)")?;
        // Only fails for a URL that cannot have a user (`mailto:`...).
        let _ = url.set_password(None);
        Ok(Self::Url {
            url,
            pooler,
            application_name: application_name.to_owned(),
        })
    }

    /// `role`'s connect options.
    fn options(&self, role: &str) -> anyhow::Result<PgConnectOptions> {
        match self {
            Template::Url {
                url,
                pooler,
                application_name,
            } => {
                let mut with_role = url.clone();
                let connect = |url: &url::Url| {
                    crate::db::connect_options(
                        url.as_str(),
                        "DATABASE_URL",
                        *pooler,
                        application_name,
                    )
                };
                match with_role.set_username(role) {
                    Ok(()) => connect(&with_role),
                    // A URL without a host part (`postgres:///db?host=/run/
                    // postgresql`, a Unix socket) cannot carry a user: set it
                    // on the options instead.
                    Err(()) => Ok(connect(url)?.username(role)),
                }
            }
            Template::Options(options) => Ok((**options).clone().username(role)),
        }
    }
}

impl From<PoolConnection<Postgres>> for Leased {
    fn from(conn: PoolConnection<Postgres>) -> Self {
        Self {
            conn,
            permit: None,
            lane: None,
            handed: 0,
        }
    }
}

impl RunPools {
    /// Run pools over `host`, whose role pools connect with `template` (see
    /// [`Template`]), the budget being `host`'s size.
    pub fn new(host: PgPool, template: Template) -> Self {
        let size = host.options().get_max_connections();
        Self {
            inner: Arc::new(Inner {
                host: Lane::new(host),
                template,
                roles: Mutex::default(),
                budget: Arc::new(Semaphore::new(size as usize)),
                size,
            }),
        }
    }

    /// Run pools over `host` whose roles connect as `host` does, for a pool
    /// made without a URL (tests, where no password is involved).
    pub fn over(host: PgPool) -> Self {
        let template = Template::Options(Box::new((*host.connect_options()).clone()));
        Self::new(host, template)
    }

    /// The host's pool.
    pub fn host(&self) -> &PgPool {
        &self.inner.host.pool
    }

    /// The pool runs of a job with `role` take connections from (made the
    /// first time; it connects lazily).
    pub fn pool(&self, role: Option<&str>) -> sqlx::Result<PgPool> {
        Ok(self.lane(role)?.pool.clone())
    }

    /// [`pool`](Self::pool) with its queue.
    fn lane(&self, role: Option<&str>) -> sqlx::Result<Arc<Lane>> {
        let Some(role) = role else {
            return Ok(self.inner.host.clone());
        };
        // Only inserts and clones under the lock: a poisoned one is whole.
        let mut roles = self.inner.roles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = roles.get(role) {
            return Ok(lane.clone());
        }
        let options = self
            .inner
            .template
            .options(role)
            .map_err(|e| sqlx::Error::Configuration(e.into()))?;
        let pool = pool_options()
            .max_connections(self.inner.size)
            .min_connections(0)
            .idle_timeout(ROLE_IDLE_TIMEOUT)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        let lane = Lane::new(pool);
        roles.insert(role.to_owned(), lane.clone());
        Ok(lane)
    }

    /// A connection for a run of a job with `role`, within the budget: it
    /// waits (up to 10 s) while runs hold `pool-size` connections across
    /// every pool, for whichever comes first: a place in the budget, or a
    /// connection a finished run hands on (`Leased::give_back`).
    pub async fn acquire(&self, role: Option<&str>) -> sqlx::Result<Leased> {
        let lane = self.lane(role)?;
        // A place free now: nothing to wait for, no queue to join.
        if let Ok(permit) = self.inner.budget.clone().try_acquire_owned() {
            return lane.lend(permit).await;
        }
        let (_waiter, handed) = lane.wait();
        let fresh = async {
            let permit = self.inner.budget.clone().acquire_owned().await;
            lane.lend(permit.map_err(|_| sqlx::Error::PoolClosed)?)
                .await
        };
        let either = async {
            tokio::select! {
                // A connection handed on is ready to use: prefer it. A sender
                // dropped unsent (the lane went away) disables this branch.
                biased;
                Ok(leased) = handed => Ok(leased),
                leased = fresh => leased,
            }
        };
        tokio::time::timeout(ACQUIRE_TIMEOUT, either)
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    /// How many runs wait for a connection now: every place in the budget
    /// is taken (each waits for a place, or for a connection handed on).
    pub fn waiting(&self) -> usize {
        let roles = self.inner.roles.lock().unwrap_or_else(|p| p.into_inner());
        std::iter::once(&self.inner.host)
            .chain(roles.values())
            .map(|lane| lane.waiting().queue.len())
            .sum()
    }

    /// Closes every role pool made so far (the host's is its owner's to
    /// close); a role used after this gets a new one.
    pub async fn close_roles(&self) {
        let pools: Vec<PgPool> = {
            let mut roles = self.inner.roles.lock().unwrap_or_else(|p| p.into_inner());
            roles.drain().map(|(_, lane)| lane.pool.clone()).collect()
        };
        for pool in pools {
            pool.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A role's options carry the role as their user and never the host's
    /// password, whatever form `DATABASE_URL` takes.
    #[test]
    fn a_role_connects_as_itself_without_the_hosts_password() {
        for url in [
            "postgres://host:secret@db.internal:6432/app?sslmode=prefer",
            "postgres:///app?host=/run/postgresql",
        ] {
            let template = Template::from_url(url, Pooler::None, "jobhost:test").unwrap();
            let options = template.options("jobhost_demo_hash").unwrap();
            assert_eq!(options.get_username(), "jobhost_demo_hash", "{url}");
            assert_eq!(options.get_database(), Some("app"), "{url}");
            assert!(
                !format!("{options:?}").contains("secret"),
                "{url}: the host's password reached a role's options"
            );
        }
    }
}
