//! One call of a plugin, in two steps: [instantiate](Runtime::instantiate)
//! it in a fresh store (which needs nothing of the run's transaction, so the
//! runner does it while the run's opening query is on the wire), then
//! [call](Runtime::call) it with the lent handle, under the run's timeout
//! and early stops; the handle always comes back, and the spent store with
//! it, for the runner to drop once the run has committed.

use std::time::Duration;

#[cfg(feature = "bench")]
use anyhow::Context as _;

use tokio::time::Instant;
use wasmtime::Store;
use wasmtime::component::Resource;

use super::bindings::types::{Context, Failure, Report};
use super::http::HttpGrant;
use super::plugin::Started;
use super::store::RunState;
use super::{Plugin, Runtime, SessionHandle, TxHandle};

/// What the plugin is lent for its run.
pub enum Lent {
    /// The run's locked transaction (`xact` jobs).
    Transaction(TxHandle),
    /// A session to begin short transactions from (`session` jobs).
    Session(SessionHandle),
}

/// Per-run limits.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    /// Wall-clock budget of instantiate + run.
    pub timeout: Duration,
    /// Cap on linear memory, bytes.
    pub max_memory_bytes: usize,
}

/// How the plugin's `run` ended.
#[derive(Debug)]
pub enum Returned {
    /// `run` returned (ok or err).
    Value(Result<Report, Failure>),
    /// The guest trapped (panic, memory limit, host-side failure).
    Trap(wasmtime::Error),
    /// The timeout elapsed; the guest was interrupted.
    Timeout,
    /// The host aborted the run (shutdown past its grace period).
    Interrupted,
    /// The job's session lock was lost (its connection died); the run was
    /// interrupted.
    LockLost,
}

/// The result of one invocation, with the transaction handed back.
pub struct Invocation {
    /// How `run` ended.
    pub returned: Returned,
    /// The lent handle, back from the plugin: the runner commits or rolls back
    /// an `xact` transaction; a session's leftover transactions are rolled back.
    pub lent: Lent,
    /// The run's store. Dropping it tears the instance down (its memory is
    /// reset for the pool's next run); the runner does that after the run's
    /// commit, so the teardown never holds the job's lock. `None` for the
    /// benchmark's native twin of a run.
    pub spent: Option<Spent>,
    /// Captured stdout + stderr of the guest, up to its cap.
    pub output: String,
    /// Bytes the guest wrote past the cap (dropped, not an error).
    pub output_dropped: u64,
    /// The guest's latest error-level log message (see [`TrapReport`]).
    ///
    /// [`TrapReport`]: super::TrapReport
    pub last_error: Option<String>,
}

/// A plugin instantiated for one run and not yet called.
pub struct Instance {
    store: Store<RunState>,
    /// The instance, or how instantiating it ended (a trap, the timeout).
    started: Result<Started, Returned>,
    /// When the run's budget (instantiation and call) runs out.
    deadline: Instant,
}

/// A run's store once its call is over; see [`Invocation::spent`].
pub struct Spent {
    _store: Store<RunState>,
}

/// A component with nothing in it but one core instance of a module with
/// one memory page: what wasmtime itself costs per instance on this machine
/// and engine, against which a plugin's instantiation is judged
/// (benchmarks; see [`Runtime::floor`]).
#[cfg(feature = "bench")]
pub struct Floor(wasmtime::component::InstancePre<RunState>);

impl Runtime {
    /// Instantiates `plugin` in a fresh store and drops it (benchmarks).
    /// Returns how long building the run's store data took (WASI context,
    /// output pipe, limits) and, separately, how long instantiation and
    /// teardown took: the second is what the pooling allocator speeds up.
    pub async fn instantiate_only(&self, plugin: &Plugin) -> anyhow::Result<(Duration, Duration)> {
        self.timed_instance(async |store| {
            plugin.pre.instantiate(store).await?;
            Ok(())
        })
        .await
    }

    /// Compiles `wasm`, a component that imports nothing, for
    /// [`Runtime::instantiate_floor`] (benchmarks).
    #[cfg(feature = "bench")]
    pub fn floor(&self, wasm: &[u8]) -> anyhow::Result<Floor> {
        let component = wasmtime::component::Component::new(&self.engine, wasm)
            .map_err(anyhow::Error::from)
            .context("cannot compile the floor component")?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .context("cannot link the floor component")?;
        Ok(Floor(pre))
    }

    /// [`Runtime::instantiate_only`] for the floor component: the same
    /// store, data and teardown, wasmtime's least instance in it.
    #[cfg(feature = "bench")]
    pub async fn instantiate_floor(&self, floor: &Floor) -> anyhow::Result<(Duration, Duration)> {
        self.timed_instance(async |store| {
            floor.0.instantiate_async(store).await?;
            Ok(())
        })
        .await
    }

    /// Times one run's store data being built, then `instantiate` in a
    /// store of it and the store's teardown (benchmarks).
    async fn timed_instance(
        &self,
        instantiate: impl AsyncFnOnce(&mut Store<RunState>) -> wasmtime::Result<()>,
    ) -> anyhow::Result<(Duration, Duration)> {
        let t = std::time::Instant::now();
        let state = RunState::new("bench".into(), "".into(), None, &[], 64 << 20);
        let built = t.elapsed();
        let t = std::time::Instant::now();
        let mut store = self.store(state);
        instantiate(&mut store).await?;
        drop(store);
        Ok((built, t.elapsed()))
    }

    /// A store for one run's `state`: the memory limiter, and the epoch
    /// deadline that makes a busy guest yield every tick.
    fn store(&self, state: RunState) -> Store<RunState> {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        store
    }

    /// Instantiates `plugin` for one run of `job` at `slot`, in a fresh
    /// store with the job's environment, HTTP grant and memory limit.
    /// `limits.timeout` starts now and covers the [call](Self::call) too.
    pub async fn instantiate(
        &self,
        plugin: &Plugin,
        (job, slot): (&str, &str),
        limits: RunLimits,
        env: &[(String, String)],
        http: Option<HttpGrant>,
    ) -> Instance {
        self.instances
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let deadline = Instant::now() + limits.timeout;
        let state = RunState::new(job.into(), slot.into(), http, env, limits.max_memory_bytes);
        let mut store = self.store(state);
        let instantiated = plugin.pre.instantiate(&mut store);
        let started = match tokio::time::timeout_at(deadline, instantiated).await {
            Ok(Ok(started)) => Ok(started),
            Ok(Err(trap)) => Err(Returned::Trap(trap)),
            Err(_elapsed) => Err(Returned::Timeout),
        };
        Instance {
            store,
            started,
            deadline,
        }
    }

    /// [Instantiates](Self::instantiate) `plugin` and [calls](Self::call)
    /// it, lending it `lent`.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; each argument is a distinct part of the run"
    )]
    pub async fn invoke(
        &self,
        plugin: &Plugin,
        ctx: Context,
        lent: Lent,
        limits: RunLimits,
        env: &[(String, String)],
        http: Option<HttpGrant>,
        stop: impl Future<Output = Returned>,
    ) -> Invocation {
        let instance = self
            .instantiate(
                plugin,
                (ctx.job.as_str(), ctx.slot.as_str()),
                limits,
                env,
                http,
            )
            .await;
        self.call(instance, &plugin.path, ctx, lent, stop).await
    }

    /// Calls `run` (or `run-long`) on `instance`, lending it `lent`, until it
    /// returns, its deadline passes or `stop` resolves (to why the run must
    /// end early: shutdown, lost lock). Always hands the handle back,
    /// whatever the guest did. `path` names the plugin in errors.
    pub async fn call(
        &self,
        instance: Instance,
        path: &std::path::Path,
        ctx: Context,
        lent: Lent,
        stop: impl Future<Output = Returned>,
    ) -> Invocation {
        let Instance {
            mut store,
            started,
            deadline,
        } = instance;
        let output = store.data().output.clone();
        // The table is fresh, so the push cannot fail (it only fails when full).
        let table = &mut store.data_mut().table;
        let (rep, is_session) = match lent {
            Lent::Transaction(h) => match table.push(h) {
                Ok(r) => (r.rep(), false),
                Err(_) => unreachable!("a fresh resource table has room for one entry"),
            },
            Lent::Session(h) => match table.push(h) {
                Ok(r) => (r.rep(), true),
                Err(_) => unreachable!("a fresh resource table has room for one entry"),
            },
        };

        let call = async {
            match (started?, is_session) {
                (Started::Xact(instance), false) => {
                    let lent = Resource::<TxHandle>::new_own(rep);
                    instance
                        .jobhost_plugin_xact_job()
                        .call_run(&mut store, &ctx, lent)
                        .await
                        .map_err(Returned::Trap)
                }
                (Started::Session(instance), true) => {
                    let lent = Resource::<SessionHandle>::new_own(rep);
                    instance
                        .jobhost_plugin_session_job()
                        .call_run_long(&mut store, &ctx, lent)
                        .await
                        .map_err(Returned::Trap)
                }
                // The job set refuses this pairing before anything runs.
                _ => Err(Returned::Trap(wasmtime::Error::msg(format!(
                    "plugin `{}` is of the other kind for this job's lock mode",
                    path.display()
                )))),
            }
        };
        let returned = tokio::select! {
            r = tokio::time::timeout_at(deadline, call) => match r {
                Ok(Ok(value)) => Returned::Value(value),
                Ok(Err(ended)) => ended,
                Err(_elapsed) => Returned::Timeout,
            },
            why = stop => why,
        };
        let table = &mut store.data_mut().table;
        // The runner's entry is only ever removed here.
        let lent = if is_session {
            let session = match table.delete(Resource::<SessionHandle>::new_own(rep)) {
                Ok(s) => s,
                Err(e) => unreachable!("the lent session vanished from the table: {e}"),
            };
            // Roll back whatever the plugin left open. A plugin that was cut
            // off may have left a statement half-way through the protocol:
            // close those connections instead (Postgres rolls back).
            let cut_off = !matches!(returned, Returned::Value(_) | Returned::Trap(_));
            for &tx in session.began() {
                if let Ok(mut h) = table.delete(Resource::<TxHandle>::new_own(tx)) {
                    if cut_off {
                        h.abandon();
                    } else {
                        h.rollback().await;
                    }
                }
            }
            Lent::Session(session)
        } else {
            match table.delete(Resource::<TxHandle>::new_own(rep)) {
                Ok(h) => Lent::Transaction(h),
                Err(e) => unreachable!("the lent transaction vanished from the table: {e}"),
            }
        };
        let last_error = store.data_mut().last_error.take();
        let (output, output_dropped) = output.contents();
        Invocation {
            returned,
            lent,
            spent: Some(Spent { _store: store }),
            output,
            output_dropped,
            last_error,
        }
    }
}
