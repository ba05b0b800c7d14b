-- pgnet-curl schema, version 3: one generic request function, beyond pg_net.
--
-- Any method token (PUT, PATCH, HEAD, OPTIONS, ...) and any body: bytes sent as given, with
-- whatever Content-Type the headers name (none is added). pg_net's functions keep their rules.
-- The delivery options (max_retries ... callback) are stored in the queue's `options` column
-- (sql/0007_delivery.sql); the whole function lives here, once. Older installs had the six-argument
-- form (version 3) and the twelve-argument one, without ordering_key (versions 7 to 11): drop them,
-- or calls with that many arguments would be ambiguous.
drop function if exists net.http_request(text, text, bytea, jsonb, jsonb, int);
drop function if exists net.http_request(text, text, bytea, jsonb, jsonb, int, int, int, text, text, text, text);
create or replace function net.http_request(
    method text,
    url text,
    body bytea default null,
    params jsonb default '{}'::jsonb,
    headers jsonb default '{}'::jsonb,
    timeout_milliseconds int default 5000,
    max_retries int default null,
    retry_backoff_milliseconds int default null,
    notify_channel text default null,
    idempotency_key text default null,
    signing_key_id text default null,
    callback text default null,
    ordering_key text default null
)
    returns bigint
    language plpgsql
    volatile
as $$
declare
    options jsonb;
    -- A name means the function of that name taking the request id (bigint).
    callback_fn regprocedure := case
        when callback is null then null
        when strpos(callback, '(') > 0 then callback::regprocedure
        else (callback || '(bigint)')::regprocedure end;
begin
    if method is null or method !~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]+$' then
        raise exception 'method must be an HTTP method token such as GET, PUT or PATCH, got %',
            coalesce(quote_literal(method), 'NULL')
            using errcode = 'invalid_parameter_value';
    end if;
    if max_retries < 0 or retry_backoff_milliseconds <= 0 then
        raise exception 'max_retries must be 0 or more and retry_backoff_milliseconds positive'
            using errcode = 'invalid_parameter_value';
    end if;
    if notify_channel = '' or length(notify_channel) > 63 then
        raise exception 'notify_channel must be a channel name of 1 to 63 bytes' using errcode = 'invalid_parameter_value';
    end if;
    if signing_key_id is not null and not net._has_signing_key(signing_key_id) then
        raise exception 'no signing key named %: create one with net.rotate_signing_key(%)', quote_literal(signing_key_id), quote_literal(signing_key_id)
            using errcode = 'invalid_parameter_value';
    end if;
    if ordering_key = '' then
        raise exception 'ordering_key must not be empty (NULL: no ordering)' using errcode = 'invalid_parameter_value';
    end if;
    perform net._check_callback(callback_fn, net._caller());
    -- The options, or NULL for a request that has none: a plain request takes the fast path.
    if num_nonnulls(max_retries, retry_backoff_milliseconds, notify_channel, idempotency_key, signing_key_id,
                    callback_fn, ordering_key) > 0 then
        options := jsonb_strip_nulls(jsonb_build_object(
            'max_retries', max_retries, 'retry_backoff_ms', retry_backoff_milliseconds,
            'notify_channel', notify_channel, 'idempotency_key', idempotency_key,
            'signing_key_id', signing_key_id, 'callback', callback_fn::oid::bigint,
            'ordering_key', ordering_key));
    end if;
    -- A signed request with no idempotency key is sent with webhook-id msg_<id>; its replays
    -- keep that id (net.retry_request).
    return net._queue_request(method, url, params, headers, body, timeout_milliseconds, options);
end
$$;

comment on function net.http_request(text, text, bytea, jsonb, jsonb, int, int, int, text, text, text, text, text) is
    'Queue a request with any method and body, delivery options and an ordering key (pgnet-curl); returns the request id.';

insert into net._schema_migrations(version) values (3) on conflict do nothing;
