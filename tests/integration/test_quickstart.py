"""The README's first command: `pgnet-curl serve` with no DSN starts an embedded PostgreSQL."""

from __future__ import annotations

import os
import re

import psycopg

from helpers import wait_until
from serve_process import ServeProcess


def test_serve_without_dsn_runs_embedded_postgres_end_to_end(embedded_data_dir, http_server):
    env = {"PGNET_DATA_DIR": str(embedded_data_dir)}
    saved = {name: os.environ.pop(name, None) for name in ("PGNET_DSN", "DATABASE_URL")}
    try:
        process = ServeProcess(None, env=env)
    finally:
        os.environ.update({name: value for name, value in saved.items() if value is not None})
    try:
        def printed():
            if process.proc.poll() is not None:
                raise AssertionError(f"serve exited with {process.proc.returncode}:\n{process.log}")
            return re.search(r"Connect with:\s+psql (\S+)", process.log)

        try:
            found = wait_until(printed, timeout_s=90, message="the printed connection string")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nserve's log:\n{process.log}") from None
        dsn = found.group(1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select net.wait_until_running()")
            request_id = conn.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
            row = wait_until(lambda: conn.execute(
                "select status_code, content_type from net._http_response where id = %s", (request_id,)).fetchone(),
                message="the response row")
        assert row == (200, "application/json")
        with psycopg.connect(dsn) as conn:
            # The workers log in as an unprivileged member of pgnet_worker, not as the superuser.
            assert conn.execute(
                "select distinct a.usename, r.rolsuper from pg_stat_activity a join pg_roles r on r.rolname = a.usename "
                "where a.application_name like 'pgnet-curl worker%'").fetchall() == [("pgnet_curl_worker", False)]
        assert process.stop() == 0
        assert not (embedded_data_dir / "pgdata" / "postmaster.pid").exists(), "the embedded server was stopped"
    finally:
        process.kill()
