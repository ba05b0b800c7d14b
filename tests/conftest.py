"""Fixtures: a real PostgreSQL (PGNET_TEST_DSN or the embedded one), a fresh database per
test cloned from a template holding the net schema, and a loopback HTTP server.

PGNET_TEST_PG_VERSION=13 (13 to 18) runs the embedded servers from that major's binaries
(tests/pg_matrix.py installs them); `-m pg` selects the tests that use PostgreSQL.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

sys.path.insert(0, str(Path(__file__).parent))

from pgnet_curl import schema  # noqa: E402

TEMPLATE_DB = "pgnet_test_template"
_db_numbers = itertools.count(1)
# Tests using these fixtures get the `pg` mark: they are what the version matrix runs.
PG_FIXTURES = {"pg_server", "embedded_data_dir"}


def pytest_configure(config):
    config.addinivalue_line("markers", "pg: uses PostgreSQL (set from the fixtures a test uses)")
    major = os.environ.get("PGNET_TEST_PG_VERSION")
    if major and not os.environ.get("PGNET_TEST_DSN"):
        from pg_matrix import bindir

        try:
            # In the environment, so that `serve` subprocesses run the same binaries.
            os.environ["PGNET_PG_BINDIR"] = str(bindir(int(major)))
        except ValueError as exc:
            raise pytest.UsageError(f"PGNET_TEST_PG_VERSION={major}: {exc}") from exc


def pytest_collection_modifyitems(items):
    for item in items:
        if PG_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.pg)


def make_embedded_data_dir(tmp_path_factory, name: str) -> Path:
    """An empty folder for an embedded cluster; as root, one the pgnet-curl user can reach.

    pytest's own folders are closed to other users, and the embedded server changes no
    permission outside its data folder: as root the folder is made in the shared temp folder.
    """
    if os.geteuid() != 0:
        return tmp_path_factory.mktemp(name)
    return Path(tempfile.mkdtemp(prefix=f"pgnet-curl-test-{name}-"))


@pytest.fixture
def embedded_data_dir(tmp_path_factory) -> Path:
    """An empty data folder for an embedded cluster the test starts (and stops) itself."""
    path = make_embedded_data_dir(tmp_path_factory, "pg")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class PgServer:
    """An admin DSN to a server the tests may create and drop databases on."""

    def __init__(self, admin_dsn: str, embedded=None):
        self.admin_dsn = admin_dsn
        self.embedded = embedded

    def dsn_for(self, dbname: str) -> str:
        params = conninfo_to_dict(self.admin_dsn)
        params["dbname"] = dbname
        return make_conninfo(**params)

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_dsn, autocommit=True)

    def create_database(self, dbname: str, template: str | None = TEMPLATE_DB) -> str:
        with self.admin() as conn:
            conn.execute(f'drop database if exists "{dbname}" with (force)')
            clause = f' template "{template}"' if template else ""
            conn.execute(f'create database "{dbname}"{clause}')
        return self.dsn_for(dbname)

    def drop_database(self, dbname: str) -> None:
        with self.admin() as conn:
            conn.execute(f'drop database if exists "{dbname}" with (force)')


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory) -> PgServer:
    """The session's PostgreSQL server, with a template database holding the net schema."""
    embedded = None
    admin_dsn = os.environ.get("PGNET_TEST_DSN")
    if not admin_dsn:
        from pgnet_curl.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres(make_embedded_data_dir(tmp_path_factory, "pg"), port=0, fast_unsafe=True)
        admin_dsn = embedded.start()
    server = PgServer(admin_dsn, embedded)
    with server.admin() as conn:
        conn.execute(f'drop database if exists "{TEMPLATE_DB}" with (force)')
        conn.execute(f'create database "{TEMPLATE_DB}"')
    schema.install(server.dsn_for(TEMPLATE_DB))
    yield server
    server.drop_database(TEMPLATE_DB)
    if embedded:
        embedded.stop("immediate")
        shutil.rmtree(embedded.data_dir, ignore_errors=True)


@pytest.fixture
def db_dsn(pg_server) -> str:
    """DSN of a fresh database with the net schema installed, dropped after the test."""
    dbname = f"pgnet_test_{os.getpid()}_{next(_db_numbers)}"
    yield pg_server.create_database(dbname)
    pg_server.drop_database(dbname)


@pytest.fixture
def empty_db_dsn(pg_server) -> str:
    """DSN of a fresh database without the net schema."""
    dbname = f"pgnet_empty_{os.getpid()}_{next(_db_numbers)}"
    yield pg_server.create_database(dbname, template="template1")
    pg_server.drop_database(dbname)


@pytest.fixture
def db(db_dsn) -> psycopg.Connection:
    """An autocommit connection to the test's fresh database."""
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def http_server():
    """A loopback HTTP server (tests/http_server.py) shared by the session."""
    from http_server import HttpTestServer

    with HttpTestServer() as server:
        yield server


@pytest.fixture
def serve():
    """Start `pgnet-curl serve` subprocesses: serve(dsn, *flags, workers=1); all killed after."""
    from serve_process import ServeProcess

    started = []

    def start(dsn, *args, workers=1, env=None, wait=True):
        process = ServeProcess(dsn, *args, workers=workers, env=env)
        started.append(process)
        if wait:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.kill()


_role_numbers = itertools.count(1)


@pytest.fixture
def make_role(db_dsn):
    """make_role(*member_of) -> (name, dsn): a login role with no privileges but those memberships."""
    created = []

    def make(*member_of: str) -> tuple[str, str]:
        name = f"pgnet_test_role_{os.getpid()}_{next(_role_numbers)}"
        password = secrets.token_hex(8)
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("create role {} login password {}").format(sql.Identifier(name), sql.Literal(password)))
            for group in member_of:
                conn.execute(sql.SQL("grant {} to {}").format(sql.Identifier(group), sql.Identifier(name)))
        created.append(name)
        params = conninfo_to_dict(db_dsn)
        params.update(user=name, password=password)
        return name, make_conninfo(**params)

    yield make
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        for name in created:
            conn.execute(sql.SQL("drop owned by {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("drop role {}").format(sql.Identifier(name)))


@pytest.fixture
def worker_dsn(db_dsn, make_role):
    """A DSN that logs in as a member of pgnet_worker (what `install --worker-role` makes)."""
    return make_role("pgnet_worker")[1]
