-- pgnet-curl schema, version 11: the worker behaviours pg_net's users rely on.
--
-- * A row inserted straight into net.http_request_queue waits for the next wake (a request
--   function's commit, net.wake() and commit, a worker's start or reconnect), as in pg_net,
--   whose README says so: the statement-level wake trigger of 0006 goes. The request
--   functions keep their own NOTIFY. (Dropped idempotently: another migration may drop it too.)

drop trigger if exists _wake_workers on net.http_request_queue;
drop function if exists net._wake_workers_after_insert();

insert into net._schema_migrations(version) values (11) on conflict do nothing;
