"""integrity-hash-retry, in Python: the port of plugins/integrity-hash-retry.

Hashes up to `batch-size` pending audit rows and marks them complete. The hash
is SHA-256 over `actor \\n action \\n payload`, with the payload in Postgres's
canonical `jsonb` text form: the same bytes, so the same hashes, as the Rust job.

Errors, as the host records them:
- a statement Postgres rejects raises `Err(sql.Error_Database(...))`; this job
  returns it as the run's `Failure.sql`, so the history keeps its SQLSTATE;
- any other exception (a `batch-size` that is not a number) ends the run as a
  trap; the host records the exception's own message first.
Either way the host rolls back everything the run wrote.
"""

import hashlib

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import log, sql, types


def content_hash(actor: str, action: str, payload: str) -> str:
    """The content hash of one audit row (hex SHA-256)."""
    return hashlib.sha256(f"{actor}\n{action}\n{payload}".encode()).hexdigest()


def cell(value):
    """The Python value of a result cell (`None` for NULL)."""
    return getattr(value, "value", None)


class XactJob(exports.XactJob):
    def run(self, ctx: types.Context, tx: sql.Transaction) -> types.Report:
        config = dict(ctx.config)
        batch = int(config.get("batch-size", "50"))
        try:
            pending = tx.query(
                """select id, actor, action, payload::text as payload
                     from demo.audit_events
                    where hash_status = 'pending'
                    order by id
                    limit $1
                      for update skip locked""",
                [sql.Value_Int8(batch)],
            )
            for row in pending.rows:
                id_, actor, action, payload = (cell(v) for v in row)
                tx.execute(
                    """update demo.audit_events
                          set content_hash = $1, hash_status = 'complete', hashed_at = now()
                        where id = $2""",
                    [sql.Value_Text(content_hash(actor, action, payload)), sql.Value_Int8(id_)],
                )
        except Err as e:
            # The SQL error travels with the failure, typed: the history keeps
            # its SQLSTATE (`e.value` is a `sql.Error` case).
            raise Err(types.Failure(message="hashing audit rows failed", sql=e.value))
        if pending.rows:
            log.log(log.Level.INFO, "hashed audit rows", [("rows", str(len(pending.rows)))])
        return types.Report(summary=f"hashed {len(pending.rows)} rows")
