-- pgnet-curl schema, version 6: rows inserted straight into the queue wake a worker too.
--
-- pg_net's worker reads the queue on its next pass; ours sleeps until a NOTIFY. One
-- statement-level trigger announces every insert, whoever makes it. The request functions'
-- own NOTIFY is the same (channel, payload), and PostgreSQL delivers it once per transaction.
create or replace function net._wake_workers_after_insert()
    returns trigger
    language plpgsql
as $$
begin
    perform pg_notify('pgnet_curl_wake', '');
    return null;
end
$$;

-- Created once: re-creating it on every install would lock the queue against inserts.
do $$
begin
    if not exists (select 1 from pg_trigger
                   where tgrelid = 'net.http_request_queue'::regclass and tgname = '_wake_workers') then
        create trigger _wake_workers
            after insert on net.http_request_queue
            for each statement
            execute function net._wake_workers_after_insert();
    end if;
end
$$;

insert into net._schema_migrations(version) values (6) on conflict do nothing;
