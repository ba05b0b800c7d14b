-- pgnet-curl schema, version 5: curl's detail of a failed transfer, beside pg_net's text.
--
-- error_msg holds exactly what pg_net stores (libcurl's curl_easy_strerror text, or the
-- timeout message), so `where error_msg = 'Server returned nothing (no headers, no data)'`
-- finds the row; error_detail holds what curl's error buffer said about this transfer.
alter table net._http_response add column if not exists error_detail text;

comment on column net._http_response.error_detail is
    'curl''s own detail of a failed transfer (its error buffer, e.g. "Empty reply from server"); NULL when it adds nothing to error_msg.';

insert into net._schema_migrations(version) values (5) on conflict do nothing;
