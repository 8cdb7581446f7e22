drop index if exists jobhost.runs_by_slot;
