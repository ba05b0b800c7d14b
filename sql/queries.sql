-- Every statement the worker runs, each under a `-- name: <name>` header.
-- Loaded by pgnet_curl/queue.py; parameters use psycopg's %(name)s style.

-- name: claim
-- Take up to %(limit)s unleased (or lease-expired) requests, oldest first, without waiting
-- for rows another worker is claiming; a retry waits for its not_before. The lease covers the
-- request's timeout plus a grace.
-- `id = any(array(...))` keeps the update on the primary key (a join may seq-scan the queue).
-- tableoid tells the worker which install of the schema the rows come from (see `check`).
update net.http_request_queue
set lease_owner = %(owner)s,
    lease_expires_at = clock_timestamp()
        + make_interval(secs => timeout_milliseconds / 1000.0 + %(grace_s)s),
    attempts = attempts + 1
where id = any(array(
    select id
    from net.http_request_queue
    where (lease_expires_at is null or lease_expires_at < clock_timestamp())
      and (not_before is null or not_before <= clock_timestamp())
    order by id
    limit %(limit)s
    for update skip locked
))
returning id, method, url, headers::text, body, timeout_milliseconds,
          attempts, extract(epoch from created_at)::float8, retries, options::text, tableoid;

-- name: claim_limited
-- The claim while net.destination_limits has rows: the same lease, on the rows the per-host
-- limits let through now (sql/0008_destination_limits.sql chooses them and takes their tokens,
-- sql/0013 leases them); %(overdue_only)s for the safety poll's, which takes only expired leases
-- and due retries. Exactly claim's columns: the worker reads both the same way.
select id, method, url, headers, body, timeout_milliseconds, attempts, created_epoch, retries, options, tableoid
from net._claim_limited_rows(%(owner)s, %(limit)s, %(grace_s)s, %(overdue_only)s);

-- name: limits_active
-- Whether any per-destination limit is set (the worker claims with claim_limited if so), and
-- whether any caps concurrency (a finished request may then let a held-back one go).
select count(*) > 0, count(max_concurrent) > 0 from net.destination_limits;

-- name: limits_due
-- Seconds until a host that limits held back can send again (NULL: none is waiting for tokens).
select net._destination_limits_due_s();

-- name: set_destination_limit
-- A `serve --destination-limit` flag: insert or replace the pattern's row.
insert into net.destination_limits as l (host_pattern, max_concurrent, max_per_second, burst, source)
values (%(host_pattern)s, %(max_concurrent)s, %(max_per_second)s, %(burst)s, 'serve')
on conflict (host_pattern) do update
set max_concurrent = excluded.max_concurrent, max_per_second = excluded.max_per_second,
    burst = excluded.burst, source = 'serve'
where (l.max_concurrent, l.max_per_second, l.burst, l.source)
      is distinct from (excluded.max_concurrent, excluded.max_per_second, excluded.burst, 'serve');

-- name: write_back
-- Store finished responses of the requests this worker still owns and dequeue them: for plain
-- requests (no retry to schedule, not failed, no notify channel, no callback), which is nearly
-- every request. %(release_slots)s is true for rows a limited claim may have given a
-- concurrency slot (sql/0008_destination_limits.sql); false makes the slot delete a one-time
-- filter that never scans. A row whose lease passed to another worker is skipped:
-- that worker answers it. %(rows)s is one JSON array of [id, status_code, content_type,
-- headers, content, content_bytes (base64), timed_out, error_msg, error_detail, attempts]
-- arrays: one parameter, parsed once, instead of arrays dumped element by element.
with r as (
    select (e ->> 0)::bigint as id, (e ->> 1)::int as status_code, e ->> 2 as content_type,
           e -> 3 as headers, e ->> 4 as content, decode(e ->> 5, 'base64') as content_bytes,
           (e ->> 6)::bool as timed_out, e ->> 7 as error_msg, e ->> 8 as error_detail, (e ->> 9)::int as attempts
    from jsonb_array_elements(%(rows)s::jsonb) as e
), unleased as (
    delete from net._destination_leases
    where %(release_slots)s and id = any(array(select id from r)) and owner = %(owner)s
), done as (
    delete from net.http_request_queue
    where id = any(array(select id from r)) and lease_owner = %(owner)s
    returning id, requested_by
)
insert into net._http_response
    (id, status_code, content_type, headers, content, content_bytes, timed_out, error_msg, error_detail,
     requested_by, attempts)
select r.id, r.status_code, r.content_type, nullif(r.headers, 'null'), r.content, r.content_bytes, r.timed_out,
       r.error_msg, r.error_detail, done.requested_by, r.attempts
from r join done on done.id = r.id
on conflict (id) do nothing;

-- name: write_back_delivery
-- write_back for the rows that use a delivery feature, in one statement: a request that will
-- be tried again goes back with its not-before time; the per-destination concurrency a request
-- held is released; a failed request is archived whole for replay; the completion NOTIFY is
-- sent in the same transaction as the row; an ordered head's key lets its next request in (or
-- halts, with %(halt)s); failures count towards their host's circuit, and a probe's outcome
-- closes or reopens it (sql/0012_ordering_and_circuits.sql). Rows as in write_back, with four
-- more elements: retry_in_ms, failed, circuit_failure (a connection error, timeout or 5xx) and
-- probe (the request was its circuit's probe). Returns (rows stored or rescheduled, NOTIFYs
-- sent (a CTE that is not read does not run), the [id, callback oid, requested_by] of stored
-- rows whose request has a SQL callback, as JSON, {requests let into the queue, keys turned
-- idle, keys halted} or NULL, the hosts whose circuit this opened, as JSON, circuits closed, held
-- requests moved back into the queue).
with r as (
    select (e ->> 0)::bigint as id, (e ->> 1)::int as status_code, e ->> 2 as content_type,
           e -> 3 as headers, e ->> 4 as content, decode(e ->> 5, 'base64') as content_bytes,
           (e ->> 6)::bool as timed_out, e ->> 7 as error_msg, e ->> 8 as error_detail, (e ->> 9)::int as attempts,
           (e ->> 10)::float8 as retry_in_ms, (e ->> 11)::bool as failed, (e ->> 12)::bool as circuit_failure,
           (e ->> 13)::bool as probe
    from jsonb_array_elements(%(rows)s::jsonb) as e
), rescheduled as (
    -- `q.id = any(array(...))` keeps the update on the primary key: a join alone seq-scans the queue.
    update net.http_request_queue q
    set lease_owner = null, lease_expires_at = null, attempts = 0, retries = q.retries + 1,
        not_before = clock_timestamp() + make_interval(secs => r.retry_in_ms / 1000.0)
    from r
    where q.id = any(array(select id from r where retry_in_ms is not null))
      and q.id = r.id and r.retry_in_ms is not null and q.lease_owner = %(owner)s
    returning q.id, q.url
), unleased as (
    -- The per-destination concurrency these requests held (sql/0008_destination_limits.sql).
    delete from net._destination_leases
    where id = any(array(select id from r)) and owner = %(owner)s
), done as (
    delete from net.http_request_queue
    where id = any(array(select id from r where retry_in_ms is null)) and lease_owner = %(owner)s
    returning id, method, url, headers, body, timeout_milliseconds, options, requested_by, created_at
), archived as (
    insert into net._http_request_archive
        (id, method, url, headers, body, timeout_milliseconds, options, requested_by, created_at)
    select d.id, d.method, d.url, d.headers, d.body, d.timeout_milliseconds, d.options, d.requested_by, d.created_at
    from done d join r on r.id = d.id
    where r.failed
    on conflict (id) do nothing
), stored as (
    insert into net._http_response
        (id, status_code, content_type, headers, content, content_bytes, timed_out, error_msg, error_detail,
         requested_by, attempts)
    select r.id, r.status_code, r.content_type, nullif(r.headers, 'null'), r.content, r.content_bytes, r.timed_out,
           r.error_msg, r.error_detail, done.requested_by, r.attempts
    from r join done on done.id = r.id
    on conflict (id) do nothing
    returning id
), notified as (
    -- Rows without a channel are passed over first; the stored ones are found by an array test,
    -- not a join the planner may run as a nested loop over the two CTEs.
    select pg_notify(c.channel, c.id::text)
    from (select d.id, coalesce(d.options ->> 'notify_channel', %(notify_channel)s::text) as channel from done d) c
    where c.channel is not null and c.id = any(array(select id from stored))
), ordered as (
    -- Finished ordered heads: the next in line goes into the queue, or the key halts.
    select net._ordering_advance(f.requested_by, f.ordering_keys, f.ids, f.roots, f.failed, %(halt)s) as counts
    from (select array_agg(d.requested_by::text) as requested_by, array_agg(d.options ->> 'ordering_key') as ordering_keys,
                 array_agg(d.id) as ids, array_agg(coalesce((d.options ->> 'replay_of')::bigint, d.id)) as roots,
                 array_agg(r.failed) as failed
          from done d join r on r.id = d.id
          where d.options ? 'ordering_key') f
    where f.ids is not null
), circuit_hosts as (
    -- Failures and probe outcomes by destination host.
    select net._url_host(u.url) as host, count(*) filter (where r.circuit_failure) as failures,
           coalesce(bool_or(r.probe and r.circuit_failure), false) as probe_failed,
           coalesce(bool_or(r.probe and not r.circuit_failure), false) as probe_succeeded
    from r
    join (select id, url from done union all select id, url from rescheduled) u on u.id = r.id
    where r.circuit_failure or r.probe
    group by 1
), closed as (
    -- The probe went through: the circuit closes, and the requests held for it go again.
    delete from net._destination_circuits c
    using circuit_hosts h
    where c.host = h.host and h.probe_succeeded and c.state = 'half_open'
    returning c.host
), released_held as (
    -- Its held requests go back into the queue (as the owner: the worker may not insert there).
    select net._circuit_release(array_agg(c.host)) as moved
    from closed c
    having count(*) > 0
), reopened as (
    -- The probe failed: open again, for twice as long.
    update net._destination_circuits c
    set state = 'open', opens = c.opens + 1, failures = c.failures + h.failures, last_failure_at = clock_timestamp(),
        opened_at = now(), probe_id = null, probe_expires_at = null,
        retry_at = clock_timestamp() + make_interval(secs => least(%(circuit_cooldown_cap_s)s::float8,
                                                                   %(circuit_cooldown_s)s::float8 * 2.0 ^ c.opens))
    from circuit_hosts h
    where c.host = h.host and h.probe_failed and c.state = 'half_open'
    returning c.host
), counted as (
    -- Other failures: counted while the circuit is closed, within the window; at the threshold it opens.
    insert into net._destination_circuits as c (host, failures, first_failure_at, last_failure_at, state, opens,
                                                 opened_at, retry_at)
    select h.host, h.failures, clock_timestamp(), clock_timestamp(),
           case when h.failures >= %(circuit_threshold)s then 'open' else 'closed' end,
           case when h.failures >= %(circuit_threshold)s then 1 else 0 end,
           case when h.failures >= %(circuit_threshold)s then now() end,
           case when h.failures >= %(circuit_threshold)s
                then clock_timestamp() + make_interval(secs => least(%(circuit_cooldown_cap_s)s::float8,
                                                                     %(circuit_cooldown_s)s::float8)) end
    from circuit_hosts h
    where %(circuit_threshold)s::int > 0 and h.failures > 0 and not h.probe_failed and not h.probe_succeeded
    on conflict (host) do update
    set failures = case when c.state = 'closed' and c.first_failure_at < clock_timestamp()
                                 - make_interval(secs => %(circuit_window_s)s::float8)
                        then excluded.failures else c.failures + excluded.failures end,
        first_failure_at = case when c.state = 'closed' and c.first_failure_at < clock_timestamp()
                                         - make_interval(secs => %(circuit_window_s)s::float8)
                                then clock_timestamp() else c.first_failure_at end,
        last_failure_at = clock_timestamp(),
        state = case when c.state = 'closed'
                          and case when c.first_failure_at < clock_timestamp() - make_interval(secs => %(circuit_window_s)s::float8)
                                   then excluded.failures else c.failures + excluded.failures end >= %(circuit_threshold)s
                     then 'open' else c.state end,
        opens = case when c.state = 'closed'
                          and case when c.first_failure_at < clock_timestamp() - make_interval(secs => %(circuit_window_s)s::float8)
                                   then excluded.failures else c.failures + excluded.failures end >= %(circuit_threshold)s
                     then c.opens + 1 else c.opens end,
        opened_at = case when c.state = 'closed'
                              and case when c.first_failure_at < clock_timestamp() - make_interval(secs => %(circuit_window_s)s::float8)
                                       then excluded.failures else c.failures + excluded.failures end >= %(circuit_threshold)s
                         then now() else c.opened_at end,
        retry_at = case when c.state = 'closed'
                             and case when c.first_failure_at < clock_timestamp() - make_interval(secs => %(circuit_window_s)s::float8)
                                      then excluded.failures else c.failures + excluded.failures end >= %(circuit_threshold)s
                        then clock_timestamp() + make_interval(secs => least(%(circuit_cooldown_cap_s)s::float8,
                                                                             %(circuit_cooldown_s)s::float8 * 2.0 ^ c.opens))
                        else c.retry_at end
    returning c.host, c.state = 'open' and c.opened_at = now() as opened
)
select (select count(*) from stored) + (select count(*) from rescheduled),
       (select count(*) from notified),
       (select jsonb_agg(jsonb_build_array(d.id, (d.options ->> 'callback')::oid, d.requested_by))
        from done d where d.options ? 'callback' and d.id = any(array(select id from stored))),
       (select counts from ordered),
       (select jsonb_agg(o.host) from (select host from counted where opened union all select host from reopened) o),
       (select count(*) from closed),
       (select moved from released_held);

-- name: run_callbacks
-- Run the SQL callbacks of responses just stored, in the write-back's transaction.
select net._run_callbacks(%(calls)s::jsonb);

-- name: signing_keys
-- The signing keys that have not expired, for Standard Webhooks signatures.
select key_id, secret, extract(epoch from expires_at)::float8
from net.signing_keys
where expires_at is null or expires_at > clock_timestamp()
order by key_id, created_at;

-- name: release
-- Give back requests this worker claimed but will not finish (shutdown), for others to take.
-- Not counted as an attempt: the worker stopped on purpose.
with unleased as (
    delete from net._destination_leases where id = any(%(ids)s::bigint[]) and owner = %(owner)s
)
update net.http_request_queue
set lease_owner = null, lease_expires_at = null, attempts = greatest(attempts - 1, 0)
where id = any(%(ids)s::bigint[]) and lease_owner = %(owner)s;

-- name: release_unheld
-- Give back every request leased to this owner but %(held)s: a dead worker's (the supervisor
-- names it, holding none), or, when a worker reconnects, those it no longer knows of (a claim
-- whose answer the connection lost, a write-back a crash undid), so they are sent again now
-- rather than when their lease expires. Their attempt counts.
with unleased as (
    delete from net._destination_leases where owner = %(owner)s and id <> all(%(held)s::bigint[])
)
update net.http_request_queue
set lease_owner = null, lease_expires_at = null
where lease_owner = %(owner)s and id <> all(%(held)s::bigint[]);

-- name: ask_for_help
-- Wake every worker of this database: this one has more work than it can take.
select pg_notify('pgnet_curl_wake', 'help');

-- name: read_settings
-- pg_net's settings, as pg_net reads them (NULL when unset).
select current_setting('pg_net.batch_size', true), current_setting('pg_net.ttl', true);

-- name: check
-- Run by each worker every half second (settings_refresh_s):
-- the queue table's oid (NULL while the net schema is missing, a new one after a drop and
-- reinstall) and pg_net's settings as this session sees them after any pg_reload_conf().
-- A schema net this role may not use (an empty one, another extension's) counts as missing:
-- to_regclass() would raise "permission denied for schema net".
select (select case when has_schema_privilege(n.oid, 'usage') then to_regclass('net.http_request_queue')::oid end
        from pg_namespace n where n.nspname = 'net'),
       current_setting('pg_net.batch_size', true), current_setting('pg_net.ttl', true);

-- name: delete_expired
-- Delete up to %(limit)s responses older than the TTL (one pass, as pg_net's: pg_net.batch_size
-- rows at most). Rows another worker's pass is deleting are skipped, not waited for (the row
-- lock needs the worker's UPDATE on a column, callback_error).
delete from net._http_response
where ctid = any(array(
    select ctid from net._http_response
    where created < now() - make_interval(secs => %(ttl_s)s)
    limit %(limit)s
    for update skip locked
));

-- name: delete_expired_archive
-- Delete up to %(limit)s archived failed requests older than the TTL, with their responses.
delete from net._http_request_archive
where id = any(array(
    select id from net._http_request_archive
    where archived_at < now() - make_interval(secs => %(ttl_s)s)
    limit %(limit)s
));

-- name: delete_idle_buckets
-- Forget the token buckets that are full again (a new bucket starts full, so nothing changes),
-- and the slots of requests whose lease expired (their workers died).
with expired as (
    delete from net._destination_leases where expires_at <= clock_timestamp()
)
delete from net._destination_buckets b
using net.destination_limits l
where l.host_pattern = b.host_pattern
  and (l.max_per_second is null
       or b.tokens + l.max_per_second * extract(epoch from clock_timestamp() - b.refilled_at)
          >= coalesce(l.burst, greatest(1, l.max_per_second / 10)))
  and not exists (select from net._destination_leases d where d.host = b.host and d.expires_at > clock_timestamp());

-- name: sample
-- Queue depth and the age in seconds of the oldest request (ids follow creation order).
select (select count(*) from net.http_request_queue),
       (select extract(epoch from clock_timestamp() - created_at)::float8
        from net.http_request_queue order by id limit 1);

-- name: status_queue
-- For `pgnet-curl status`: waiting and leased requests, and the oldest one's age in seconds.
select count(*) filter (where lease_expires_at is null or lease_expires_at <= clock_timestamp()),
       count(*) filter (where lease_expires_at > clock_timestamp()),
       extract(epoch from clock_timestamp() - min(created_at))::float8
from net.http_request_queue;

-- name: status_outcomes
-- Responses stored in the last %(minutes)s minutes, by the outcome labels of the metrics.
select outcome, count(*)
from (
    select case when timed_out then 'timeout'
                when status_code is null then 'error'
                when status_code >= 500 then 'http_5xx'
                when status_code >= 400 then 'http_4xx'
                else 'success' end as outcome
    from net._http_response
    where created > now() - make_interval(mins => %(minutes)s)
) as recent
group by outcome;

-- name: status_workers
-- Worker sessions connected to this database.
select application_name, host(client_addr), backend_start, state
from pg_stat_activity
where datname = current_database() and application_name like 'pgnet-curl worker%%'
order by backend_start;

-- name: is_superuser
select current_setting('is_superuser') = 'on';

-- name: configured_names
-- Which of %(names)s some configuration file (postgresql.conf, postgresql.auto.conf) sets.
select distinct name from pg_file_settings where name = any(%(names)s::text[]);

-- name: declare_placeholder
-- Make this session know a setting no loaded module defines, so ALTER SYSTEM accepts it (12-16).
select set_config(%(name)s, '', false);

-- name: reload_conf
select pg_reload_conf();

-- name: pg_net_target
-- pg_net.database_name and pg_net.username as this session sees them (NULL or '' when unset):
-- the worker serves the database and connects as the role they name (pgnet_curl/worker/target.py).
select current_setting('pg_net.database_name', true), current_setting('pg_net.username', true);

-- name: claim_overdue
-- The safety poll's claim: what no wake announces, and only that. Requests whose lease expired
-- (the worker sending them stopped) and retries that are due; never a row nobody has claimed
-- yet, which waits for a wake as in pg_net. Exactly claim's columns: the worker reads both the
-- same way.
update net.http_request_queue
set lease_owner = %(owner)s,
    lease_expires_at = clock_timestamp()
        + make_interval(secs => timeout_milliseconds / 1000.0 + %(grace_s)s),
    attempts = attempts + 1
where id = any(array(
    select id
    from net.http_request_queue
    where (lease_expires_at < clock_timestamp() or (lease_expires_at is null and not_before <= clock_timestamp()))
      and (not_before is null or not_before <= clock_timestamp())
    order by id
    limit %(limit)s
    for update skip locked
))
returning id, method, url, headers::text, body, timeout_milliseconds,
          attempts, extract(epoch from created_at)::float8, retries, options::text, tableoid;

-- name: oldest_response
-- Seconds since the oldest response (or failed request kept for replay) was stored, by the
-- database's clock; NULL when there is none. Read after each TTL pass: the next one is due
-- when that row expires.
select extract(epoch from now() - least((select min(created) from net._http_response),
                                        (select min(archived_at) from net._http_request_archive)))::float8;

-- name: write_back_ordered
-- write_back for answered requests that have an ordering key and use no other delivery feature:
-- store and dequeue them as write_back does, and let each key's next request into the queue
-- (sql/0012_ordering_and_circuits.sql). Rows and %(release_slots)s as in write_back. Returns
-- (rows stored, {requests let into the queue, keys turned idle, keys halted}).
with r as (
    select (e ->> 0)::bigint as id, (e ->> 1)::int as status_code, e ->> 2 as content_type,
           e -> 3 as headers, e ->> 4 as content, decode(e ->> 5, 'base64') as content_bytes,
           (e ->> 6)::bool as timed_out, e ->> 7 as error_msg, e ->> 8 as error_detail, (e ->> 9)::int as attempts
    from jsonb_array_elements(%(rows)s::jsonb) as e
), unleased as (
    delete from net._destination_leases
    where %(release_slots)s and id = any(array(select id from r)) and owner = %(owner)s
), done as (
    delete from net.http_request_queue
    where id = any(array(select id from r)) and lease_owner = %(owner)s
    returning id, requested_by, options
), stored as (
    insert into net._http_response
        (id, status_code, content_type, headers, content, content_bytes, timed_out, error_msg, error_detail,
         requested_by, attempts)
    select r.id, r.status_code, r.content_type, nullif(r.headers, 'null'), r.content, r.content_bytes, r.timed_out,
           r.error_msg, r.error_detail, done.requested_by, r.attempts
    from r join done on done.id = r.id
    on conflict (id) do nothing
    returning id
), ordered as (
    select net._ordering_advance(f.requested_by, f.ordering_keys, f.ids, f.roots, f.failed, false) as counts
    from (select array_agg(d.requested_by::text) as requested_by, array_agg(d.options ->> 'ordering_key') as ordering_keys,
                 array_agg(d.id) as ids, array_agg(coalesce((d.options ->> 'replay_of')::bigint, d.id)) as roots,
                 array_agg(false) as failed
          from done d where d.options ? 'ordering_key') f
    where f.ids is not null
)
select (select count(*) from stored), (select counts from ordered);

-- name: release_idle_keys
-- Let the next request of idle ordering keys into the queue, or forget the keys with nothing in
-- line; with %(sweep)s, first look for open keys whose head left the queue by other means.
-- Returns {requests let in, keys still idle (a caller was adding to them: come back)}.
select net._ordering_release_idle(%(max_keys)s, %(sweep)s);

-- name: claim_circuits
-- The claim while some circuit is open or half-open: claim's lease, on the oldest claimable rows
-- whose host's circuit is not held. Rows of held hosts met on the way are set aside, whole, in
-- net._held_requests (attempts, not_before, retries and timeout kept; not sent, not failed), out
-- of every claim's path; closing the circuit moves them back (sql/0012_ordering_and_circuits.sql).
-- A URL that cannot hold a held host's name (the LIKE patterns) is not parsed. %(overdue_only)s:
-- the safety poll's claim, of expired leases and due retries only (as claim_overdue). Returns
-- claim's columns (the worker reads both the same way).
with held as (
    select hosts, array(select '%%' || replace(replace(replace(h, '\', '\\'), '%%', '\%%'), '_', '\_') || '%%'
                        from unnest(hosts) as h) as frags
    from (select net._circuit_held_hosts() as hosts) s
), candidates as (
    select q.id, case when lower(q.url) like any(held.frags) then coalesce(net._url_host(q.url), '') else '' end as host
    from net.http_request_queue q, held
    where (q.lease_expires_at is null or q.lease_expires_at < clock_timestamp())
      and (q.not_before is null or q.not_before <= clock_timestamp())
      and (not %(overdue_only)s or q.lease_expires_at is not null or q.not_before is not null)
    order by q.id
    limit %(limit)s
    for update of q skip locked
), set_aside as (
    delete from net.http_request_queue q
    using candidates c, held
    where q.id = c.id and c.host = any(held.hosts)
    returning q.id, c.host, q.method, q.url, q.headers, q.body, q.timeout_milliseconds, q.created_at, q.attempts,
              q.not_before, q.retries, q.options, q.requested_by
), kept as (
    insert into net._held_requests (id, host, method, url, headers, body, timeout_milliseconds, created_at, attempts,
                                    not_before, retries, options, requested_by)
    select id, host, method, url, headers, body, timeout_milliseconds, created_at, attempts, not_before, retries,
           options, requested_by
    from set_aside
)
update net.http_request_queue q
set lease_owner = %(owner)s,
    lease_expires_at = clock_timestamp()
        + make_interval(secs => q.timeout_milliseconds / 1000.0 + %(grace_s)s),
    attempts = q.attempts + 1
from candidates c, held
where q.id = c.id and c.host <> all(held.hosts)
returning q.id, q.method, q.url, q.headers::text, q.body, q.timeout_milliseconds,
          q.attempts, extract(epoch from q.created_at)::float8, q.retries, q.options::text, q.tableoid;

-- name: claim_probes
-- One probe for each circuit whose cool-down is over, leased to this worker: it turns half-open
-- (sql/0012_ordering_and_circuits.sql). Claim's columns.
select id, method, url, headers, body, timeout_milliseconds, attempts, created_epoch, retries, options, tableoid
from net._claim_probes(%(owner)s, %(grace_s)s);

-- name: feature_state
-- Read at connect, at each safety poll and when a circuit changes: whether any ordering key has
-- requests in line, whether any is idle (its next request is to be let in), and every host the
-- circuit breaker knows as a JSON array of [host, state, failures, seconds until its probe is due
-- (open) or expires (half-open)].
select exists (select from net._ordering_keys), exists (select from net._ordering_keys where state = 'idle'),
       (select jsonb_agg(jsonb_build_array(host, state, failures,
                         extract(epoch from case when state = 'open' then retry_at
                                                 when state = 'half_open' then probe_expires_at end
                                            - clock_timestamp())::float8))
        from net._destination_circuits);

-- name: reset_circuits
-- A request to these hosts succeeded: their run of failures is over.
delete from net._destination_circuits where host = any(%(hosts)s::text[]) and state = 'closed';

-- name: unpark_requests
-- Move back the held requests of circuits no longer held: a claim that set one aside while a
-- probe's write-back was closing its circuit, a circuit row deleted by hand.
select net._circuit_release(null);

-- name: status_circuits
-- For `pgnet-curl status`: circuits that are not closed, and hosts with failures counted.
select host, state, failures, extract(epoch from retry_at - clock_timestamp())::float8,
       (select count(*) from net._held_requests h where h.host = c.host)
from net._destination_circuits c
order by state <> 'closed' desc, host;

-- name: status_ordering
-- For `pgnet-curl status`: keys with requests in line, requests waiting behind heads, halted keys.
select (select count(*) from net._ordering_keys), (select count(*) from net._ordered_requests),
       (select count(*) from net._ordering_keys where state = 'halted');
