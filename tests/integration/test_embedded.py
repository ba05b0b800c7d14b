"""The embedded server: data folders of another major version, and running as root."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from pgnet_curl.embedded import SERVICE_USER, EmbeddedPostgres
from pgnet_curl.errors import EmbeddedServerError
from pgnet_curl.pg_binaries import SHARED_COPIES_DIR, find_bindir, install_layout, server_version

AS_ROOT = os.geteuid() == 0


def folder_modes(*paths: Path) -> dict[Path, tuple[int, int, int]]:
    """Mode, owner and group of each existing folder on the way to each path."""
    seen = {}
    for path in paths:
        for folder in [*path.parents, path]:
            if folder.exists():
                info = folder.stat()
                seen[folder] = (info.st_mode, info.st_uid, info.st_gid)
    return seen


def listing(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def other_major() -> int:
    return 16 if server_version(find_bindir()).major != 16 else 15


def test_cluster_of_another_major_is_refused_and_left_as_it_was(embedded_data_dir):
    old_major = other_major()
    pgdata = embedded_data_dir / "pgdata"
    pgdata.mkdir(mode=0o700)
    (pgdata / "PG_VERSION").write_text(f"{old_major}\n")
    (pgdata / "postgresql.conf").write_text("# the old cluster's settings\n")
    before = listing(embedded_data_dir)

    server = EmbeddedPostgres(embedded_data_dir, port=0)
    with pytest.raises(EmbeddedServerError) as raised:
        server.start()

    message = str(raised.value)
    assert f"{pgdata} holds a PostgreSQL {old_major} cluster" in message
    assert f"is PostgreSQL {server.version.text}" in message
    for way_forward in ("--data-dir", f"PGNET_PG_BINDIR to the bin folder of PostgreSQL {old_major}", "pg_upgrade",
                        "pg_dumpall"):
        assert way_forward in message
    assert listing(embedded_data_dir) == before, "the old cluster was changed"
    assert not (pgdata / "postmaster.pid").exists()


def test_serve_on_a_cluster_of_another_major_exits_with_the_explanation(embedded_data_dir):
    old_major = other_major()
    (embedded_data_dir / "pgdata").mkdir(mode=0o700)
    (embedded_data_dir / "pgdata" / "PG_VERSION").write_text(f"{old_major}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PGNET_DSN", "DATABASE_URL")}
    result = subprocess.run([sys.executable, "-m", "pgnet_curl", "serve", "--data-dir", str(embedded_data_dir)],
                            capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 5, result.stderr
    assert f"holds a PostgreSQL {old_major} cluster" in result.stderr
    assert (embedded_data_dir / "pgdata" / "PG_VERSION").read_text() == f"{old_major}\n"


@pytest.fixture
def closed_folder():
    """A folder only its owner may enter (made outside pytest's folders, which other runs may touch)."""
    path = Path(tempfile.mkdtemp(prefix="pgnet-curl-test-closed-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_server_changes_no_permission_outside_its_data_folder(embedded_data_dir, closed_folder):
    # Binaries in a folder only their owner may enter, as in a virtualenv under /root.
    closed = closed_folder
    source = find_bindir()
    base, parts = install_layout(source)
    for part in parts:
        shutil.copytree(part, closed / part.relative_to(base), symlinks=True)
    bindir = closed / source.relative_to(base)
    watched = [embedded_data_dir, bindir, SHARED_COPIES_DIR, Path.home()]
    before = folder_modes(*watched)

    server = EmbeddedPostgres(embedded_data_dir, port=0, bindir=bindir)
    try:
        dsn = server.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("select current_setting('server_version_num')::int / 10000").fetchone()[0] \
                == server.version.major
    finally:
        server.stop("immediate")

    after = folder_modes(*watched)
    assert {path: after[path] for path in before if path != embedded_data_dir} == \
        {path: mode for path, mode in before.items() if path != embedded_data_dir}
    owner = pwd.getpwnam(SERVICE_USER).pw_uid if AS_ROOT else os.geteuid()
    assert (embedded_data_dir / "pgdata").stat().st_uid == owner
    if AS_ROOT:
        assert server.bindir.is_relative_to(SHARED_COPIES_DIR), "ran from a copy its user can reach"
        postgres = (server.bindir / "postgres").stat()
        assert postgres.st_uid == 0 and not postgres.st_mode & 0o222, "the copy is root's and read-only"


def test_data_dir_under_a_closed_folder(embedded_data_dir):
    closed = embedded_data_dir
    closed.chmod(0o700)
    data_dir = closed / "data"
    before = folder_modes(data_dir)

    server = EmbeddedPostgres(data_dir, port=0)
    if AS_ROOT:
        with pytest.raises(EmbeddedServerError) as raised:
            server.start()
        message = str(raised.value)
        assert f"cannot reach {data_dir}: {closed} (mode drwx------, owner root) is closed to it" in message
        assert "--data-dir" in message and "/var/lib/pgnet-curl" in message
        assert not data_dir.exists(), "nothing was created"
    else:
        try:
            server.start()
        finally:
            server.stop("immediate")
    assert folder_modes(data_dir) | {data_dir: None} == before | {data_dir: None}


def test_a_port_taken_between_the_check_and_the_start_is_given_up_for_another(embedded_data_dir, monkeypatch):
    # Two `serve`s starting at once both find the default port free; one of them loses the bind.
    from pgnet_curl import embedded

    taken = socket.create_server(("127.0.0.1", 0))
    real_free_port = embedded.free_port
    answers = iter([taken.getsockname()[1]])
    monkeypatch.setattr(embedded, "free_port", lambda preferred: next(answers, None) or real_free_port(preferred))
    server = EmbeddedPostgres(embedded_data_dir)
    try:
        dsn = server.start()
        assert server.port != taken.getsockname()[1]
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        server.stop("immediate")
        taken.close()
