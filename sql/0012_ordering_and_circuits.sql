-- pgnet-curl schema, version 12: ordered delivery per key, and a circuit breaker per destination host.
--
-- Ordering (net.http_request(..., ordering_key => 'k')): requests with the same key are sent one
-- at a time, in id order. A key's head, the one request of it that may be sent, is in the queue
-- like any other request; the requests behind it wait in net._ordered_requests, out of the
-- queue, so that no claim ever scans past them. The write-back of a head's final response lets
-- the next one into the queue (net._ordering_advance), in the same statement.
--
-- Circuits: after N consecutive failures to a host (connection errors, timeouts, 5xx) within a
-- window, its circuit opens: its requests are held (pending, not sent, not failed, no attempt
-- counted) in net._held_requests, out of the queue's claim path, so that no claim scans past
-- them, until a cool-down that doubles each time passes; then one probe goes (half-open), and its
-- success closes the circuit and moves the held requests back. The state is in
-- net._destination_circuits, shared by every worker of every serve; the failure counts that
-- lead to it are kept by the workers too, in memory, so that a success costs nothing.
--
-- These tables keep the queue's persistence (schema.TABLES: logged unless installed --unlogged):
-- requests in line must survive exactly when the queue does.

-- ==== Ordering ================================================================================

-- One row per key that has a request in line, or that is halted.
create table if not exists net._ordering_keys(
    -- Private mode: the role whose key it is (keys are per role there); '' in shared mode.
    key_owner name not null,
    ordering_key text not null,
    -- open: the key's head is in the queue (queued, in flight, or waiting for a retry).
    -- idle: its head is done and no request behind it was seen: a worker looks again
    --       (net._ordering_release_idle) and lets the next one in, or forgets the key.
    -- halted: its head was dead-lettered under `serve --ordering-on-failure halt`; nothing goes
    --       until net.retry_request replays it (the replay of halted_id, or of its replay chain).
    state text not null default 'open' check (state in ('open', 'idle', 'halted')),
    halted_id bigint,
    -- The id of the first request of halted_id's replay chain (its place in line).
    halted_root bigint,
    changed_at timestamptz not null default clock_timestamp(),
    primary key (key_owner, ordering_key)
);
create index if not exists _ordering_keys_idle_idx on net._ordering_keys (key_owner, ordering_key)
    where state = 'idle';

-- Requests waiting behind their key's head: the queue's columns, and their place in line.
create table if not exists net._ordered_requests(
    id bigint primary key,
    key_owner name not null,
    ordering_key text not null,
    -- The id, or for a replay the id of the first request it replays: a replay takes its
    -- original's place in line, ahead of the requests queued after that one.
    line_position bigint not null,
    method text not null,
    url text not null,
    headers jsonb not null,
    body bytea,
    timeout_milliseconds int not null,
    options jsonb,
    requested_by name not null default net._caller(),
    created_at timestamptz not null default now()
);
create index if not exists _ordered_requests_line_idx on net._ordered_requests (key_owner, ordering_key, line_position, id);

-- Queue a request that has an ordering key (net._queue_request calls this for those): into the
-- queue when its key has nothing in line (it is the head), else into net._ordered_requests.
-- The key's row is taken first (created, or share-locked), and only then the id: two requests of
-- one transaction, or of transactions that follow each other, are in line in id order.
-- FOR KEY SHARE lets the workers update the row (their write-back never waits for a caller's
-- transaction) but not delete it: a key the worker would forget is kept while a request joins.
create or replace function net._queue_ordered(method text, url text, headers jsonb, body bytea,
                                              timeout_milliseconds int, options jsonb)
    returns bigint
    language plpgsql
    volatile
as $$
declare
    line_key text := options ->> 'ordering_key';
    line_owner name := case when (select o.private from net._install_options o) then net._caller() else '' end;
    replay_root bigint := (options ->> 'replay_of')::bigint;
    key_state text;
    key_halted_root bigint;
    request_id bigint;
begin
    loop
        insert into net._ordering_keys (key_owner, ordering_key) values (line_owner, line_key) on conflict do nothing;
        if found then
            key_state := 'new';
            exit;
        end if;
        select k.state, k.halted_root into key_state, key_halted_root
        from net._ordering_keys k
        where k.key_owner = line_owner and k.ordering_key = line_key
        for key share;
        -- Not found: a worker deleted the row between the two statements; insert it again.
        exit when found;
    end loop;
    if key_state = 'halted' and replay_root = key_halted_root then
        -- The replay of the halted head goes first; the rest follow it.
        update net._ordering_keys k set state = 'open', halted_id = null, halted_root = null, changed_at = clock_timestamp()
        where k.key_owner = line_owner and k.ordering_key = line_key;
        key_state := 'new';
    end if;
    if key_state = 'new' then
        insert into net.http_request_queue (method, url, headers, body, timeout_milliseconds, options)
        values (method, url, headers, body, timeout_milliseconds, options)
        returning id into request_id;
        return request_id;
    end if;
    request_id := nextval('net.http_request_queue_id_seq'::regclass);
    insert into net._ordered_requests (id, key_owner, ordering_key, line_position, method, url, headers, body,
                                       timeout_milliseconds, options)
    values (request_id, line_owner, line_key, coalesce(replay_root, request_id), method, url, headers, body,
            timeout_milliseconds, options);
    return request_id;
end
$$;

-- Called by the worker's write-back, in its statement, for the heads whose final response it
-- stored (the arrays, one element per head: the role it was made for, its key, its id, the id of
-- its first request if it is a replay (else its id), whether it failed). Each key's next request
-- in line moves into the queue; with halt, a failed (dead-lettered) head halts its key instead; a
-- key with nothing visible in line is forgotten, unless a caller is adding to it or a request
-- joined its line since (then it stays idle, and a worker looks again). Returns {requests let into
-- the queue, keys left idle, keys halted}. Runs as the owner: the worker may not insert into the
-- queue itself.
drop function if exists net._ordering_advance(jsonb, bool);
-- The key is compared with the default collation, whatever the call's (the parameters take the
-- arguments' collation, "C" for a role name): otherwise no index of the key columns could be used.
create or replace function net._ordering_advance(head_roles text[], head_keys text[], head_ids bigint[],
                                                 head_roots bigint[], head_failed bool[], halt bool)
    returns int[]
    language plpgsql
    volatile
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    private_mode bool := (select o.private from net._install_options o);
    counts int[];
    idle_owners name[];
    idle_keys text[];
    forgotten int;
begin
    with f as (
        select case when private_mode then u.requested_by::name else ''::name end as key_owner,
               u.ordering_key collate "default" as ordering_key, u.id,
               u.root, halt and u.failed as halts
        from unnest(head_roles, head_keys, head_ids, head_roots, head_failed) as u(requested_by, ordering_key, id, root, failed)
    ), halted as (
        update net._ordering_keys k
        set state = 'halted', halted_id = f.id, halted_root = f.root, changed_at = clock_timestamp()
        from f
        where f.halts and k.key_owner = f.key_owner and k.ordering_key = f.ordering_key and k.state = 'open'
        returning k.ordering_key
    ), nexts as (
        -- One per head that goes on: the next in line, or NULL when none is visible.
        select f.key_owner, f.ordering_key, n.id
        from f
        left join lateral (
            select o.id from net._ordered_requests o
            where o.key_owner = f.key_owner and o.ordering_key = f.ordering_key
            order by o.line_position, o.id
            limit 1
        ) n on true
        where not f.halts
    ), moved as (
        delete from net._ordered_requests o
        where o.id = any(array(select id from nexts where id is not null))
        returning o.id, o.method, o.url, o.headers, o.body, o.timeout_milliseconds, o.options, o.requested_by, o.created_at
    ), released as (
        insert into net.http_request_queue (id, method, url, headers, body, timeout_milliseconds, options,
                                            requested_by, created_at)
        select id, method, url, headers, body, timeout_milliseconds, options, requested_by, created_at from moved
        returning id
    ), idled as (
        update net._ordering_keys k
        set state = 'idle', changed_at = clock_timestamp()
        from nexts n
        where n.id is null and k.key_owner = n.key_owner and k.ordering_key = n.ordering_key and k.state = 'open'
        returning k.key_owner, k.ordering_key
    )
    select array[(select count(*) from released)::int, (select count(*) from idled)::int,
                 (select count(*) from halted)::int],
           (select array_agg(key_owner) from idled), (select array_agg(ordering_key) from idled)
    into counts, idle_owners, idle_keys;
    if counts[2] > 0 then
        -- Forget the keys that turned idle now, rather than one by one later: those no caller holds
        -- (FOR KEY SHARE) and, in a fresh snapshot taken under that lock, with nothing in line.
        select coalesce(array_agg(l.key_owner), '{}'), coalesce(array_agg(l.ordering_key), '{}')
        into idle_owners, idle_keys
        from (select k.key_owner, k.ordering_key
              from net._ordering_keys k
              join unnest(idle_owners, idle_keys) as u(key_owner, ordering_key)
                on k.key_owner = u.key_owner and k.ordering_key = u.ordering_key collate "default"
              where k.state = 'idle'
              for update of k skip locked) l;
        delete from net._ordering_keys k
        using unnest(idle_owners, idle_keys) as u(key_owner, ordering_key)
        where k.key_owner = u.key_owner and k.ordering_key = u.ordering_key collate "default"
          and not exists (select from net._ordered_requests o
                          where o.key_owner = u.key_owner and o.ordering_key = u.ordering_key collate "default");
        get diagnostics forgotten = row_count;
        counts[2] := counts[2] - forgotten;
    end if;
    return counts;
end
$$;

-- Let the next request of each idle key into the queue, or forget the key when nothing is in
-- line; at most max_keys keys. A key a caller is adding a request to (its FOR KEY SHARE) is
-- skipped, not waited for: returns {requests let in, keys still idle}; the worker comes back for
-- those. With sweep, first turn idle the open keys whose head left the queue without a
-- write-back (deleted by hand, truncated): one statement, one snapshot, in which a head moving
-- from net._ordered_requests into the queue is in exactly one of them.
create or replace function net._ordering_release_idle(max_keys int, sweep bool)
    returns int[]
    language plpgsql
    volatile
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    line record;
    next_id bigint;
    released int := 0;
begin
    if sweep then
        update net._ordering_keys k
        set state = 'idle', changed_at = clock_timestamp()
        where k.state = 'open'
          and not exists (
              select from net.http_request_queue q
              where q.options ->> 'ordering_key' = k.ordering_key and (k.key_owner = '' or q.requested_by = k.key_owner))
          and not exists (
              select from net._held_requests h
              where h.options ->> 'ordering_key' = k.ordering_key and (k.key_owner = '' or h.requested_by = k.key_owner));
    end if;
    for line in
        select k.key_owner, k.ordering_key from net._ordering_keys k
        where k.state = 'idle'
        order by k.key_owner, k.ordering_key
        limit max_keys
        for update skip locked
    loop
        -- A fresh snapshot (a new statement): every request that joined before our lock is seen.
        with moved as (
            delete from net._ordered_requests o
            where o.id = (select n.id from net._ordered_requests n
                          where n.key_owner = line.key_owner and n.ordering_key = line.ordering_key
                          order by n.line_position, n.id limit 1)
            returning o.id, o.method, o.url, o.headers, o.body, o.timeout_milliseconds, o.options, o.requested_by,
                      o.created_at
        )
        insert into net.http_request_queue (id, method, url, headers, body, timeout_milliseconds, options,
                                            requested_by, created_at)
        select id, method, url, headers, body, timeout_milliseconds, options, requested_by, created_at from moved
        returning id into next_id;
        if next_id is null then
            delete from net._ordering_keys k where k.key_owner = line.key_owner and k.ordering_key = line.ordering_key;
        else
            update net._ordering_keys k set state = 'open', changed_at = clock_timestamp()
            where k.key_owner = line.key_owner and k.ordering_key = line.ordering_key;
            released := released + 1;
        end if;
    end loop;
    return array[released, (select count(*) from net._ordering_keys k where k.state = 'idle')::int];
end
$$;

-- ==== Circuits ================================================================================

create table if not exists net._destination_circuits(
    -- As net._url_host gives it.
    host text primary key,
    -- closed: failures are being counted; open: requests are held until retry_at; half_open: one
    -- probe (probe_id) is in flight, and its outcome closes or reopens the circuit.
    state text not null default 'closed' check (state in ('closed', 'open', 'half_open')),
    -- Consecutive failures (closed: counted from first_failure_at, within the window).
    failures int not null default 0,
    first_failure_at timestamptz,
    last_failure_at timestamptz,
    -- Opened this many times since it last closed: each cool-down doubles the one before.
    opens int not null default 0,
    opened_at timestamptz,
    retry_at timestamptz,
    probe_id bigint,
    -- A probe whose worker died (its lease expired) is replaced then.
    probe_expires_at timestamptz
);

-- Requests to a host whose circuit is open or half-open: the queue's columns as they were
-- (attempts, not_before, retries and the timeout are theirs again when they go back).
create table if not exists net._held_requests(
    id bigint primary key,
    host text not null,
    method text not null,
    url text not null,
    headers jsonb not null,
    body bytea,
    timeout_milliseconds int not null,
    created_at timestamptz not null,
    attempts int not null,
    not_before timestamptz,
    retries int not null,
    options jsonb,
    requested_by name not null,
    held_at timestamptz not null default clock_timestamp()
);
create index if not exists _held_requests_host_idx on net._held_requests (host, id);

-- Move held requests back into the queue: those of closed_hosts (a probe's write-back just closed
-- their circuits), or with NULL those of every host whose circuit is not held any more (deleted
-- by hand, or closed while a claim was setting one aside). Runs as the owner: the worker may not
-- insert into the queue itself. Returns the rows moved.
create or replace function net._circuit_release(closed_hosts text[])
    returns int
    language plpgsql
    volatile
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    moved_count int;
begin
    with moved as (
        delete from net._held_requests h
        where case when closed_hosts is null then h.host <> all(net._circuit_held_hosts())
                   else h.host = any(closed_hosts) end
        returning h.*
    ), back as (
        insert into net.http_request_queue (id, method, url, headers, body, timeout_milliseconds, created_at,
                                            attempts, not_before, retries, options, requested_by)
        select id, method, url, headers, body, timeout_milliseconds, created_at, attempts, not_before, retries,
               options, requested_by
        from moved
        returning 1
    )
    select count(*) into moved_count from back;
    return moved_count;
end
$$;

-- The hosts whose requests a claim must not take now: open or half-open circuits.
create or replace function net._circuit_held_hosts()
    returns text[]
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(c.host), '{}') from net._destination_circuits c where c.state <> 'closed'
$$;

drop function if exists net._claim_circuits(text, int, float8);

-- The probes (sql/queries.sql: claim_probes): for each circuit whose cool-down is over (or whose
-- probe's worker died), its oldest held request, leased to owner and back in the queue; the
-- circuit turns half-open. Returns claim's columns. Runs as the owner (it inserts into the queue).
drop function if exists net._claim_probes(text, float8);
create or replace function net._claim_probes(owner text, grace_s float8)
    returns table(id bigint, method text, url text, headers text, body bytea, timeout_milliseconds int,
                  attempts int, created_epoch float8, retries int, options text, tableoid oid)
    language plpgsql
    volatile
    security definer
    set search_path = pg_catalog, pg_temp
as $$
declare
    circuit record;
    chosen_id bigint;
    probe_timeout_ms int;
    probe_ids bigint[] := '{}';
begin
    for circuit in
        select c.host from net._destination_circuits c
        where (c.state = 'open' and c.retry_at <= clock_timestamp())
           or (c.state = 'half_open' and c.probe_expires_at < clock_timestamp())
        order by c.host
        for update of c skip locked
    loop
        with moved as (
            delete from net._held_requests h
            where h.id = (select o.id from net._held_requests o
                          where o.host = circuit.host and (o.not_before is null or o.not_before <= clock_timestamp())
                          order by o.id limit 1 for update skip locked)
            returning h.*
        )
        insert into net.http_request_queue as q (id, method, url, headers, body, timeout_milliseconds, created_at,
                                                 attempts, not_before, retries, options, requested_by, lease_owner,
                                                 lease_expires_at)
        select m.id, m.method, m.url, m.headers, m.body, m.timeout_milliseconds, m.created_at, m.attempts + 1,
               m.not_before, m.retries, m.options, m.requested_by, owner,
               clock_timestamp() + make_interval(secs => m.timeout_milliseconds / 1000.0 + grace_s)
        from moved m
        returning q.id, q.timeout_milliseconds into chosen_id, probe_timeout_ms;
        if chosen_id is null then
            -- None held yet (a claim has not met one since the circuit opened): one in the queue.
            update net.http_request_queue q
            set lease_owner = owner, attempts = q.attempts + 1,
                lease_expires_at = clock_timestamp() + make_interval(secs => q.timeout_milliseconds / 1000.0 + grace_s)
            where q.id = (select o.id from net.http_request_queue o
                          where (o.lease_expires_at is null or o.lease_expires_at < clock_timestamp())
                            and (o.not_before is null or o.not_before <= clock_timestamp())
                            and net._url_host(o.url) = circuit.host
                          order by o.id limit 1 for update skip locked)
            returning q.id, q.timeout_milliseconds into chosen_id, probe_timeout_ms;
        end if;
        -- Nothing to probe with: the circuit stays open and the next request to it is the probe.
        continue when chosen_id is null;
        update net._destination_circuits c
        set state = 'half_open', probe_id = chosen_id,
            probe_expires_at = clock_timestamp() + make_interval(secs => probe_timeout_ms / 1000.0 + grace_s)
        where c.host = circuit.host;
        probe_ids := probe_ids || chosen_id;
        chosen_id := null;
    end loop;
    return query
    select q.id, q.method::text, q.url, q.headers::text, q.body, q.timeout_milliseconds, q.attempts,
           extract(epoch from q.created_at)::float8, q.retries, q.options::text, q.tableoid
    from net.http_request_queue q
    where q.id = any(probe_ids);
end
$$;

-- Tell the workers when a host starts failing, a circuit opens, half-opens or closes: they read
-- the state again. Row triggers: a write-back touches this table only for failures and probes,
-- and PostgreSQL sends one NOTIFY per transaction.
create or replace function net._announce_circuits()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform pg_notify('pgnet_curl_control', 'circuits');
    return null;
end
$$;

drop trigger if exists announce on net._destination_circuits;
create trigger announce after insert or delete on net._destination_circuits
    for each row execute function net._announce_circuits();
drop trigger if exists announce_state on net._destination_circuits;
create trigger announce_state after update on net._destination_circuits
    for each row when (old.state is distinct from new.state) execute function net._announce_circuits();
drop trigger if exists announce_truncate on net._destination_circuits;
create trigger announce_truncate after truncate on net._destination_circuits
    for each statement execute function net._announce_circuits();

-- ==== Views ===================================================================================

-- Each key with requests in line (or halted): its head, the head's state, and how many wait.
-- state: queued (in the queue, not yet claimed), sending, retrying (waiting for its next
-- attempt), held (its host's circuit is open), waiting (the head is done; a worker is letting the
-- next one in), halted (dead-lettered under --ordering-on-failure halt: see net.failed_requests,
-- replay it with net.retry_request(head_id)).
create or replace view net.ordering_keys as
with heads as (
    select q.options ->> 'ordering_key' as ordering_key, q.requested_by, q.id, false as held, q.lease_expires_at,
           q.not_before, q.retries, q.attempts
    from net.http_request_queue q
    where q.options ? 'ordering_key'
    union all
    select h.options ->> 'ordering_key', h.requested_by, h.id, true, null, h.not_before, h.retries, h.attempts
    from net._held_requests h
    where h.options ? 'ordering_key'
), waiting as (
    select o.key_owner, o.ordering_key, count(*) as held, min(o.id) as next_id
    from net._ordered_requests o
    group by o.key_owner, o.ordering_key
)
select k.ordering_key, nullif(k.key_owner, '')::name as key_owner,
       case when k.state = 'halted' then 'halted'
            when h.id is null then 'waiting'
            when h.held then 'held'
            when h.lease_expires_at > clock_timestamp() then 'sending'
            when h.not_before > clock_timestamp() then 'retrying'
            else 'queued' end as state,
       coalesce(h.id, k.halted_id) as head_id,
       h.attempts as head_attempts, h.retries as head_retries,
       case when h.not_before > clock_timestamp() then h.not_before end as head_retry_at,
       coalesce(w.held, 0) as requests_waiting, w.next_id,
       k.changed_at as state_since
from net._ordering_keys k
left join heads h on h.ordering_key = k.ordering_key and (k.key_owner = '' or h.requested_by = k.key_owner)
left join waiting w on w.key_owner = k.key_owner and w.ordering_key = k.ordering_key
-- The view reads the tables as its owner: in private mode show each role its own keys only.
where k.key_owner = '' or k.key_owner = current_user
   or pg_has_role(current_user, (select relowner from pg_class where oid = 'net._ordering_keys'::regclass), 'member');

-- Each destination host the circuit breaker knows: failures being counted (closed), open (held
-- until probe_at), or half-open (its probe in flight).
create or replace view net.destination_status as
select c.host, c.state, c.failures, c.first_failure_at, c.last_failure_at, c.opens, c.opened_at,
       case when c.state = 'open' then c.retry_at end as probe_at,
       case when c.state = 'half_open' then c.probe_id end as probe_id,
       (select count(*) from net._held_requests h where h.host = c.host) as requests_held
from net._destination_circuits c;

insert into net._schema_migrations(version) values (12) on conflict do nothing;
