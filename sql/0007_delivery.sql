-- pgnet-curl schema, version 7: webhook-grade delivery.
--
-- Per-request options (net.http_request's named arguments): retries with backoff, a NOTIFY
-- channel and a SQL callback on completion, an idempotency key and Standard Webhooks signing.
-- A waiting retry is a queue row with a not-before time: it holds no worker slot and no
-- connection. Requests that end in failure are kept (net._http_request_archive) until their
-- response expires, so they can be replayed (net.retry_request, net.retry_requests).

-- The options live in one jsonb column, NULL for a plain request: each column of the queue costs
-- every insert (the executor builds a projection of the whole row per net.http_get), so the
-- requests that use no option pay for one column, not seven. Keys: max_retries,
-- retry_backoff_ms, notify_channel, idempotency_key, signing_key_id, callback (a function's
-- oid), replay_of. Installs of versions 7 and 8 had a column each: sql/0009 folds them in.
alter table net.http_request_queue
    add column if not exists not_before timestamptz,
    add column if not exists retries int not null default 0,
    add column if not exists options jsonb;
comment on column net.http_request_queue.not_before is 'A retry waits until then (pgnet-curl).';
comment on column net.http_request_queue.retries is 'Attempts already made that ended in a retryable failure.';
comment on column net.http_request_queue.options is
    'Delivery options of net.http_request (pgnet-curl): max_retries, retry_backoff_ms, notify_channel, '
    'idempotency_key, signing_key_id, callback (oid), replay_of. NULL: none.';

alter table net._http_response
    add column if not exists attempts int,
    add column if not exists callback_error text;
comment on column net._http_response.attempts is 'Attempts made, the last one being this response (pgnet-curl).';
comment on column net._http_response.callback_error is 'The error the request''s SQL callback raised, if any.';

-- Failed requests, whole, for replay. Same persistence as the queue (see schema.TABLES).
create table if not exists net._http_request_archive(
    id bigint primary key,
    method text not null,
    url text not null,
    headers jsonb not null,
    body bytea,
    timeout_milliseconds int not null,
    options jsonb,
    requested_by name not null,
    created_at timestamptz not null,
    archived_at timestamptz not null default now(),
    replayed_as bigint
);
alter table net._http_request_archive add column if not exists options jsonb;
create index if not exists _http_request_archive_archived_idx on net._http_request_archive (archived_at);

-- Signing keys (Standard Webhooks): readable by the owner and the worker only. Every key of a
-- key_id that has not expired signs, so a rotation overlaps old and new keys.
create table if not exists net.signing_keys(
    key_id text not null,
    secret bytea not null check (length(secret) between 24 and 64),
    created_at timestamptz not null default clock_timestamp(),
    expires_at timestamptz,
    primary key (key_id, created_at)
);

-- Return a new secret for key_id, as receivers are given it (whsec_<base64>); older keys of
-- that id keep signing for `overlap`, then expire. gen_random_uuid() uses the server's strong
-- random source: two give 244 random bits.
create or replace function net.rotate_signing_key(key_id text, overlap interval default '1 day')
    returns text
    language plpgsql
    volatile
as $$
declare
    secret bytea := decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex');
begin
    if key_id is null or key_id = '' then
        raise exception 'key_id must name the key' using errcode = 'invalid_parameter_value';
    end if;
    update net.signing_keys k
    set expires_at = least(coalesce(k.expires_at, 'infinity'), clock_timestamp() + overlap)
    where k.key_id = rotate_signing_key.key_id;
    insert into net.signing_keys(key_id, secret) values (rotate_signing_key.key_id, secret);
    perform pg_notify('pgnet_curl_control', 'signing_keys');
    return 'whsec_' || encode(secret, 'base64');
end
$$;

-- Whether key_id names a signing key, for callers who may not read the keys themselves.
create or replace function net._has_signing_key(key_id text)
    returns bool
    language sql
    stable
    security definer
    set search_path = pg_catalog, pg_temp
as $$
    select exists (select from net.signing_keys k where k.key_id = _has_signing_key.key_id)
$$;

-- A callback runs as the role that made the request: it must be SECURITY DEFINER and owned by
-- that role, take the request id (bigint), and it is checked again when it runs.
create or replace function net._check_callback(callback regprocedure, requested_by name)
    returns void
    language plpgsql
    stable
as $$
declare
    fn record;
begin
    if callback is null then
        return;
    end if;
    select (select rolname from pg_roles where oid = p.proowner) as owner, p.prosecdef as definer, p.pronargs as nargs,
           p.proargtypes[0] as argtype
    into fn from pg_proc p where p.oid = callback;
    if fn is null or fn.nargs <> 1 or fn.argtype <> 'bigint'::regtype then
        raise exception 'callback % must be a function of one bigint (the request id)', callback
            using errcode = 'invalid_parameter_value';
    end if;
    if fn.owner <> requested_by or not fn.definer then
        raise exception 'callback % must be SECURITY DEFINER and owned by %, the role making the request', callback, requested_by
            using errcode = 'insufficient_privilege',
                  hint = 'the worker runs it as its owner, so that it runs with the rights of the role that asked for it';
    end if;
end
$$;

-- Run the callbacks of responses the worker just stored, in the same transaction. calls is a
-- JSON array of [request_id, callback's oid, requested_by]. An error in one callback is kept in
-- callback_error and does not undo the response or the other callbacks.
create or replace function net._run_callbacks(calls jsonb)
    returns int
    language plpgsql
    volatile
as $$
declare
    call jsonb;
    failed int := 0;
begin
    for call in select * from jsonb_array_elements(calls) loop
        begin
            perform net._check_callback((call ->> 1)::oid::regprocedure, (call ->> 2)::name);
            execute format('select %s($1)', (call ->> 1)::oid::regproc) using (call ->> 0)::bigint;
        exception when others then
            failed := failed + 1;
            update net._http_response set callback_error = sqlerrm where id = (call ->> 0)::bigint;
        end;
    end loop;
    return failed;
end
$$;

-- Requests that ended in failure (an error, a timeout or a status of 400 or more, after any
-- retries), kept until their response expires; replay them with net.retry_request(id).
create or replace view net.failed_requests as
select a.id, a.method, a.url, a.headers, a.body, a.requested_by, r.attempts, (a.options ->> 'max_retries')::int as max_retries,
       r.status_code, r.timed_out, r.error_msg, r.created as failed_at, (a.options ->> 'replay_of')::bigint as replay_of,
       a.replayed_as
from net._http_request_archive a
join net._http_response r on r.id = a.id
-- The view reads the tables as its owner: in private mode show each role its own only.
where not (select private from net._install_options)
   or a.requested_by = current_user
   or pg_has_role(current_user, (select relowner from pg_class where oid = 'net._http_request_archive'::regclass), 'member');

-- Queue a failed request again with its original method, URL, headers, body and options, and
-- the same webhook-id; return the new request's id.
create or replace function net.retry_request(request_id bigint)
    returns bigint
    language plpgsql
    volatile
as $$
declare
    new_id bigint;
    done_as bigint;
    failed record;
    replay_options jsonb;
begin
    select a.replayed_as into done_as
    from net.failed_requests a where a.id = request_id;
    if not found then
        raise exception 'request % is not a failed request kept for replay (see net.failed_requests)', request_id
            using errcode = 'no_data_found';
    end if;
    if done_as is not null then
        raise exception 'request % was already replayed as request %', request_id, done_as
            using errcode = 'unique_violation', hint = 'replay that one if it failed too';
    end if;
    -- A signed request sent as webhook-id msg_<id> keeps that id in its replays.
    select a.* into failed from net._http_request_archive a where a.id = request_id;
    replay_options := coalesce(failed.options, '{}'::jsonb)
        || jsonb_build_object('replay_of', coalesce((failed.options ->> 'replay_of')::bigint, failed.id))
        || case when failed.options ? 'signing_key_id' and not failed.options ? 'idempotency_key'
                then jsonb_build_object('idempotency_key', 'msg_' || failed.id) else '{}'::jsonb end;
    if replay_options ? 'ordering_key' then
        -- Back in line at its original's place (sql/0012_ordering_and_circuits.sql).
        new_id := net._queue_ordered(failed.method, failed.url, failed.headers, failed.body,
                                     failed.timeout_milliseconds, replay_options);
    else
        insert into net.http_request_queue(method, url, headers, body, timeout_milliseconds, options)
        values (failed.method, failed.url, failed.headers, failed.body, failed.timeout_milliseconds, replay_options)
        returning id into new_id;
    end if;
    update net._http_request_archive set replayed_as = new_id where id = request_id;
    perform pg_notify('pgnet_curl_wake', '');
    return new_id;
end
$$;

-- Replay every failed request (not yet replayed) to `host` (any host when NULL) that failed
-- since `since` (any time when NULL); return the new request ids.
create or replace function net.retry_requests(host text default null, since timestamptz default null)
    returns setof bigint
    language plpgsql
    volatile
as $$
begin
    -- The host as the queue's `host` column has it (net._url_host, sql/0008): lower case, no
    -- port, no IPv6 brackets.
    return query
    select net.retry_request(f.id)
    from net.failed_requests f
    where f.replayed_as is null
      and (retry_requests.host is null or net._url_host(f.url) = lower(trim(trailing '.' from retry_requests.host)))
      and (retry_requests.since is null or f.failed_at >= retry_requests.since)
    order by f.id;
end
$$;

insert into net._schema_migrations(version) values (7) on conflict do nothing;
