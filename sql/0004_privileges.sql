-- pgnet-curl schema, version 4: least privilege, and a private mode.
--
-- net._apply_privileges() runs at the end of every install (after the last file), so it covers
-- objects of later versions and tightens the grants of an older install (which gave PUBLIC
-- every privilege on the tables). Two modes, kept in
-- net._install_options and changed only when the installer says so
-- (`pgnet-curl install --private` / `--shared`, or `set pgnet_curl.private = on|off` in the
-- install transaction before this file runs):
--
-- shared (the default, pg_net's model): PUBLIC may call the request functions, read the queue
--   and the responses, and delete responses. Nothing more: no INSERT, UPDATE, TRUNCATE,
--   REFERENCES or TRIGGER on our tables, nothing on the sequence or the bookkeeping tables. The
--   request functions are SECURITY DEFINER with a fixed search_path, as pg_net's are, so callers
--   need no write privilege on the queue.
-- private: PUBLIC gets nothing. Members of role pgnet_user may call the request functions,
--   which run as the caller; row-level security lets each role see and delete only its own
--   queue rows and responses. The owner and pgnet_worker see everything.
--
-- In both modes the group role pgnet_worker holds exactly what the worker uses; log in as a
-- member of it (`pgnet-curl install --worker-role NAME`) instead of as a superuser.

create table if not exists net._install_options(
    singleton bool primary key default true check (singleton),
    private bool not null default false
);
insert into net._install_options default values on conflict do nothing;
update net._install_options
set private = current_setting('pgnet_curl.private', true)::bool
where coalesce(current_setting('pgnet_curl.private', true), '') <> '';

-- The role a request is made for: whoever called the request function. In shared mode the
-- request functions run as their owner, so the caller is the session's role (SET ROLE
-- included); in private mode they run as the caller. Replaced below to match the mode.
create or replace function net._caller()
    returns name
    language sql
    stable
as $$
    select coalesce(nullif(current_setting('role'), 'none'), session_user)::name
$$;

alter table net.http_request_queue add column if not exists requested_by name not null default net._caller();
alter table net._http_response add column if not exists requested_by name;
comment on column net.http_request_queue.requested_by is
    'The role that made the request (pgnet-curl); private mode shows each role only its own rows.';
comment on column net._http_response.requested_by is
    'The role that made the request, copied from the queue by the worker (pgnet-curl).';

-- Grant exactly what the mode allows, on every object of schema net. The install script calls
-- this after its last file, so objects added by later versions are covered too.
create or replace function net._apply_privileges()
    returns void
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
declare
    private_mode bool := (select private from net._install_options);
    request_functions text[] := array['http_get', 'http_post', 'http_delete', 'http_request', '_queue_request',
        'retry_request'];
    -- pg_net's callable API (and ours): everything else in schema net is internal.
    public_api text[] := array['http_get', 'http_post', 'http_delete', 'http_request',
        '_http_collect_response', 'http_collect_response', '_await_response', 'wake', 'worker_restart',
        'wait_until_running', 'check_worker_is_up', '_urlencode_string', '_encode_url_with_params_array',
        'retry_request', 'retry_requests', '_url_host'];
    fn record;
begin
    -- Group roles are cluster-wide: create them once, if this role may.
    if not exists (select from pg_roles where rolname = 'pgnet_worker') then
        begin
            create role pgnet_worker nologin;
        exception when insufficient_privilege then
            raise notice 'could not create role pgnet_worker (needs CREATEROLE): the worker must connect as the schema owner';
        end;
    end if;
    if not exists (select from pg_roles where rolname = 'pgnet_user') then
        begin
            create role pgnet_user nologin;
        exception when insufficient_privilege then
            if private_mode then
                raise exception 'private mode needs role pgnet_user: create it (create role pgnet_user nologin) or install as a role with CREATEROLE'
                    using errcode = 'insufficient_privilege';
            end if;
        end;
    end if;

    -- Start from nothing, then grant exactly what each mode allows.
    revoke all on all tables in schema net from public;
    revoke all on all sequences in schema net from public;
    revoke all on all functions in schema net from public;
    revoke all on schema net from public;

    for fn in
        select p.oid::regprocedure as signature, p.proname as name
        from pg_proc p
        where p.pronamespace = 'net'::regnamespace
    loop
        if fn.name = any(request_functions) then
            -- Run as the owner (shared) or the caller (private), resolving only pg_catalog's
            -- functions and operators: the helpers they call inherit that search_path.
            execute format('alter function %s %s set search_path = pg_catalog, pg_temp', fn.signature,
                           case when private_mode then 'security invoker' else 'security definer' end);
        end if;
        if fn.name = any(public_api) and not private_mode then
            execute format('grant execute on function %s to public', fn.signature);
        end if;
    end loop;

    if private_mode then
        create or replace function net._caller()
            returns name language sql stable
        as 'select current_user';
    else
        create or replace function net._caller()
            returns name language sql stable
        as $f$select coalesce(nullif(current_setting('role'), 'none'), session_user)::name$f$;
    end if;

    if exists (select from pg_roles where rolname = 'pgnet_worker') then
        revoke all on all tables in schema net from pgnet_worker;
        grant usage on schema net to pgnet_worker;
        grant select, delete on net.http_request_queue to pgnet_worker;
        grant update (lease_owner, lease_expires_at, attempts, not_before, retries) on net.http_request_queue to pgnet_worker;
        grant select, insert, delete on net._http_response to pgnet_worker;
        grant update (callback_error) on net._http_response to pgnet_worker;
        grant select, insert, delete on net._http_request_archive to pgnet_worker;
        grant select on net._schema_migrations, net._install_options, net.signing_keys to pgnet_worker;
        grant execute on function net._run_callbacks(jsonb), net._check_callback(regprocedure, name) to pgnet_worker;
        -- Per-destination limits (sql/0008_destination_limits.sql): serve writes its flags' rows.
        if to_regclass('net.destination_limits') is not null then
            grant select, insert, update on net.destination_limits to pgnet_worker;
            grant select, insert, update, delete on net._destination_buckets, net._destination_leases to pgnet_worker;
            grant execute on function net._claim_limited(text, int, float8, bool), net._destination_limits_due_s(),
                net._destination_limits_for(text[]) to pgnet_worker;
        end if;
        if to_regprocedure('net._claim_limited_rows(text, int, float8, bool)') is not null then
            grant execute on function net._claim_limited_rows(text, int, float8, bool) to pgnet_worker;
        end if;
        -- Ordering and circuits (sql/0012_ordering_and_circuits.sql): the worker moves requests
        -- in line into the queue only through the owner's functions.
        if to_regclass('net._destination_circuits') is not null then
            grant select, insert, update, delete on net._destination_circuits to pgnet_worker;
            grant select on net._ordering_keys to pgnet_worker;
            grant select, insert on net._held_requests to pgnet_worker;
            grant execute on function net._url_host(text), net._circuit_held_hosts(), net._claim_probes(text, float8),
                net._circuit_release(text[]),
                net._ordering_advance(text[], text[], bigint[], bigint[], bool[], bool), net._ordering_release_idle(int, bool) to pgnet_worker;
        end if;
    end if;

    if exists (select from pg_roles where rolname = 'pgnet_user') then
        revoke all on all tables in schema net from pgnet_user;
        revoke all on all sequences in schema net from pgnet_user;
        revoke all on all functions in schema net from pgnet_user;
        revoke all on schema net from pgnet_user;
    end if;

    if private_mode then
        grant usage on schema net to pgnet_user;
        grant execute on all functions in schema net to pgnet_user;
        revoke execute on function net._apply_privileges() from pgnet_user;
        revoke execute on function net.rotate_signing_key(text, interval), net._run_callbacks(jsonb) from pgnet_user;
        -- The worker's own claim and write-back helpers (sql/0008_destination_limits.sql,
        -- sql/0012_ordering_and_circuits.sql).
        for fn in
            select p.oid::regprocedure as signature from pg_proc p
            where p.pronamespace = 'net'::regnamespace
              and p.proname in ('_claim_limited', '_claim_limited_rows', '_destination_limits_due_s', '_destination_limits_for',
                                '_circuit_held_hosts', '_claim_probes', '_circuit_release', '_ordering_advance',
                                '_ordering_release_idle')
        loop
            execute format('revoke execute on function %s from pgnet_user', fn.signature);
        end loop;
        grant select on net.http_request_queue to pgnet_user;
        grant insert (method, url, headers, body, timeout_milliseconds, options) on net.http_request_queue to pgnet_user;
        grant usage on sequence net.http_request_queue_id_seq to pgnet_user;
        grant select, delete on net._http_response to pgnet_user;
        grant select, update (replayed_as) on net._http_request_archive to pgnet_user;
        grant select on net.failed_requests to pgnet_user;
        -- Ordered requests: a member queues its own in line, under its own keys (the request
        -- functions run as the caller here).
        if to_regclass('net._ordering_keys') is not null then
            grant select, insert, update (state, halted_id, halted_root, changed_at) on net._ordering_keys to pgnet_user;
            grant select, insert on net._ordered_requests to pgnet_user;
            grant select on net._install_options to pgnet_user;
            grant select on net.ordering_keys to pgnet_user;
            grant select on net._held_requests to pgnet_user;
            alter table net._ordering_keys enable row level security;
            alter table net._ordered_requests enable row level security;
            alter table net._held_requests enable row level security;
        end if;
        alter table net.http_request_queue enable row level security;
        alter table net._http_response enable row level security;
        alter table net._http_request_archive enable row level security;
    else
        grant usage on schema net to public;
        grant select on net.http_request_queue to public;
        grant select, delete on net._http_response to public;
        grant select on net.failed_requests to public;
        if to_regclass('net._ordering_keys') is not null then
            -- Requests waiting in line or held for a circuit are pending requests, as visible as the queue's.
            grant select on net._ordered_requests, net._held_requests, net.ordering_keys, net.destination_status
                to public;
            alter table net._ordering_keys disable row level security;
            alter table net._ordered_requests disable row level security;
            alter table net._held_requests disable row level security;
        end if;
        alter table net.http_request_queue disable row level security;
        alter table net._http_response disable row level security;
        alter table net._http_request_archive disable row level security;
    end if;

    -- Row-level security (in force in private mode only): each role its own rows; the worker all.
    drop policy if exists own_requests on net.http_request_queue;
    create policy own_requests on net.http_request_queue
        using (requested_by = current_user) with check (requested_by = current_user);
    drop policy if exists own_responses on net._http_response;
    create policy own_responses on net._http_response
        using (requested_by = current_user) with check (requested_by = current_user);
    drop policy if exists own_archive on net._http_request_archive;
    create policy own_archive on net._http_request_archive
        using (requested_by = current_user) with check (requested_by = current_user);
    if to_regclass('net._ordering_keys') is not null then
        drop policy if exists own_keys on net._ordering_keys;
        create policy own_keys on net._ordering_keys
            using (key_owner = current_user) with check (key_owner = current_user);
        drop policy if exists own_requests on net._ordered_requests;
        create policy own_requests on net._ordered_requests
            using (requested_by = current_user) with check (requested_by = current_user and key_owner = current_user);
        drop policy if exists own_requests on net._held_requests;
        create policy own_requests on net._held_requests using (requested_by = current_user);
    end if;
    if exists (select from pg_roles where rolname = 'pgnet_worker') then
        drop policy if exists worker_all on net.http_request_queue;
        create policy worker_all on net.http_request_queue to pgnet_worker using (true) with check (true);
        drop policy if exists worker_all on net._http_response;
        create policy worker_all on net._http_response to pgnet_worker using (true) with check (true);
        drop policy if exists worker_all on net._http_request_archive;
        create policy worker_all on net._http_request_archive to pgnet_worker using (true) with check (true);
        if to_regclass('net._ordering_keys') is not null then
            drop policy if exists worker_all on net._ordering_keys;
            create policy worker_all on net._ordering_keys to pgnet_worker using (true);
            drop policy if exists worker_all on net._held_requests;
            create policy worker_all on net._held_requests to pgnet_worker using (true) with check (true);
        end if;
    end if;
end
$$;

comment on function net.worker_restart() is
    'Ask the pgnet-curl workers to reload pg_net''s settings in new sessions; any role (private mode: members of pgnet_user).';

insert into net._schema_migrations(version) values (4) on conflict do nothing;
