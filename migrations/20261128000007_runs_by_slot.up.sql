-- no-transaction
-- Every run reads its slot's history under the lock (`db::slot_history`:
-- earlier attempts, failures, success) by (job, slot) over all outcomes.
-- Without this index that read scanned the job's whole history: 9 ms per run
-- at 100,000 rows (a 1 s job after 28 hours), growing without bound. Built
-- CONCURRENTLY: the hosts of a fleet keep writing runs while it builds.
create index concurrently if not exists runs_by_slot on jobhost.runs (job, slot);
