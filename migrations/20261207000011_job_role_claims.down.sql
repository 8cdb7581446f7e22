delete from jobhost.job_roles a
 using jobhost.job_roles b
 where a.job = b.job and a.role = b.role and a.host_id > b.host_id;
alter table jobhost.job_roles drop constraint job_roles_pkey;
alter table jobhost.job_roles drop column host_id;
alter table jobhost.job_roles add primary key (job, role);
