-- Demo rows: enough pending work that the reference jobs show progress for a while.
insert into demo.audit_events (actor, action, payload)
select 'user-' || (g % 17), (array['login', 'update', 'export', 'delete'])[1 + g % 4],
       jsonb_build_object('seq', g, 'ip', '192.0.2.' || (g % 250))
from generate_series(1, 500) g
where not exists (select 1 from demo.audit_events);

insert into demo.users (email, activation_step, last_step_at, created_at)
select 'user' || g || '@example.test', g % 3, now() - make_interval(hours => g % 48),
       now() - make_interval(days => g % 30)
from generate_series(1, 200) g
where not exists (select 1 from demo.users);

insert into demo.sessions (created_at)
select now() - make_interval(hours => g * 3) from generate_series(1, 100) g
where not exists (select 1 from demo.sessions);
insert into demo.job_logs (created_at)
select now() - make_interval(hours => g * 12) from generate_series(1, 100) g
where not exists (select 1 from demo.job_logs);
insert into demo.notifications (created_at)
select now() - make_interval(hours => g * 24) from generate_series(1, 100) g
where not exists (select 1 from demo.notifications);
insert into demo.password_resets (created_at)
select now() - make_interval(hours => g) from generate_series(1, 100) g
where not exists (select 1 from demo.password_resets);
insert into demo.webhook_events (created_at)
select now() - make_interval(hours => g * 6) from generate_series(1, 100) g
where not exists (select 1 from demo.webhook_events);

-- Probed by test-scheduler; served by the demo HTTP server that `jobhost --demo`
-- starts on 127.0.0.1:8089 (the last one is outside the job's allow-list, so
-- the host refuses it before any connection).
insert into demo.capabilities (name, url) values
    ('health', 'http://127.0.0.1:8089/health'),
    ('reports', 'http://127.0.0.1:8089/reports'),
    ('exports', 'http://127.0.0.1:8089/exports'),
    ('broken', 'http://127.0.0.1:8089/broken'),
    ('unlisted', 'http://unlisted.invalid/')
on conflict (name) do nothing;
