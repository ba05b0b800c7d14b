-- pgnet-curl schema, version 11: the worker behaviours pg_net's users rely on.
--
-- * A row inserted straight into net.http_request_queue waits for the next wake (a request
--   function's commit, net.wake() and commit, a worker's start or reconnect), as in pg_net,
--   whose README says so: the statement-level wake trigger of 0006 goes. The request
--   functions keep their own NOTIFY. (Dropped idempotently: another migration may drop it too.)
-- * net.worker_restart() is pg_net's: any role may call it (sql/0004_privileges.sql grants it),
--   it reloads the configuration as pg_net's does, and every worker opens a new session.
-- * net.wait_until_running() after net.worker_restart() waits for the restarted sessions.

drop trigger if exists _wake_workers on net.http_request_queue;
drop function if exists net._wake_workers_after_insert();

-- The last net.worker_restart(): when, and the worker sessions it asked to restart.
create table if not exists net._worker_restart(
    singleton bool primary key default true check (singleton),
    requested_at timestamptz not null,
    worker_pids int[] not null
);
comment on table net._worker_restart is
    'The last net.worker_restart() and the worker sessions it restarts, for net.wait_until_running() (pgnet-curl).';

-- Ask every worker serving this database to reload pg_net's settings in a new session. The
-- workers merge the calls that arrive while a restart is pending (at most one every 0.5 s).
-- Runs as its owner: the configuration reload needs a role that may call pg_reload_conf().
create or replace function net.worker_restart()
    returns bool
    language plpgsql
    volatile
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    pids int[];
begin
    -- As pg_net's: reload the configuration first, so ALTER SYSTEM values apply in the new sessions.
    if has_function_privilege('pg_catalog.pg_reload_conf()', 'execute') then
        perform pg_reload_conf();
    end if;
    pids := array(select pid from pg_stat_activity
                  where datname = current_database() and application_name like 'pgnet-curl worker%');
    insert into net._worker_restart as r (requested_at, worker_pids) values (clock_timestamp(), pids)
    on conflict (singleton) do update set requested_at = excluded.requested_at, worker_pids = excluded.worker_pids;
    perform pg_notify('pgnet_curl_control', 'restart');
    return exists (
        select 1 from pg_stat_activity
        where datname = current_database() and application_name like 'pgnet-curl%'
    );
end
$$;

-- Wait until a worker is connected and, after net.worker_restart(), until each session it
-- restarted has made way for a new one (at most 5 s after it: a worker that died meanwhile, or
-- one of an older pgnet-curl, keeps no or its old session). Bounded by statement_timeout.
create or replace function net.wait_until_running()
    returns void
    language plpgsql
    volatile
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    restarted timestamptz;
    old_pids int[];
begin
    select requested_at, worker_pids into restarted, old_pids from net._worker_restart;
    loop
        exit when exists (
                select 1 from pg_stat_activity
                where datname = current_database() and application_name like 'pgnet-curl%'
            )
            and (restarted is null
                 or clock_timestamp() > restarted + interval '5 seconds'
                 or (select count(*) filter (where pid = any(old_pids)) = 0 and count(*) >= cardinality(old_pids)
                     from pg_stat_activity
                     where datname = current_database() and application_name like 'pgnet-curl worker%'));
        perform pg_sleep(0.05);
        -- pg_stat_activity is read once per transaction unless told to look again.
        perform pg_stat_clear_snapshot();
    end loop;
end
$$;
comment on function net.wait_until_running() is 'waits until the worker is running';

insert into net._schema_migrations(version) values (11) on conflict do nothing;
