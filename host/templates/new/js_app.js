// {{name}}: a jobhost job (`lock = "xact"`), in JavaScript.
//
// The host has begun a transaction and taken the job's advisory lock; `run`
// gets that transaction for one call. Returning commits; throwing rolls back
// everything the run wrote. A thrown `Error` is recorded with its message; a
// failed statement throws an error whose `payload` is the typed `sql.error`,
// which you can carry back in the failure's `sql` field.

import { log } from "jobhost:plugin/log@0.2.1";

export const xactJob = {
  run(ctx, tx) {
    const config = Object.fromEntries(ctx.config);
    const greeting = config.greeting ?? "hello";
    let rows;
    try {
      rows = tx.query("select now()::text as now, $1::text as greeting", [
        { tag: "text", val: greeting },
      ]);
    } catch (e) {
      const failure = new Error("{{name}}: query failed");
      failure.payload = { message: failure.message, sql: e.payload };
      throw failure;
    }
    const [now, said] = rows.rows[0].map((cell) => cell.val);
    log("info", "{{name}} ran", [["slot", ctx.slot], ["attempt", String(ctx.attempt)]]);
    return { summary: `${said} from {{name}} at ${now}` };
  },
};
