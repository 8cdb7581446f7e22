// db-retention, in JavaScript: the port of plugins/db-retention.
//
// Every `[job.config]` key that names a table (`"demo.sessions" = "7 days"`)
// is one DELETE on `created_at`. The window is any Postgres interval; table
// names are checked to be plain (schema-)identifiers before they enter SQL.
//
// Errors, as the host records them:
// - a statement Postgres rejects throws an error whose `payload` is the typed
//   `sql.error` (`{ tag: 'database', val: { code, message, ... } }`); this job
//   returns it as the run's failure, so the history keeps its SQLSTATE;
// - any other exception becomes the run's failure too, with the exception's
//   message (componentize-js reads a thrown `Error` as the `failure` record:
//   its `message`, and no `sql`).
// Either way the host rolls back everything the run wrote.

import { log } from "jobhost:plugin/log@0.2.1";

const TABLE = /^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$/;

export const xactJob = {
  run(ctx, tx) {
    // Sorted by name, as the Rust SDK hands them out: the same order of
    // statements, and the same summary.
    const tables = ctx.config
      .filter(([key]) => key.includes("."))
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    if (tables.length === 0) {
      throw failure(
        'no tables configured: add `"schema.table" = "30 days"` entries to [job.config]',
      );
    }
    const report = [];
    let total = 0n;
    for (const [table, window] of tables) {
      if (!TABLE.test(table)) {
        // A plain exception: recorded as the failure, with its message.
        throw new Error(`config key \`${table}\` is not a plain table name`);
      }
      let deleted;
      try {
        deleted = tx.execute(
          `delete from ${table} where created_at < now() - $1::interval`,
          [{ tag: "text", val: window }],
        );
      } catch (e) {
        // `e.payload` is the typed sql.error: carry it back with the failure.
        throw failure(`deleting from ${table} failed`, e.payload);
      }
      total += deleted;
      report.push(`${table}=${deleted}`);
    }
    log("info", "retention swept", [["rows", String(total)]]);
    return { summary: `deleted ${total} rows (${report.join(", ")})` };
  },
};

/// The run's `failure` (the error case of `run`'s result); thrown, it becomes
/// the result's `err`.
function failure(message, sql) {
  const e = new Error(message);
  e.payload = { message, sql };
  return e;
}
