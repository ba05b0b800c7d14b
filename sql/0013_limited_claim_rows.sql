-- pgnet-curl schema, version 13: the limited claim leases every row it chose.
--
-- The claim_limited statement of version 8-12 was `update ... where id = any(net._claim_limited(..))`:
-- the function's queries see rows committed after the UPDATE's own snapshot was taken, so a row
-- committed in that moment was chosen (a concurrency slot and a token taken for it) but not
-- leased, since the UPDATE could not see it. It waited unleased while its slot stayed taken until
-- the slot's lease expired: a host with max_concurrent = 1 stalled for the request's timeout plus
-- the grace. The lease is now a statement of its own, run after the choice, which sees every row
-- the choice locked.
create or replace function net._claim_limited_rows(owner text, max_rows int, grace_s float8, overdue_only bool)
    returns table(id bigint, method text, url text, headers text, body bytea, timeout_milliseconds int,
                  attempts int, created_epoch float8, retries int, options text, tableoid oid)
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    chosen bigint[] := net._claim_limited(owner, max_rows, grace_s, overdue_only);
begin
    return query
    update net.http_request_queue q
    set lease_owner = owner,
        lease_expires_at = clock_timestamp() + make_interval(secs => q.timeout_milliseconds / 1000.0 + grace_s),
        attempts = q.attempts + 1
    where q.id = any(chosen)
    returning q.id, q.method::text, q.url, q.headers::text, q.body, q.timeout_milliseconds, q.attempts,
              extract(epoch from q.created_at)::float8, q.retries, q.options::text, q.tableoid;
end
$$;

insert into net._schema_migrations(version) values (13) on conflict do nothing;
