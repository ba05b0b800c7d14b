"""Operations: /metrics moves with real traffic, /healthz follows the database, status tells."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from helpers import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from /metrics."""
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    """The sum of name's samples whose labels include these (as PromQL's sum() would)."""
    wanted = set(labels.items())
    return sum(v for (sample_name, sample_labels), v in samples.items()
               if sample_name == name and wanted <= set(sample_labels))


def test_metrics_follow_real_traffic(db, db_dsn, serve, http_server):
    port = free_port()
    serve(db_dsn, "--metrics-port", str(port), "--metrics-host", "127.0.0.1", workers=2)
    db.execute("select net.http_get(%s) from generate_series(1, 50)", (http_server.url_for("/echo"),))
    db.execute("select net.http_post(%s) from generate_series(1, 5)", (http_server.url_for("/status/503"),))
    db.execute("select net.http_get(%s) from generate_series(1, 4)", (http_server.url_for("/status/404"),))
    db.execute("select net.http_get('http://127.0.0.1:1/') from generate_series(1, 3)")
    wait_until(lambda: db.execute("select count(*) from net._http_response").fetchone()[0] == 62,
               message="62 responses")
    stored = db.execute("select coalesce(status_code::text, error_msg), count(*) from net._http_response "
                        "group by 1 order by 1").fetchall()
    assert stored == [("200", 50), ("404", 4), ("503", 5), ("Couldn't connect to server", 3)]

    def all_counted():
        samples = scrape(port)
        counted = sum(v for (name, _), v in samples.items() if name == "pgnet_curl_requests_total")
        return samples if counted == 62 and value(samples, "pgnet_curl_end_to_end_seconds_count") == 62 else None

    samples = wait_until(all_counted, message="metrics of 62 finished and written responses")
    assert value(samples, "pgnet_curl_requests_total", method="GET", outcome="success") == 50
    assert value(samples, "pgnet_curl_requests_total", method="POST", outcome="http_5xx") == 5
    assert value(samples, "pgnet_curl_requests_total", method="GET", outcome="http_4xx") == 4
    assert value(samples, "pgnet_curl_requests_total", method="GET", outcome="error") == 3
    assert value(samples, "pgnet_curl_http_duration_seconds_count") == 62
    assert value(samples, "pgnet_curl_queue_wait_seconds_count") == 62
    assert value(samples, "pgnet_curl_write_batch_size_sum") == 62
    assert value(samples, "pgnet_curl_inflight_requests") == 0
    assert value(samples, "pgnet_curl_workers_alive") == 2
    assert value(samples, "pgnet_curl_worker_db_connected") == 2
    assert not any("127.0.0.1" in str(labels) for _, labels in samples), "no URL in any label"
    # Every sample names its database.
    assert value(samples, "pgnet_curl_requests_total", database=db.info.dbname) == 62


def test_queue_depth_is_sampled(db, db_dsn, serve, http_server):
    port = free_port()
    serve(db_dsn, "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    db.execute("select net.http_get(%s, timeout_milliseconds => 10000) from generate_series(1, 3)",
               (http_server.url_for("/delay/3000"),))
    samples = wait_until(lambda: (s := scrape(port)) and value(s, "pgnet_curl_queue_depth") == 3 and s,
                         message="a queue depth sample of 3")
    assert value(samples, "pgnet_curl_queue_oldest_pending_seconds") > 0


def test_healthz_flips_when_the_database_goes_away(db, db_dsn, serve):
    port = free_port()
    serve(db_dsn, "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    health = f"http://127.0.0.1:{port}/healthz"
    wait_until(lambda: get(health)[0] == 200, message="healthy")
    dbname = db.info.dbname
    with psycopg.connect(db_dsn.replace(f"dbname={dbname}", "dbname=postgres"), autocommit=True) as admin:
        admin.execute(f'alter database "{dbname}" allow_connections false')
        try:
            admin.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                          "where datname = %s and application_name like 'pgnet-curl worker%%'", (dbname,))
            status, body = wait_until(lambda: (r := get(health)) and r[0] == 503 and r, message="unhealthy")
            assert json.loads(body)["reason"] == "0 of 1 workers connected to the database"
        finally:
            admin.execute(f'alter database "{dbname}" allow_connections true')
    wait_until(lambda: get(health)[0] == 200, timeout_s=20, message="healthy again")


def test_healthz_names_each_databases_durability(db, db_dsn, serve):
    port = free_port()
    process = serve(db_dsn, "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    status, body = wait_until(lambda: (r := get(f"http://127.0.0.1:{port}/healthz")) and r[0] == 200 and r,
                              message="healthy")
    assert json.loads(body)["durability"] == {db.info.dbname: "durable"}
    assert f"database {db.info.dbname} is durable: logged tables" in process.log


def run_status(dsn: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgnet_curl", "status", "--dsn", dsn, *args],
                          capture_output=True, text=True, timeout=60)


def test_status_reports_known_state(db, db_dsn, serve, http_server):
    db.execute("select net.http_get(%s) from generate_series(1, 4)", (http_server.url_for("/echo"),))
    db.execute("insert into net._http_response(id, status_code) values (1001, 200), (1002, 503)")
    db.execute("insert into net._http_response(id, timed_out) values (1003, true)")
    db.execute("update net.http_request_queue set created_at = now() - interval '30 seconds'")

    result = run_status(db_dsn, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["queue"]["waiting"] == 4 and report["queue"]["in_flight"] == 0
    assert report["queue"]["oldest_pending_s"] >= 30
    assert report["responses"] == {"minutes": 5, "success": 1, "http_4xx": 0, "http_5xx": 1, "timeout": 1, "error": 0}
    assert report["workers"] == []
    assert report["verdict"] == "DOWN: no worker connected; 4 requests waiting"
    assert report["settings"]["pg_net.batch_size"] == "200 (default)"

    serve(db_dsn)
    wait_until(lambda: db.execute("select count(*) from net.http_request_queue").fetchone()[0] == 0,
               message="queue drained")
    text = run_status(db_dsn).stdout
    assert text.startswith("OK: 1 workers connected, 0 requests pending")
    assert "pgnet-curl worker 1 from 127.0.0.1" in text
    assert "success 5" in text


def test_json_logs(db_dsn, serve):
    process = serve(db_dsn, env={"PGNET_LOG_FORMAT": "json"})
    wait_until(lambda: "worker 1 started" in process.log, message="start line")
    lines = [json.loads(line) for line in process.log.splitlines() if line.strip()]
    assert any(entry["message"].startswith("worker 1 started") and entry["level"] == "info" for entry in lines)
