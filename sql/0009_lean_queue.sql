-- pgnet-curl schema, version 9: a queue row costs only what a plain request needs.
--
-- Every column of the queue costs every insert (the executor builds a projection of the whole
-- row for each net.http_get), and a generated column costs a function call per row. The
-- delivery options move into one jsonb column (sql/0007_delivery.sql), NULL for a plain
-- request, and the `host` column goes: net._claim_limited and net.retry_requests compute the
-- host where they need it. This file brings installs of versions 7 and 8 to that layout; a new
-- install never has the old columns. (A dropped column still takes a slot in every row until
-- the table is rebuilt: a reinstall, or a dump and restore, reclaims it.)

do $$
declare
    old_columns constant text[] := array['max_retries', 'retry_backoff_ms', 'notify_channel', 'idempotency_key',
                                         'signing_key_id', 'callback', 'replay_of'];
    tbl text;
begin
    foreach tbl in array array['net.http_request_queue', 'net._http_request_archive'] loop
        if exists (select from pg_attribute where attrelid = tbl::regclass and attname = 'max_retries'
                   and not attisdropped) then
            execute format($f$
                update %s set options = nullif(jsonb_strip_nulls(coalesce(options, '{}'::jsonb) || jsonb_build_object(
                    'max_retries', max_retries, 'retry_backoff_ms', retry_backoff_ms,
                    'notify_channel', notify_channel, 'idempotency_key', idempotency_key,
                    'signing_key_id', signing_key_id, 'callback', callback::oid::bigint, 'replay_of', replay_of)), '{}'::jsonb)
                where num_nonnulls(max_retries, retry_backoff_ms, notify_channel, idempotency_key, signing_key_id,
                                   callback, replay_of) > 0$f$, tbl);
            execute format('alter table %s %s', tbl,
                           (select string_agg(format('drop column %I', name), ', ') from unnest(old_columns) name));
        end if;
    end loop;
end
$$;

alter table net.http_request_queue drop column if exists host;

insert into net._schema_migrations(version) values (9) on conflict do nothing;
