-- pgnet-curl schema, version 1: pg_net 0.20's `net` schema in SQL and PL/pgSQL only.
--
-- Idempotent: every statement may run again on an installed schema. The installer
-- (`pgnet-curl install`) runs every numbered file of sql/ in order, in one transaction.
-- Public names, argument names, defaults and return types are pg_net's; private objects
-- start with `_`.

create schema if not exists net;

-- Any method token (RFC 9110 `token`); pg_net admits only GET, POST and DELETE.
do $$
begin
    if to_regtype('net.http_method') is null then
        create domain net.http_method as text
            check (value ~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]+$');
    end if;
    if to_regtype('net.request_status') is null then
        create type net.request_status as enum ('PENDING', 'SUCCESS', 'ERROR');
    end if;
    if to_regtype('net.http_response') is null then
        create type net.http_response as (
            status_code integer,
            headers jsonb,
            body text
        );
    end if;
    if to_regtype('net.http_response_result') is null then
        create type net.http_response_result as (
            status net.request_status,
            message text,
            response net.http_response
        );
    end if;
end
$$;

-- Requests waiting to be sent. Logged, so a PostgreSQL crash loses none (pg_net's is unlogged:
-- `pgnet-curl install --unlogged` makes ours so too). The lease columns are ours: a worker owns
-- a row until lease_expires_at, after which any worker may take it again.
create table if not exists net.http_request_queue(
    id bigserial primary key,
    method net.http_method not null,
    url text not null,
    headers jsonb not null,
    body bytea,
    timeout_milliseconds int not null,
    created_at timestamptz not null default now(),
    lease_owner text,
    lease_expires_at timestamptz,
    attempts int not null default 0
);

-- One row per finished request. Same persistence as the queue (see schema.TABLES).
create table if not exists net._http_response(
    id bigint,
    status_code integer,
    content_type text,
    headers jsonb,
    content text,
    timed_out bool,
    error_msg text,
    created timestamptz not null default now()
);

create index if not exists _http_response_created_idx on net._http_response (created);
-- Exactly one response row per request: the write-back inserts `on conflict do nothing`.
create unique index if not exists _http_response_id_idx on net._http_response (id);

create table if not exists net._schema_migrations(
    version int primary key,
    applied_at timestamptz not null default now()
);

-- Percent-encode a string as libcurl's curl_easy_escape does: every byte of its UTF-8
-- form except A-Z a-z 0-9 - . _ ~
create or replace function net._urlencode_string(string varchar)
    returns text
    language plpgsql
    immutable
    parallel safe
as $$
declare
    raw bytea;
    encoded text := '';
    byte int;
begin
    if string is null then
        return null;
    end if;
    if string ~ '^[A-Za-z0-9._~-]*$' then
        return string;
    end if;
    raw := convert_to(string, 'UTF8');
    for i in 0 .. length(raw) - 1 loop
        byte := get_byte(raw, i);
        if (byte between 48 and 57) or (byte between 65 and 90) or (byte between 97 and 122)
           or byte in (45, 46, 95, 126) then
            encoded := encoded || chr(byte);
        else
            encoded := encoded || '%' || upper(lpad(to_hex(byte), 2, '0'));
        end if;
    end loop;
    return encoded;
end
$$;

-- Append already-encoded `key=value` pairs to a URL's query string, before any fragment.
create or replace function net._encode_url_with_params_array(url text, params_array text[])
    returns text
    language plpgsql
    immutable
    parallel safe
as $$
declare
    base text := split_part(url, '#', 1);
    fragment text := substr(url, length(split_part(url, '#', 1)) + 1);
    query text := array_to_string(params_array, '&');
begin
    if url is null or params_array is null or query = '' then
        return url;
    end if;
    if strpos(base, '?') = 0 then
        base := base || '?';
    elsif right(base, 1) not in ('?', '&') then
        base := base || '&';
    end if;
    return base || query || fragment;
end
$$;

-- Decode a host name's %XX escapes as libcurl does before checking it: ASCII bytes become
-- themselves, other bytes `a` (libcurl takes them), and a broken escape `%` (refused).
create or replace function net._percent_decode_ascii(host text)
    returns text
    language plpgsql
    immutable
    parallel safe
as $$
declare
    parts text[] := string_to_array(host, '%');
    decoded text := regexp_replace(parts[1], '[^\x01-\x7f]', 'a', 'g');
    byte int;
begin
    for i in 2 .. coalesce(array_length(parts, 1), 0) loop
        if parts[i] !~ '^[0-9A-Fa-f]{2}' then
            return '%';
        end if;
        byte := ('x' || lpad(left(parts[i], 2), 8, '0'))::bit(32)::int;
        decoded := decoded || case when byte between 1 and 127 then chr(byte) when byte = 0 then ' ' else 'a' end
                   || regexp_replace(substr(parts[i], 3), '[^\x01-\x7f]', 'a', 'g');
    end loop;
    return decoded;
end
$$;

-- True for `[IPv6 address]` or `[IPv6 address%zone]` as libcurl accepts them.
create or replace function net._is_ipv6_literal(host text)
    returns bool
    language plpgsql
    immutable
    parallel safe
as $$
declare
    inner_text text := substring(host from '^\[(.*)\]$');
    address text := split_part(inner_text, '%', 1);
    zone text := substr(inner_text, length(address) + 2);
begin
    if inner_text is null or address !~ '^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*$' then
        return false;
    end if;
    if strpos(inner_text, '%') > 0 then
        if zone like '25%' then
            zone := substr(zone, 3);
        end if;
        if zone !~ '^([A-Za-z0-9._~-]|[^\x01-\x7f]|%[0-9A-Fa-f]{2})+$' then
            return false;
        end if;
    end if;
    perform address::inet;
    return true;
exception when invalid_text_representation then
    return false;
end
$$;

-- Raise `invalid URL "<url>": <text>` for a URL libcurl's parser refuses, with the text
-- curl_url_strerror gives for what curl_url_set(CURLUPART_URL, url, 0) returns (libcurl 8),
-- as pg_net raises it. Schemes other than http/https get libcurl's `Unsupported URL scheme`
-- (libcurl itself would parse ftp:// and fail the transfer later). A NULL url passes: the
-- queue's not-null constraint raises pg_net's error for it.
create or replace function net._check_url(url text)
    returns void
    language plpgsql
    immutable
    parallel safe
as $$
declare
    -- Bytes libcurl refuses in the user, password, path, query and fragment.
    junk constant text := '[\x01-\x20\x7f]';
    -- Bytes refused in a host name, after its %XX escapes are decoded.
    host_junk constant text := '[\x01-\x20!"#$%&''()*+,/:;<=>?@\[\\\]^`{|}\x7f]';
    scheme text := substring(url from '^([A-Za-z][A-Za-z0-9+.-]{0,39}):');
    rest text;
    slashes int;
    authority text;
    userinfo text;
    hostport text;
    host text;
    port text;
    before_fragment text;
    problem text;
begin
    if url is null then
        return;
    end if;
    if url = '' or octet_length(url) > 8000000 then
        problem := 'Malformed input to a URL function';
    elsif scheme is null then
        problem := 'Bad scheme';
    elsif lower(scheme) not in ('http', 'https') then
        problem := 'Unsupported URL scheme';
    else
        rest := substr(url, length(scheme) + 2);
        slashes := length(substring(rest from '^/{0,4}'));
        rest := substr(rest, slashes + 1);
        authority := substring(rest from '^[^/?#]*');
        rest := substr(rest, length(authority) + 1);
        -- The user info ends at the first @; any later @ is part of the host, and refused.
        if strpos(authority, '@') > 0 then
            userinfo := split_part(authority, '@', 1);
            hostport := substr(authority, length(userinfo) + 2);
        else
            hostport := authority;
        end if;
        if left(hostport, 1) = '[' then
            host := coalesce(substring(hostport from '^\[[^\]]*\]'), hostport);
            port := substr(hostport, length(host) + 1);
        else
            host := split_part(hostport, ':', 1);
            port := substr(hostport, length(host) + 1);
        end if;
        if port <> '' and left(port, 1) <> ':' then
            port := 'x';
        else
            port := substr(port, 2);
        end if;
        before_fragment := split_part(rest, '#', 1);

        if slashes not between 1 and 3 then
            problem := 'Unsupported number of slashes following scheme';
        elsif authority = '' then
            problem := 'No host present';
        elsif split_part(userinfo, ':', 1) ~ junk then
            problem := 'Bad user';
        elsif substr(userinfo, length(split_part(userinfo, ':', 1)) + 2) ~ junk then
            problem := 'Bad password';
        elsif host = '' then
            problem := 'No host present';
        elsif substring(port from '[^0-9]') = '\' then
            problem := 'Found a backslash where a forward slash was expected';
        elsif port ~ '[^0-9]' then
            problem := 'Port number was not a decimal number between 0 and 65535';
        elsif port <> '' and port::numeric > 65535 then
            problem := 'Port number was not a decimal number between 0 and 65535';
        elsif left(host, 1) = '[' then
            if host ~ '%.*[\x01-\x1f]' then
                -- libcurl checks a zone id with the host name's rule.
                problem := 'Bad hostname';
            elsif not net._is_ipv6_literal(host) then
                problem := 'Bad IPv6 address';
            end if;
        elsif net._percent_decode_ascii(host) ~ host_junk or net._percent_decode_ascii(host) ~ '^\.+$' then
            problem := 'Bad hostname';
        end if;
        if problem is null then
            if substr(rest, length(before_fragment) + 2) ~ junk then
                problem := 'Bad fragment';
            elsif substr(before_fragment, length(split_part(before_fragment, '?', 1)) + 2) ~ junk then
                problem := 'Bad query';
            elsif split_part(before_fragment, '?', 1) ~ junk then
                problem := 'Bad path';
            end if;
        end if;
    end if;
    if problem is not null then
        raise exception 'invalid URL "%": %', url, problem
            using errcode = 'invalid_parameter_value';
    end if;
end
$$;

-- Check that headers are a flat JSON object of strings; numbers and booleans become text.
create or replace function net._normalize_headers(headers jsonb)
    returns jsonb
    language plpgsql
    immutable
    parallel safe
as $$
declare
    bad_name text;
begin
    if headers is null or headers = 'null'::jsonb or headers = '{}'::jsonb then
        return '{}'::jsonb;
    end if;
    if jsonb_typeof(headers) <> 'object' then
        raise exception 'headers must be a JSON object of name/value strings, got %', jsonb_typeof(headers)
            using errcode = 'invalid_parameter_value';
    end if;
    -- The common case, all string values with token names and no line breaks, in one pass.
    if not jsonb_path_exists(headers, '$.keyvalue() ? (@.value.type() != "string"
            || !(@.key like_regex "^[-!#$%&''*+.^_`|~0-9A-Za-z]+$") || @.value like_regex "[\r\n]")') then
        return headers;
    end if;
    select key into bad_name
    from jsonb_each(headers)
    where jsonb_typeof(value) not in ('string', 'number', 'boolean')
    limit 1;
    if bad_name is not null then
        raise exception 'header "%" must have a string value, got %', bad_name, jsonb_typeof(headers -> bad_name)
            using errcode = 'invalid_parameter_value',
                  hint = 'numbers and booleans are converted to text; objects, arrays and null are refused';
    end if;
    select key into bad_name
    from jsonb_each_text(headers)
    where key !~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]+$' or value ~ '[\r\n\x00]'
    limit 1;
    if bad_name is not null then
        raise exception 'header "%" has an invalid name or a line break in its value', bad_name
            using errcode = 'invalid_parameter_value';
    end if;
    return (select coalesce(jsonb_object_agg(key, value), '{}'::jsonb) from jsonb_each_text(headers));
end
$$;

-- Queue one request and wake the workers at commit. Every request function ends here.
-- `options` holds the delivery options of net.http_request (sql/0007_delivery.sql), NULL for a
-- plain request. Version 9 added it: the six-argument form goes, or calls would be ambiguous.
drop function if exists net._queue_request(text, text, jsonb, jsonb, bytea, int);
create or replace function net._queue_request(
    method text,
    url text,
    params jsonb,
    headers jsonb,
    body bytea,
    timeout_milliseconds int,
    options jsonb default null
)
    returns bigint
    language plpgsql
    volatile
as $$
declare
    request_id bigint;
    params_array text[];
    authority text := split_part(split_part(split_part(url, '/', 3), '?', 1), '#', 1);
begin
    -- The common case (http(s)://host[:port] then printable ASCII) in a few cheap tests, each
    -- a sufficient condition for net._check_url to pass; anything else gets the full check and
    -- its message. One regex over the whole URL cost three times as much per call.
    if url is null or not (
        (left(url, 7) = 'http://' or left(url, 8) = 'https://')
        and octet_length(url) <= 8000000
        and url !~ '[^!-~]'
        and case when authority ~ '^[A-Za-z0-9._-]+(:[0-9]{1,5})?$'
                 then btrim(split_part(authority, ':', 1), '.') <> ''
                      and coalesce(nullif(split_part(authority, ':', 2), '')::int, 0) <= 65535
                 else false end
    ) then
        perform net._check_url(url);
    end if;
    if timeout_milliseconds is null or timeout_milliseconds <= 0 then
        raise exception 'timeout_milliseconds must be a positive number of milliseconds, got %',
            coalesce(timeout_milliseconds::text, 'NULL')
            using errcode = 'invalid_parameter_value';
    end if;
    if params is not null and params <> '{}'::jsonb then
        if jsonb_typeof(params) <> 'object' then
            raise exception 'params must be a JSON object, got %', jsonb_typeof(params)
                using errcode = 'invalid_parameter_value';
        end if;
        select array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value))
        into params_array
        from jsonb_each_text(params);
        url := net._encode_url_with_params_array(url, params_array);
    end if;
    if headers is not null and headers <> '{}'::jsonb then
        headers := net._normalize_headers(headers);
    end if;

    if options is null or not options ? 'ordering_key' then
        insert into net.http_request_queue(method, url, headers, body, timeout_milliseconds, options)
        values (upper(method), url, coalesce(headers, '{}'::jsonb), body, timeout_milliseconds, options)
        returning id into request_id;
    else
        -- In line behind its key's head (sql/0012_ordering_and_circuits.sql).
        request_id := net._queue_ordered(upper(method), url, coalesce(headers, '{}'::jsonb), body,
                                         timeout_milliseconds, options);
    end if;

    -- Delivered at commit, and collapsed to one per transaction by PostgreSQL.
    perform pg_notify('pgnet_curl_wake', '');
    return request_id;
end
$$;

-- The request functions are PL/pgSQL, not SQL: as SECURITY DEFINER functions with a SET
-- clause (sql/0004_privileges.sql) they cannot be inlined, and a SQL function then runs its
-- query through an executor of its own on every call, which costs more.
create or replace function net.http_get(
    url text,
    params jsonb default '{}'::jsonb,
    headers jsonb default '{}'::jsonb,
    timeout_milliseconds int default 5000
)
    returns bigint
    language plpgsql
    volatile
as $$
begin
    return net._queue_request('GET', url, params, headers, null, timeout_milliseconds);
end
$$;

create or replace function net.http_post(
    url text,
    body jsonb default '{}'::jsonb,
    params jsonb default '{}'::jsonb,
    headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
    timeout_milliseconds int default 5000
)
    returns bigint
    language plpgsql
    volatile
as $$
declare
    content_type text;
begin
    if headers ? 'Content-Type' then
        content_type := headers ->> 'Content-Type';
    else
        select header_value into content_type
        from jsonb_each_text(coalesce(headers, '{}'::jsonb)) as h(header_name, header_value)
        where lower(header_name) = 'content-type'
        limit 1;
    end if;

    if content_type is null then
        headers := coalesce(headers, '{}'::jsonb) || '{"Content-Type": "application/json"}'::jsonb;
    elsif content_type <> 'application/json' then
        raise exception 'Content-Type header must be "application/json"'
            using errcode = 'invalid_parameter_value',
                  hint = 'net.http_post sends JSON bodies only, as pg_net does';
    end if;

    return net._queue_request('POST', url, params, headers, convert_to(body::text, 'UTF8'), timeout_milliseconds);
end
$$;

create or replace function net.http_delete(
    url text,
    params jsonb default '{}'::jsonb,
    headers jsonb default '{}'::jsonb,
    timeout_milliseconds int default 5000,
    body jsonb default null
)
    returns bigint
    language plpgsql
    volatile
as $$
begin
    return net._queue_request('DELETE', url, params, headers, convert_to(body::text, 'UTF8'), timeout_milliseconds);
end
$$;

-- Block until the request has its response row (bounded by statement_timeout).
create or replace function net._await_response(request_id bigint)
    returns bool
    language plpgsql
    volatile
    parallel unsafe
as $$
begin
    while not exists (select 1 from net._http_response r where r.id = request_id) loop
        perform pg_sleep(0.01);
    end loop;
    return true;
end
$$;

create or replace function net._http_collect_response(request_id bigint, async bool default true)
    returns net.http_response_result
    language plpgsql
    volatile
    parallel unsafe
as $$
declare
    rec net._http_response;
begin
    if not async then
        perform net._await_response(request_id);
    end if;

    select * into rec from net._http_response r where r.id = request_id;

    if rec is null then
        if exists (select 1 from net.http_request_queue q where q.id = request_id)
           or exists (select 1 from net._ordered_requests o where o.id = request_id)
           or exists (select 1 from net._held_requests h where h.id = request_id) then
            return ('PENDING', 'request is pending processing', null)::net.http_response_result;
        end if;
        return ('ERROR', 'request matching request_id not found', null)::net.http_response_result;
    end if;
    if rec.error_msg is not null then
        return ('ERROR', rec.error_msg, null)::net.http_response_result;
    end if;
    return ('SUCCESS', 'ok', (rec.status_code, rec.headers, rec.content)::net.http_response)::net.http_response_result;
end
$$;

-- Deprecated in pg_net (whose body is broken there); ours warns and works.
create or replace function net.http_collect_response(request_id bigint, async bool default true)
    returns net.http_response_result
    language plpgsql
    volatile
    parallel unsafe
as $$
begin
    raise notice 'The net.http_collect_response function is deprecated.';
    return net._http_collect_response(request_id, async);
end
$$;

create or replace function net.wake()
    returns void
    language sql
    volatile
as $$
    select pg_notify('pgnet_curl_wake', '')
$$;

-- Ask every worker serving this database to re-read its settings and reconnect.
create or replace function net.worker_restart()
    returns bool
    language plpgsql
    volatile
as $$
begin
    perform pg_notify('pgnet_curl_control', 'restart');
    return exists (
        select 1 from pg_stat_activity
        where datname = current_database() and application_name like 'pgnet-curl%'
    );
end
$$;

create or replace function net.check_worker_is_up()
    returns void
    language plpgsql
    volatile
as $$
begin
    if not exists (
        select 1 from pg_stat_activity
        where datname = current_database() and application_name like 'pgnet-curl%'
    ) then
        raise exception using
            message = 'the pg_net background worker is not up',
            detail = format('no pgnet-curl worker is connected to database %I', current_database()),
            hint = 'start one with: pgnet-curl serve --dsn <this database>';
    end if;
end
$$;

-- Wait until a worker is connected (bounded by statement_timeout).
create or replace function net.wait_until_running()
    returns void
    language plpgsql
    volatile
as $$
begin
    while not exists (
        select 1 from pg_stat_activity
        where datname = current_database() and application_name like 'pgnet-curl%'
    ) loop
        perform pg_sleep(0.05);
        -- pg_stat_activity is read once per transaction unless told to look again.
        perform pg_stat_clear_snapshot();
    end loop;
end
$$;
comment on function net.wait_until_running() is 'waits until the worker is running';

-- Privileges are set by 0004_privileges.sql, after every object exists.

insert into net._schema_migrations(version) values (1) on conflict do nothing;
