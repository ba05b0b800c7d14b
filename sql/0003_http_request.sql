-- pgnet-curl schema, version 3: one generic request function, beyond pg_net.
--
-- Any method token (PUT, PATCH, HEAD, OPTIONS, ...) and any body: bytes sent as given, with
-- whatever Content-Type the headers name (none is added). pg_net's functions keep their rules.
create or replace function net.http_request(
    method text,
    url text,
    body bytea default null,
    params jsonb default '{}'::jsonb,
    headers jsonb default '{}'::jsonb,
    timeout_milliseconds int default 5000
)
    returns bigint
    language plpgsql
    volatile
as $$
begin
    if method is null or method !~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]+$' then
        raise exception 'method must be an HTTP method token such as GET, PUT or PATCH, got %',
            coalesce(quote_literal(method), 'NULL')
            using errcode = 'invalid_parameter_value';
    end if;
    return net._queue_request(method, url, params, headers, body, timeout_milliseconds);
end
$$;

comment on function net.http_request(text, text, bytea, jsonb, jsonb, int) is
    'Queue a request with any method and body (pgnet-curl); returns the request id.';

insert into net._schema_migrations(version) values (3) on conflict do nothing;
