drop function if exists jobhost.slot_gate(text, timestamptz, text, float8, integer, integer);
