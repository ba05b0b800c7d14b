-- pgnet-curl schema, version 8: per-destination limits.
--
-- net.destination_limits caps, per destination host, the requests in flight and the requests
-- sent per second (a token bucket, and a log of the last second's claims), across every worker of every `serve` of this database: the
-- database is the only state they share. A pattern is a host (`api.example.com`, `127.0.0.1`,
-- `::1`), a domain's subdomains (`*.example.com`, not example.com itself) or `*` (every host);
-- when several match a host, the most specific wins: an exact host, then the longest `*.`
-- suffix, then `*`. Each host matching a pattern gets the pattern's limits for itself.
--
-- The worker claims with net._claim_limited() while the table has rows, and with the plain
-- claim (sql/queries.sql) when it is empty. Rows a limit holds back stay in the queue unleased:
-- they take no worker slot and no connection, and other hosts' rows are claimed past them.

-- The destination host of a URL: lower case, no userinfo, port, brackets or trailing dot. The
-- request functions check the URL's form. Computed where limits are checked (net._claim_limited)
-- and replays are chosen (net.retry_requests), not at every insert: a plain request pays
-- nothing for it. No SET clause (it would cost a GUC save and restore per call): every name is
-- qualified.
create or replace function net._url_host(url text)
    returns text
    language plpgsql
    immutable
    parallel safe
as $$
declare
    authority text := pg_catalog.split_part(pg_catalog.split_part(pg_catalog.split_part(
        pg_catalog.split_part(url, '://', 2), '/', 1), '?', 1), '#', 1);
    host_port text := pg_catalog.reverse(pg_catalog.split_part(pg_catalog.reverse(authority), '@', 1));
begin
    if pg_catalog.left(host_port, 1) operator(pg_catalog.=) '[' then
        return pg_catalog.rtrim(pg_catalog.lower(pg_catalog.split_part(pg_catalog.substr(host_port, 2), ']', 1)), '.');
    end if;
    return pg_catalog.rtrim(pg_catalog.lower(pg_catalog.split_part(host_port, ':', 1)), '.');
end
$$;

create table if not exists net.destination_limits(
    host_pattern text primary key,
    max_concurrent int check (max_concurrent >= 1),
    max_per_second numeric check (max_per_second > 0),
    -- Tokens the bucket holds at most; NULL: max(1, max_per_second / 10), a tenth of a second.
    burst numeric check (burst >= 1),
    -- 'sql', or 'serve' for rows that `serve --destination-limit` wrote.
    source text not null default 'sql',
    updated_at timestamptz not null default clock_timestamp(),
    check (num_nonnulls(max_concurrent, max_per_second) > 0)
);
comment on table net.destination_limits is
    'Per destination host: at most max_concurrent requests in flight and max_per_second sent (pgnet-curl).';

-- One token bucket per limited host that has been claimed from, and the times (epoch seconds)
-- of its requests claimed in the last 1.05 s: no 1 s window ever holds more than the rate
-- (rounded up), whatever the bucket allows; the extra 50 ms absorb the jitter between claim
-- and send (10 ms measured 8 windows of 20,000 over the rate at the receiver). Kept for rates up to 1000/s (an array element per
-- request); above, the bucket alone limits (any 1 s window: at most rate + burst).
create table if not exists net._destination_buckets(
    host text primary key,
    host_pattern text not null references net.destination_limits on update cascade on delete cascade,
    tokens float8 not null,
    refilled_at timestamptz not null,
    sent_at float8[] not null default '{}',
    -- The worker that last took tokens, and when: it alone schedules the host's next claim
    -- (one claim per refill, not one per worker), unless it has not come back for a second.
    taken_by text,
    taken_at timestamptz
);
alter table net._destination_buckets
    add column if not exists sent_at float8[] not null default '{}',
    add column if not exists taken_by text,
    add column if not exists taken_at timestamptz;

-- The requests in flight to hosts with a concurrency limit: written by the claim, removed
-- by write-back and release; a row whose lease expired no longer counts (its worker died).
create table if not exists net._destination_leases(
    id bigint primary key,
    host text not null,
    owner text not null,
    expires_at timestamptz not null
);
create index if not exists _destination_leases_host_idx on net._destination_leases (host);

-- Check and normalise a pattern (lower case, no brackets or trailing dot), with a clear error.
create or replace function net._check_destination_limit()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    new.host_pattern := btrim(rtrim(lower(btrim(new.host_pattern)), '.'), '[]');
    if new.host_pattern is null or new.host_pattern !~ '^(\*|(\*\.)?[^*/?#@\s:]+|[0-9a-f:.]*:[0-9a-f:.]*)$' then
        raise exception 'host_pattern must be a host (api.example.com, 127.0.0.1, ::1), *.domain or *, got %',
            coalesce(quote_literal(new.host_pattern), 'NULL')
            using errcode = 'invalid_parameter_value';
    end if;
    new.updated_at := clock_timestamp();
    return new;
end
$$;

drop trigger if exists check_pattern on net.destination_limits;
create trigger check_pattern before insert or update on net.destination_limits
    for each row execute function net._check_destination_limit();

-- Tell the workers the limits changed: they switch between the plain and the limited claim.
create or replace function net._announce_destination_limits()
    returns trigger
    language plpgsql
    set search_path = pg_catalog, pg_temp
as $$
begin
    perform pg_notify('pgnet_curl_control', 'destination_limits');
    return null;
end
$$;

drop trigger if exists announce on net.destination_limits;
create trigger announce after insert or update or delete or truncate on net.destination_limits
    for each statement execute function net._announce_destination_limits();

-- The limit of every host in hosts that has one: the most specific matching pattern.
create or replace function net._destination_limits_for(hosts text[])
    returns table(host text, host_pattern text, max_concurrent int, max_per_second float8, burst float8)
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select distinct on (h.host) h.host, l.host_pattern, l.max_concurrent, l.max_per_second::float8,
           coalesce(l.burst, greatest(1, l.max_per_second / 10))::float8
    from unnest(hosts) as h(host)
    join net.destination_limits l
      on l.host_pattern = h.host
      or l.host_pattern = '*'
      or (left(l.host_pattern, 2) = '*.' and right(h.host, length(l.host_pattern) - 1) = substr(l.host_pattern, 2))
    order by h.host, l.host_pattern <> '*' desc, left(l.host_pattern, 2) <> '*.' desc, length(l.host_pattern) desc
$$;

-- Choose up to max_rows claimable requests, oldest first, that the limits let through now, and
-- take their tokens and concurrency; return their ids (the claim statement leases them).
-- A bucket another claim holds is skipped, not waited for (nor deadlocked on). Rows a limit
-- holds back are not leased; up to three rounds look past them for other hosts' rows.
-- overdue_only: the safety poll's claim, of expired leases and due retries only (sql/0011):
-- a row nobody has claimed yet waits for a wake, as in pg_net. Version 11 added the argument.
drop function if exists net._claim_limited(text, int, float8);
create or replace function net._claim_limited(owner text, max_rows int, grace_s float8, overdue_only bool default false)
    returns bigint[]
    language plpgsql
    volatile
    set search_path = pg_catalog, pg_temp
as $$
declare
    now_ts timestamptz := clock_timestamp();
    held text[];
    -- Hosts held back for want of tokens: the claim to try next is when they have some.
    rate_held text[];
    -- Hosts with a concurrency limit: their claimed requests get a row in _destination_leases.
    counted text[];
    due_s float8;
    taken bigint[] := '{}';
    after_id bigint := 0;
    round int;
    candidate_ids bigint[];
    candidate_hosts text[];
    lim record;
    bucket record;
    allowance int;
    inflight int;
    wanted int;
    allowed jsonb;
    more bool;
    rate_allowance int;
    window_n int;
    now_epoch float8;
    recent float8[];
    -- LIKE patterns a URL must match for its host to match a limit's pattern (a cheap test
    -- before the host is computed), unless some limit is `*`, which matches every host.
    url_frags text[];
    any_star bool;
    circuit_held text[];
begin
    select coalesce(bool_or(l.host_pattern = '*'), false),
           coalesce(array_agg('%' || replace(replace(replace(ltrim(l.host_pattern, '*'), '\', '\\'), '%', '\%'), '_', '\_')
                              || '%'), '{}')
    into any_star, url_frags
    from net.destination_limits l;
    -- Hosts out of tokens or of concurrency now: their rows are not even locked.
    select coalesce(array_agg(h.host) filter (where h.no_tokens or h.full), '{}'),
           coalesce(array_agg(h.host) filter (where h.no_tokens), '{}')
    into held, rate_held
    from (
        select b.host,
               coalesce(b.tokens + l.max_per_second * extract(epoch from now_ts - b.refilled_at) < 1
                        or (l.max_per_second <= 1000 and (select count(*) from unnest(b.sent_at) x
                            where x > extract(epoch from now_ts) - 1.05) >= ceil(l.max_per_second)), false) as no_tokens,
               coalesce((select count(*) from net._destination_leases d
                         where d.host = b.host and d.expires_at > now_ts) >= l.max_concurrent, false) as full
        from net._destination_buckets b
        join net.destination_limits l on l.host_pattern = b.host_pattern
    ) h;
    -- Hosts whose circuit is open or half-open (sql/0012_ordering_and_circuits.sql) wait too:
    -- their requests' hosts are computed, as a limited host's are.
    circuit_held := net._circuit_held_hosts();
    held := held || circuit_held;
    url_frags := url_frags || array(select '%' || replace(replace(replace(h, '\', '\\'), '%', '\%'), '_', '\_') || '%'
                                    from unnest(circuit_held) as h);
    for round in 1..3 loop
        select coalesce(array_agg(c.id order by c.id), '{}'), coalesce(array_agg(coalesce(c.host, '') order by c.id), '{}')
        into candidate_ids, candidate_hosts
        from (
            -- '' for a request whose URL cannot name a limited host: it goes as if unlimited.
            select q.id, case when any_star or lower(q.url) like any(url_frags)
                              then coalesce(net._url_host(q.url), '') else '' end as host
            from net.http_request_queue q
            where (q.lease_expires_at is null or q.lease_expires_at < now_ts)
              and (q.not_before is null or q.not_before <= now_ts)
              and (not overdue_only or q.lease_expires_at is not null or q.not_before is not null)
              and q.id > after_id
              and (cardinality(held) = 0
                   or case when any_star or lower(q.url) like any(url_frags)
                           then coalesce(net._url_host(q.url), '') else '' end <> all(held))
            order by q.id
            limit max_rows - cardinality(taken)
            for update skip locked
        ) c;
        exit when cardinality(candidate_ids) = 0;
        after_id := candidate_ids[cardinality(candidate_ids)];
        if '' = all(candidate_hosts) then
            -- No candidate's host has a limit: all of them go, as the plain claim would take them.
            taken := taken || candidate_ids;
            exit;
        end if;
        allowed := '{}';
        counted := '{}';
        more := false;
        for lim in select * from net._destination_limits_for(array(select distinct unnest(candidate_hosts))) loop
            wanted := (select count(*) from unnest(candidate_hosts) h where h = lim.host);
            insert into net._destination_buckets as b (host, host_pattern, tokens, refilled_at)
            values (lim.host, lim.host_pattern, lim.burst, now_ts)
            on conflict (host) do nothing;
            -- Another claim holding this bucket takes its tokens: skip the host instead of
            -- waiting (and of deadlocking on buckets locked in another order).
            select * into bucket from net._destination_buckets b where b.host = lim.host for update skip locked;
            if not found then
                held := held || lim.host;
                more := true;
                allowed := allowed || jsonb_build_object(lim.host, 0);
                continue;
            end if;
            allowance := wanted;
            rate_allowance := wanted;
            recent := null;
            if lim.max_per_second is not null then
                now_epoch := extract(epoch from clock_timestamp());
                bucket.tokens := least(lim.burst, bucket.tokens
                    + lim.max_per_second * greatest(0, now_epoch - extract(epoch from bucket.refilled_at)));
                rate_allowance := least(rate_allowance, floor(bucket.tokens)::int);
                if lim.max_per_second <= 1000 then
                    window_n := ceil(lim.max_per_second)::int;
                    recent := array(select x from unnest(bucket.sent_at) x where x > now_epoch - 1.05 order by x);
                    rate_allowance := least(rate_allowance, window_n - cardinality(recent));
                end if;
                allowance := greatest(0, rate_allowance);
            end if;
            if lim.max_concurrent is not null then
                counted := counted || lim.host;
                delete from net._destination_leases d where d.host = lim.host and d.expires_at <= now_ts;
                select count(*) into inflight from net._destination_leases d where d.host = lim.host;
                allowance := least(allowance, greatest(0, lim.max_concurrent - inflight));
            end if;
            allowance := greatest(allowance, 0);
            if rate_allowance < wanted and allowance = greatest(0, rate_allowance) then
                rate_held := rate_held || lim.host;
            end if;
            update net._destination_buckets b
            set tokens = bucket.tokens - case when lim.max_per_second is null then 0 else allowance end,
                refilled_at = case when lim.max_per_second is null then b.refilled_at else to_timestamp(now_epoch) end,
                taken_by = case when allowance > 0 then _claim_limited.owner else b.taken_by end,
                taken_at = case when allowance > 0 then clock_timestamp() else b.taken_at end,
                sent_at = case when recent is null then '{}' else recent || array_fill(now_epoch, array[allowance]) end,
                host_pattern = lim.host_pattern
            where b.host = lim.host;
            allowed := allowed || jsonb_build_object(lim.host, allowance);
            if allowance < wanted then
                held := held || lim.host;
                more := true;
            end if;
        end loop;
        -- Every row of an unlimited host, and the first `allowance` rows of each limited one.
        with chosen as (
            select c.id, c.host
            from (
                select u.id, u.host, row_number() over (partition by u.host order by u.id) as nth
                from unnest(candidate_ids, candidate_hosts) as u(id, host)
            ) c
            where not (allowed ? c.host) or c.nth <= (allowed ->> c.host)::int
        ), leased as (
            insert into net._destination_leases as d (id, host, owner, expires_at)
            select c.id, c.host, _claim_limited.owner,
                   now_ts + make_interval(secs => q.timeout_milliseconds / 1000.0 + grace_s)
            from chosen c join net.http_request_queue q on q.id = c.id
            where c.host = any(counted)
            on conflict (id) do update set owner = excluded.owner, expires_at = excluded.expires_at
        )
        select taken || coalesce(array_agg(c.id), '{}') into taken from chosen c;
        exit when not more or cardinality(taken) >= max_rows;
    end loop;
    -- For net._destination_limits_due_s(), read by the worker right after this statement: when
    -- the first held host has half its bucket back and room for as many in its last second.
    now_epoch := extract(epoch from clock_timestamp());
    select min(greatest(0.001,
                        (t.target - (b.tokens + t.rate * (now_epoch - extract(epoch from b.refilled_at)))) / t.rate,
                        case when t.rate <= 1000 and w.leave > 0 then w.recent[w.leave] + 1.05 - now_epoch else 0 end))
    into due_s
    from net._destination_buckets b
    join lateral (select l.max_per_second::float8 as rate,
                         least(greatest(1, coalesce(l.burst, l.max_per_second / 10) / 2),
                               coalesce(l.burst, greatest(1, l.max_per_second / 10)))::float8 as target
                  from net.destination_limits l where l.host_pattern = b.host_pattern) t on true
    cross join lateral (select r.recent, cardinality(r.recent) - ceil(t.rate)::int + least(ceil(t.target), ceil(t.rate))::int as leave
                        from (select array(select x from unnest(b.sent_at) x where x > now_epoch - 1.05 order by x) as recent) r) w
    where b.host = any(rate_held) and t.rate is not null
      and (b.taken_by is null or b.taken_by = _claim_limited.owner
           or b.taken_at < clock_timestamp() - make_interval(secs => 1 + t.target / t.rate));
    perform set_config('pgnet_curl.limits_due_s', coalesce(due_s::text, ''), false);
    return taken;
end
$$;

-- Seconds until a host that the session's last net._claim_limited() held back for want of
-- tokens has some (NULL: none): the worker claims again then, not only at the safety poll.
create or replace function net._destination_limits_due_s()
    returns float8
    language sql
    stable
    set search_path = pg_catalog, pg_temp
as $$
    select nullif(current_setting('pgnet_curl.limits_due_s', true), '')::float8
$$;

insert into net._schema_migrations(version) values (8) on conflict do nothing;
