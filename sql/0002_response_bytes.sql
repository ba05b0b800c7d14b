-- pgnet-curl schema, version 2: keep bodies that are not text whole.
--
-- content holds the body as text when it decodes cleanly (declared charset, else UTF-8) and
-- holds no NUL byte; otherwise content is NULL and content_bytes holds the exact bytes.
alter table net._http_response add column if not exists content_bytes bytea;

comment on column net._http_response.content_bytes is
    'The body''s exact bytes when it is not text (NUL bytes, or invalid in its charset); content is NULL then.';

insert into net._schema_migrations(version) values (2) on conflict do nothing;
