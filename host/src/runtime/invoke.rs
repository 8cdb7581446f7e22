//! One call of a plugin: a fresh store, the lent handle, the run's timeout
//! and early stops; the handle always comes back.

use std::time::Duration;

use wasmtime::Store;
use wasmtime::component::Resource;

use super::bindings::types::{Context, Failure, Report};
use super::http::HttpGrant;
use super::plugin::PluginPre;
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
    /// Captured stdout + stderr of the guest, up to its cap.
    pub output: String,
    /// Bytes the guest wrote past the cap (dropped, not an error).
    pub output_dropped: u64,
    /// The guest's latest error-level log message (see [`TrapReport`]).
    ///
    /// [`TrapReport`]: super::TrapReport
    pub last_error: Option<String>,
}

impl Runtime {
    /// Instantiates `plugin` in a fresh store and drops it (benchmarks).
    /// Returns how long building the run's store data took (WASI context,
    /// output pipe, limits) and, separately, how long instantiation and
    /// teardown took: the second is what the pooling allocator speeds up.
    pub async fn instantiate_only(&self, plugin: &Plugin) -> anyhow::Result<(Duration, Duration)> {
        let t = std::time::Instant::now();
        let state = RunState::new("bench".into(), "".into(), None, &[], 64 << 20);
        let built = t.elapsed();
        let t = std::time::Instant::now();
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        plugin.pre.instantiate(&mut store).await?;
        drop(store);
        Ok((built, t.elapsed()))
    }

    /// Instantiates `plugin` in a fresh store and calls `run`, lending it
    /// `lent`. Always hands the handle back, whatever the guest did. `stop`
    /// resolves to why the run must end early (shutdown, lost lock).
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
        let mut state = RunState::new(
            ctx.job.as_str().into(),
            ctx.slot.as_str().into(),
            http,
            env,
            limits.max_memory_bytes,
        );
        let output = state.output.clone();
        // The table is fresh, so the push cannot fail (it only fails when full).
        let (rep, is_session) = match lent {
            Lent::Transaction(h) => match state.table.push(h) {
                Ok(r) => (r.rep(), false),
                Err(_) => unreachable!("a fresh resource table has room for one entry"),
            },
            Lent::Session(h) => match state.table.push(h) {
                Ok(r) => (r.rep(), true),
                Err(_) => unreachable!("a fresh resource table has room for one entry"),
            },
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);

        let call = async {
            match (&plugin.pre, is_session) {
                (PluginPre::Xact(pre), false) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let lent = Resource::<TxHandle>::new_own(rep);
                    instance
                        .jobhost_plugin_xact_job()
                        .call_run(&mut store, &ctx, lent)
                        .await
                }
                (PluginPre::Session(pre), true) => {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let lent = Resource::<SessionHandle>::new_own(rep);
                    instance
                        .jobhost_plugin_session_job()
                        .call_run_long(&mut store, &ctx, lent)
                        .await
                }
                // The job set refuses this pairing before anything runs.
                _ => Err(wasmtime::Error::msg(format!(
                    "plugin `{}` is of the other kind for this job's lock mode",
                    plugin.path.display()
                ))),
            }
        };
        let returned = tokio::select! {
            r = tokio::time::timeout(limits.timeout, call) => match r {
                Ok(Ok(value)) => Returned::Value(value),
                Ok(Err(trap)) => Returned::Trap(trap),
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
            output,
            output_dropped,
            last_error,
        }
    }
}
