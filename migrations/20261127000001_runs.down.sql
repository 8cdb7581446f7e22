drop schema if exists jobhost cascade;
