//! `activation-drip`: advances users one step through an activation sequence.
//!
//! Each due user (step below `max-step`, last step at least `step-interval` ago)
//! gets one small update and one message row. The update is guarded by the
//! step it read, so a concurrent change is never overwritten.

use jobhost_plugin_sdk::{Context, Job, JobError, Tx, export_job, params};
use serde::Deserialize;

#[derive(Deserialize)]
struct Due {
    id: i64,
    activation_step: i32,
}

struct ActivationDrip;

impl Job for ActivationDrip {
    fn run(ctx: &Context, tx: &Tx<'_>) -> Result<String, JobError> {
        let max_step: i32 = ctx.config_or("max-step", 5)?;
        let batch: i64 = ctx.config_or("batch-size", 100)?;
        let interval = ctx.config_str("step-interval").unwrap_or("6 hours");
        let due: Vec<Due> = tx.query(
            "select id, activation_step
               from demo.users
              where activation_step < $1
                and coalesce(last_step_at, created_at) <= now() - $2::interval
              order by id
              limit $3
                for update skip locked",
            params![max_step, interval, batch],
        )?;
        let mut advanced = 0u64;
        for user in &due {
            let next = user.activation_step + 1;
            advanced += tx.execute(
                "update demo.users set activation_step = $2, last_step_at = now()
                  where id = $1 and activation_step = $3",
                params![user.id, next, user.activation_step],
            )?;
            tx.execute(
                "insert into demo.activation_messages (user_id, step) values ($1, $2)
                 on conflict (user_id, step) do nothing",
                params![user.id, next],
            )?;
        }
        Ok(format!("advanced {advanced} users"))
    }
}

export_job!(ActivationDrip);
