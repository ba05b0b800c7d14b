-- pgnet-curl schema, version 6: once a statement-level trigger that woke the workers on every
-- insert into the queue. pg_net wakes its worker only from the request functions and net.wake(),
-- and checks written for it rely on a direct insert waiting for the next wake, so version 11
-- (sql/0011_worker_behaviours.sql) drops the trigger; this file no longer makes it.

insert into net._schema_migrations(version) values (6) on conflict do nothing;
