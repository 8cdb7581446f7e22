"""{{name}}: a jobhost job (`lock = "xact"`), in Python.

The host has begun a transaction and taken the job's advisory lock; `run` gets
that transaction for one call. Returning commits; raising rolls back
everything the run wrote. Raise `Err(types.Failure(...))` to fail with your own
message (and the SQL error, typed, in `sql`); any other exception is recorded
as a trap, with the exception's own message first.
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import log, sql, types


def cell(value):
    """The Python value of a result cell (`None` for SQL NULL)."""
    return getattr(value, "value", None)


class XactJob(exports.XactJob):
    def run(self, ctx: types.Context, tx: sql.Transaction) -> types.Report:
        config = dict(ctx.config)
        greeting = config.get("greeting", "hello")
        try:
            rows = tx.query(
                "select now()::text as now, $1::text as greeting",
                [sql.Value_Text(greeting)],
            )
        except Err as e:
            # `e.value` is the typed `sql.Error` (e.g. `sql.Error_Database`).
            raise Err(types.Failure(message="{{name}}: query failed", sql=e.value))
        now, said = (cell(v) for v in rows.rows[0])
        log.log(log.Level.INFO, "{{name}} ran", [("slot", ctx.slot), ("attempt", str(ctx.attempt))])
        return types.Report(summary=f"{said} from {{name}} at {now}")
