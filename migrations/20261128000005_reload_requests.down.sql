alter table jobhost.hosts drop column listens, drop column reload_seen;
drop table jobhost.reload_requests;
