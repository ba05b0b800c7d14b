"""The net schema behaves like pg_net 0.20 at call time: signatures, encoding, rules, NOTIFY."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors

from libcurl_url import url_error

# pg_get_function_arguments / pg_get_function_result as pg_net 0.20 prints them.
PG_NET_SIGNATURES = {
    "http_get": ("url text, params jsonb DEFAULT '{}'::jsonb, headers jsonb DEFAULT '{}'::jsonb, "
                 "timeout_milliseconds integer DEFAULT 5000", "bigint"),
    "http_post": ("url text, body jsonb DEFAULT '{}'::jsonb, params jsonb DEFAULT '{}'::jsonb, "
                  "headers jsonb DEFAULT '{\"Content-Type\": \"application/json\"}'::jsonb, "
                  "timeout_milliseconds integer DEFAULT 5000", "bigint"),
    "http_delete": ("url text, params jsonb DEFAULT '{}'::jsonb, headers jsonb DEFAULT '{}'::jsonb, "
                    "timeout_milliseconds integer DEFAULT 5000, body jsonb DEFAULT NULL::jsonb", "bigint"),
    "_http_collect_response": ("request_id bigint, async boolean DEFAULT true", "net.http_response_result"),
    "http_collect_response": ("request_id bigint, async boolean DEFAULT true", "net.http_response_result"),
    "_await_response": ("request_id bigint", "boolean"),
    "wake": ("", "void"),
    "worker_restart": ("", "boolean"),
    "wait_until_running": ("", "void"),
    "check_worker_is_up": ("", "void"),
    "_urlencode_string": ("string character varying", "text"),
    "_encode_url_with_params_array": ("url text, params_array text[]", "text"),
}

PG_NET_COLUMNS = {
    "http_request_queue": [("id", "bigint"), ("method", "http_method"), ("url", "text"),
                           ("headers", "jsonb"), ("body", "bytea"), ("timeout_milliseconds", "integer")],
    "_http_response": [("id", "bigint"), ("status_code", "integer"), ("content_type", "text"),
                       ("headers", "jsonb"), ("content", "text"), ("timed_out", "boolean"),
                       ("error_msg", "text"), ("created", "timestamp with time zone")],
}


def queued(db) -> list[tuple]:
    return db.execute(
        "select id, method, url, headers, body, timeout_milliseconds from net.http_request_queue order by id"
    ).fetchall()


def test_functions_match_pg_net_signatures(db):
    rows = db.execute(
        """select p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid)
           from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'net'"""
    ).fetchall()
    found = {name: (args, result) for name, args, result in rows}
    for name, expected in PG_NET_SIGNATURES.items():
        assert found.get(name) == expected, name


def test_tables_keep_pg_net_columns_and_types(db):
    for table, expected in PG_NET_COLUMNS.items():
        rows = db.execute(
            """select attname, format_type(atttypid, null) from pg_attribute
               where attrelid = %s::regclass and attnum > 0 and not attisdropped order by attnum""",
            (f"net.{table}",),
        ).fetchall()
        assert [(name, typ.replace("net.", "")) for name, typ in rows[: len(expected)]] == expected


def test_response_table_has_the_private_columns_after_pg_nets(db):
    rows = db.execute(
        """select attname, format_type(atttypid, null) from pg_attribute
           where attrelid = 'net._http_response'::regclass and attnum > 0 and not attisdropped order by attnum"""
    ).fetchall()
    assert sorted(rows[len(PG_NET_COLUMNS["_http_response"]):]) == [
        ("attempts", "integer"), ("callback_error", "text"), ("content_bytes", "bytea"), ("error_detail", "text"),
        ("requested_by", "name")]


def test_types_match_pg_net(db):
    labels = db.execute("select enum_range(null::net.request_status)::text").fetchone()[0]
    assert labels == "{PENDING,SUCCESS,ERROR}"
    composite = db.execute(
        "select (200, '{}'::jsonb, 'b')::net.http_response, ('SUCCESS', 'ok', null)::net.http_response_result"
    ).fetchone()
    assert composite is not None


def test_tables_are_logged_by_default(db):
    kinds = db.execute(
        "select relname, relpersistence from pg_class where relnamespace = 'net'::regnamespace "
        "and relname in ('http_request_queue', '_http_response', '_http_request_archive', 'http_request_queue_id_seq')"
    ).fetchall()
    assert dict(kinds) == {"http_request_queue": "p", "_http_response": "p", "_http_request_archive": "p",
                           "http_request_queue_id_seq": "p"}


def test_request_ids_start_at_one_and_defaults_apply(db):
    assert db.execute("select net.http_get('http://127.0.0.1:9/a')").fetchone()[0] == 1
    assert db.execute("select net.http_post('http://127.0.0.1:9/b')").fetchone()[0] == 2
    assert db.execute("select net.http_delete('http://127.0.0.1:9/c')").fetchone()[0] == 3
    assert queued(db) == [
        (1, "GET", "http://127.0.0.1:9/a", {}, None, 5000),
        (2, "POST", "http://127.0.0.1:9/b", {"Content-Type": "application/json"}, b"{}", 5000),
        (3, "DELETE", "http://127.0.0.1:9/c", {}, None, 5000),
    ]


@pytest.mark.parametrize(
    "url, params, expected",
    [
        ("http://h/p", {"b c": "d"}, "http://h/p?b%20c=d"),
        ("http://h/p", {"x": "!"}, "http://h/p?x=%21"),
        ("http://h/p", {"q": "é☃"}, "http://h/p?q=%C3%A9%E2%98%83"),
        ("http://h/p", {"k": "a&b=c?d/e#f+g%"}, "http://h/p?k=a%26b%3Dc%3Fd%2Fe%23f%2Bg%25"),
        ("http://h/p", {"safe": "AZaz09-._~"}, "http://h/p?safe=AZaz09-._~"),
        ("http://h/p?a=1", {"b": "2"}, "http://h/p?a=1&b=2"),
        ("http://h/p?", {"b": "2"}, "http://h/p?b=2"),
        ("http://h/p#frag", {"b": "2"}, "http://h/p?b=2#frag"),
        ("http://h/p?a=1", {}, "http://h/p?a=1"),
    ],
)
def test_params_are_url_encoded_and_appended(db, url, params, expected):
    db.execute("select net.http_get(%s, %s::jsonb)", (url, psycopg.types.json.Jsonb(params)))
    assert queued(db)[-1][2] == expected


def test_two_params_are_joined_with_ampersand(db):
    db.execute("""select net.http_get('http://h/p', '{"a": "1", "b": "x y"}')""")
    url = queued(db)[-1][2]
    assert url in ("http://h/p?a=1&b=x%20y", "http://h/p?b=x%20y&a=1")


def test_urlencode_string_matches_curl_escape(db):
    rows = db.execute(
        "select net._urlencode_string('a b'), net._urlencode_string(''), net._urlencode_string(null), "
        "net._encode_url_with_params_array('http://h', array['a=1', 'b=2'])"
    ).fetchone()
    assert rows == ("a%20b", "", None, "http://h?a=1&b=2")


def test_post_adds_json_content_type_when_missing(db):
    db.execute("""select net.http_post('http://h/p', '{"k": [1, "é"]}', headers => '{"X-A": "1"}')""")
    _, method, _, headers, body, _ = queued(db)[-1]
    assert method == "POST"
    assert headers == {"X-A": "1", "Content-Type": "application/json"}
    assert body == '{"k": [1, "é"]}'.encode("utf-8")


def test_post_accepts_explicit_json_content_type_in_any_header_case(db):
    db.execute("""select net.http_post('http://h/p', '{}', headers => '{"content-type": "application/json"}')""")
    assert queued(db)[-1][3] == {"content-type": "application/json"}


def test_post_rejects_other_content_types(db):
    with pytest.raises(errors.InvalidParameterValue, match='Content-Type header must be "application/json"'):
        db.execute("""select net.http_post('http://h/p', '{}', headers => '{"Content-Type": "text/plain"}')""")
    assert queued(db) == []


def test_delete_stores_optional_body(db):
    db.execute("""select net.http_delete('http://h/p', body => '{"id": 7}')""")
    assert queued(db)[-1][4] == b'{"id": 7}'


PORT_TEXT = "Port number was not a decimal number between 0 and 65535"

# Bad URLs and the curl_url_strerror text pg_net puts after `invalid URL "<url>": `.
URL_TEXTS = [
    ("localhost:6666", "Unsupported URL scheme"),  # pg_net's own test: "localhost" is the scheme
    ("/malformed_url", "Bad scheme"),
    ("not a url", "Bad scheme"),
    ("127.0.0.1/no-scheme", "Bad scheme"),
    (" http://127.0.0.1/", "Bad scheme"),
    ("", "Malformed input to a URL function"),
    ("http:x", "Unsupported number of slashes following scheme"),
    ("http:////x", "Unsupported number of slashes following scheme"),
    ("http://", "No host present"),
    ("http://:8080/", "No host present"),
    ("http://user@/", "No host present"),
    ("http://exa mple.com/", "Bad hostname"),
    ("http://ex%20ample/", "Bad hostname"),
    ("http://./", "Bad hostname"),
    ("http://a<b/", "Bad hostname"),
    ("http://127.0.0.1:99999/", PORT_TEXT),
    ("http://127.0.0.1:abc/", PORT_TEXT),
    ("http://127.0.0.1:80:80/", PORT_TEXT),
    ("http://127.0.0.1:8\\/", "Found a backslash where a forward slash was expected"),
    ("http://[::1/", "Bad IPv6 address"),
    ("http://[1::2::3]/", "Bad IPv6 address"),
    ("http://[::1]x/", PORT_TEXT),
    ("http://u v@127.0.0.1/", "Bad user"),
    ("http://u:p q@127.0.0.1/", "Bad password"),
    ("http://127.0.0.1/a b", "Bad path"),
    ("http://127.0.0.1/a\tb", "Bad path"),
    ("http://127.0.0.1/?a=b c", "Bad query"),
    ("http://127.0.0.1/#a b", "Bad fragment"),
    # libcurl's parser takes these (the transfer would fail); only http and https are sent.
    ("ftp://127.0.0.1/file", "Unsupported URL scheme"),
    ("file:///etc/passwd", "Unsupported URL scheme"),
    ("ws://127.0.0.1/", "Unsupported URL scheme"),
]


@pytest.mark.parametrize("url, text", URL_TEXTS)
def test_invalid_urls_raise_pg_nets_text_and_queue_nothing(db, url, text):
    with pytest.raises(errors.InvalidParameterValue) as excinfo:
        db.execute("select net.http_get(%s)", (url,))
    assert excinfo.value.diag.message_primary == f'invalid URL "{url}": {text}'
    assert queued(db) == []


@pytest.mark.parametrize("url, text", URL_TEXTS)
def test_url_texts_are_libcurls(url, text):
    """The table is libcurl's: its parser gives the same text (or takes a scheme we refuse)."""
    expected = url_error(url)
    if url.lower().startswith(("http:", "https:")) or expected is not None:
        assert expected == text
    else:
        assert text == "Unsupported URL scheme"


def _url_sweep() -> list[str]:
    """URLs with each character in each part, plus odd shapes: thousands of cases for libcurl to judge."""
    characters = [chr(code) for code in range(1, 128)] + ["é", "\u0085", "ÿ", "中"]
    templates = ["http://x/a{}b", "http://x/?a{}b", "http://x/#a{}b", "http://a{}b/", "http://{}/",
                 "http://u{}v@x/", "http://u:p{}q@x/", "http://x:8{}/", "http://[::1{}]/",
                 "http://[fe80::1%25e{}]/", "https:{}//x/", "HTTP://x{}:80/", "http://%{}1/",
                 "http://%4{}/", "http://x%2{}/", "http{}://x/"]
    urls = [template.format(character) for template in templates for character in characters]
    urls += ["http:/x", "http:///x", "http://x:/", "http://x:000080/", "http://x:65535/", "http://x:65536/",
             "http://x:0/", "http://@x/", "http://:@x/", "http://u:@x/", "http://[::]/", "http://[::1]:/",
             "http://[::ffff:1.2.3.4]/", "http://[1.2.3.4]/", "http://[1:2]/", "http://[]/", "http://[::1]]/",
             "http://[1:2:3:4:5:6:7:8]/", "http://[1:2:3:4:5:6:7:8:9]/", "http://[fe80::1%25]/",
             "http://[fe80::1%eth0]/", "http://[::1]@x/", "http://x@[::1]/", "http://%c3%a9/", "http://%2e%2e/",
             "http://a%2e/", "http://%25/", "http://x./", "http://.x/", "http://.../", "http://-/",
             "http://1.2.3.4.5/", "http://x/%zz", "http://x?a/b", "http://x#a?b", "http://x/\\",
             "http://x:\\8/", "http://x:8 \\/", "http://a b:99999/", "http://:99999/", "http://u v@",
             "http://[zz]:99999/", "http://u:p q@:99999/", "http://x:99999999999999999999/"]
    return urls


def test_check_url_agrees_with_libcurl_on_a_sweep(db):
    db.execute("""
        create function pg_temp.url_problem(url text) returns text language plpgsql as $$
        begin
            perform net._check_url(url);
            return null;
        exception when invalid_parameter_value then
            return sqlerrm;
        end
        $$""")
    urls = _url_sweep()
    ours = dict(db.execute("select u, pg_temp.url_problem(u) from unnest(%s::text[]) u", (urls,)).fetchall())
    disagreements = []
    for url in urls:
        text = url_error(url)
        if text is None and not url.lower().startswith(("http:", "https:")):
            text = "Unsupported URL scheme"
        expected = None if text is None else f'invalid URL "{url}": {text}'
        if ours[url] != expected:
            disagreements.append((url, ours[url], expected))
    assert disagreements == [], f"{len(disagreements)} of {len(urls)} differ: {disagreements}"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/", "https://localhost:8443/a/b?c=d#e", "HTTP://127.0.0.1", "http://[::1]:80/x",
     "http://user:pw@127.0.0.1/", "http:/127.0.0.1/", "http://127.0.0.1:/", "http://x_y.-z/", "http://é.example/"],
)
def test_urls_libcurl_takes_are_queued(db, url):
    assert url_error(url) is None
    db.execute("select net.http_get(%s)", (url,))
    assert queued(db)[-1][2] == url


@pytest.mark.parametrize(
    "call",
    ["net.http_get(null)", "net.http_post(null, '{}')", "net.http_delete(null)", "net.http_request('PUT', null)"],
)
def test_null_url_raises_the_queues_not_null_violation(db, call):
    with pytest.raises(errors.NotNullViolation) as excinfo:
        db.execute(f"select {call}")
    assert excinfo.value.diag.message_primary == (
        'null value in column "url" of relation "http_request_queue" violates not-null constraint')
    assert queued(db) == []


@pytest.mark.parametrize(
    "headers, message",
    [
        ('["a"]', "headers must be a JSON object"),
        ('{"X-A": {"nested": 1}}', 'header "X-A" must have a string value'),
        ('{"X-A": null}', 'header "X-A" must have a string value'),
        ('{"Bad Name": "v"}', 'header "Bad Name" has an invalid name'),
        ('{"X-A": "v\\r\\nInjected: 1"}', 'header "X-A" has an invalid name or a line break'),
    ],
)
def test_bad_headers_raise(db, headers, message):
    with pytest.raises(errors.InvalidParameterValue, match=message):
        db.execute("select net.http_get('http://h/', headers => %s::jsonb)", (headers,))
    assert queued(db) == []


def test_number_and_boolean_header_values_become_text(db):
    db.execute("""select net.http_get('http://h/', headers => '{"X-N": 5, "X-B": true}')""")
    assert queued(db)[-1][3] == {"X-N": "5", "X-B": "true"}


@pytest.mark.parametrize("timeout", [0, -1])
def test_non_positive_timeout_raises(db, timeout):
    with pytest.raises(errors.InvalidParameterValue, match="timeout_milliseconds must be a positive"):
        db.execute("select net.http_get('http://h/', timeout_milliseconds => %s)", (timeout,))


def test_any_method_token_is_a_valid_http_method(db):
    db.execute("select 'PATCH'::net.http_method, 'options'::net.http_method")
    with pytest.raises(errors.CheckViolation):
        db.execute("select 'BAD METHOD'::net.http_method")


def listener(dsn: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("listen pgnet_curl_wake")
    return conn


def notifications(conn: psycopg.Connection) -> list:
    """Collect what has arrived, after a round trip that flushes anything already sent."""
    conn.execute("select 1")
    return list(conn.notifies(timeout=0.2, stop_after=100))


def test_one_notify_per_committed_transaction_none_on_rollback(db_dsn):
    with listener(db_dsn) as listen, psycopg.connect(db_dsn) as conn:
        for _ in range(3):
            conn.execute("select net.http_get('http://127.0.0.1:9/')")
        assert notifications(listen) == [], "nothing before commit"
        conn.commit()
        got = notifications(listen)
        assert [n.channel for n in got] == ["pgnet_curl_wake"]

        conn.execute("select net.http_post('http://127.0.0.1:9/')")
        conn.rollback()
        assert notifications(listen) == []

        conn.execute("select net.http_get('http://127.0.0.1:9/')")
        conn.commit()
        assert len(notifications(listen)) == 1

        count = conn.execute("select count(*) from net.http_request_queue").fetchone()[0]
        assert count == 4, "the rolled-back request was not queued"


def test_wake_notifies(db_dsn):
    with listener(db_dsn) as listen, psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("select net.wake()")
        assert len(notifications(listen)) == 1


def test_collect_response_states(db):
    request_id = db.execute("select net.http_get('http://127.0.0.1:9/')").fetchone()[0]
    assert db.execute("select (net._http_collect_response(%s)).*", (request_id,)).fetchone()[:2] == (
        "PENDING", "request is pending processing")
    assert db.execute("select (net._http_collect_response(12345)).*").fetchone()[:2] == (
        "ERROR", "request matching request_id not found")

    db.execute("delete from net.http_request_queue")
    db.execute("""insert into net._http_response(id, status_code, headers, content, timed_out)
                  values (%s, 201, '{"A": "b"}', 'hello', false)""", (request_id,))
    status, message, response = db.execute(
        "select (r).status::text, (r).message, (r).response::text from net._http_collect_response(%s, false) r",
        (request_id,),
    ).fetchone()
    assert (status, message) == ("SUCCESS", "ok")
    assert response == '(201,"{""A"": ""b""}",hello)'

    db.execute("insert into net._http_response(id, timed_out, error_msg) values (99, false, 'Couldn''t connect to server')")
    assert db.execute("select (net._http_collect_response(99)).message").fetchone()[0] == "Couldn't connect to server"


def test_deprecated_collect_response_warns_and_works(db):
    db.execute("insert into net._http_response(id, status_code, content) values (5, 200, 'x')")
    notices = []
    db.add_notice_handler(lambda diag: notices.append(diag.message_primary))
    result = db.execute("select (net.http_collect_response(5)).status::text").fetchone()[0]
    assert result == "SUCCESS"
    assert notices == ["The net.http_collect_response function is deprecated."]


def test_check_worker_is_up_and_wait_until_running(db, db_dsn):
    with pytest.raises(errors.RaiseException, match="the pg_net background worker is not up"):
        db.execute("select net.check_worker_is_up()")
    assert db.execute("select net.worker_restart()").fetchone()[0] is False
    with psycopg.connect(db_dsn, application_name="pgnet-curl worker test"):
        db.execute("set statement_timeout = '5s'")
        db.execute("select net.wait_until_running()")
        db.execute("select net.check_worker_is_up()")
        assert db.execute("select net.worker_restart()").fetchone()[0] is True


def test_worker_restart_sends_control_notify(db_dsn):
    with psycopg.connect(db_dsn, autocommit=True) as listen, psycopg.connect(db_dsn, autocommit=True) as conn:
        listen.execute("listen pgnet_curl_control")
        conn.execute("select net.worker_restart()")
        got = notifications(listen)
        assert [(n.channel, n.payload) for n in got] == [("pgnet_curl_control", "restart")]


def test_await_response_returns_once_row_exists(db):
    db.execute("insert into net._http_response(id, status_code) values (3, 200)")
    assert db.execute("select net._await_response(3)").fetchone()[0] is True


def test_wait_until_running_sees_a_worker_that_connects_later(db, db_dsn):
    import threading

    from helpers import wait_until

    waiter = psycopg.connect(db_dsn, autocommit=True)
    waiter.execute("set statement_timeout = '20s'")
    errors_seen = []
    thread = threading.Thread(target=lambda: _call(waiter, "select net.wait_until_running()", errors_seen))
    thread.start()
    wait_until(lambda: db.execute(
        "select count(*) from pg_stat_activity where query = 'select net.wait_until_running()' "
        "and state = 'active'").fetchone()[0] == 1, message="the waiter to be waiting")
    with psycopg.connect(db_dsn, application_name="pgnet-curl worker 1"):
        thread.join(15)
    waiter.close()
    assert not thread.is_alive() and errors_seen == []


def _call(conn, sql, errors_seen):
    try:
        conn.execute(sql)
    except psycopg.Error as exc:
        errors_seen.append(exc)
