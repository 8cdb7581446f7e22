drop table if exists jobhost.paused;
