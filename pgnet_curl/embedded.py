"""Run a private PostgreSQL server from a data folder, for `serve` with no DSN and for tests."""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
from pathlib import Path

from .errors import EmbeddedServerError

log = logging.getLogger("pgnet_curl.embedded")

# initdb and postgres refuse to run as root: as root we run them as this system user.
SERVICE_USER = "pgnet-curl"
DEFAULT_PORT = 54329
START_TIMEOUT_S = 60


def find_bindir() -> Path:
    """Locate PostgreSQL server binaries: $PGNET_PG_BINDIR, the pgserver wheel, or the system."""
    candidates = []
    if os.environ.get("PGNET_PG_BINDIR"):
        candidates.append(Path(os.environ["PGNET_PG_BINDIR"]))
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.submodule_search_locations:
        candidates.append(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).parent)
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    for bindir in candidates:
        if (bindir / "postgres").exists() and (bindir / "initdb").exists():
            return bindir
    raise EmbeddedServerError(
        "no PostgreSQL server binaries found: install the pgserver package "
        "(pip install pgserver), set PGNET_PG_BINDIR, or pass --dsn"
    )


def free_port(preferred: int = DEFAULT_PORT) -> int:
    """Return preferred if nothing listens on it on 127.0.0.1 (0: any), else any free port."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As PostgreSQL binds: connections of a previous run in TIME_WAIT do not block it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise EmbeddedServerError("no free TCP port on 127.0.0.1")


class EmbeddedPostgres:
    """A PostgreSQL cluster in data_dir listening on 127.0.0.1 only, with trust auth.

    For local use and tests: anyone on this host can connect as the postgres superuser.
    """

    def __init__(self, data_dir: Path | str, port: int | None = None, fast_unsafe: bool = False):
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.logfile = self.data_dir / "postgres.log"
        self.requested_port = port
        self.port: int | None = None
        # fsync off: much faster CREATE DATABASE and commits; a host crash may corrupt data.
        self.fast_unsafe = fast_unsafe
        self.bindir = find_bindir()
        self._run_as = _service_account() if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        if self.port is None:
            raise EmbeddedServerError("the embedded server is not running")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> str:
        """Initialise the cluster if needed, start it (or adopt a running one); return its DSN."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._run_as:
            self._grant_service_user_access()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        running_port = self._running_port()
        if running_port:
            log.info("embedded PostgreSQL already running on port %d", running_port)
            self.port = running_port
            return self.dsn
        self.port = free_port(self._preferred_port())
        (self.data_dir / "port").write_text(f"{self.port}\n")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        if self.fast_unsafe:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.logfile), "-o", options)
        return self.dsn

    def _preferred_port(self) -> int:
        """The port asked for (0: any), else the one this data folder used last, else the default."""
        if self.requested_port is not None:
            return self.requested_port
        try:
            return int((self.data_dir / "port").read_text())
        except (OSError, ValueError):
            return DEFAULT_PORT

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart, fast or immediate); nothing happens if it is down."""
        if self._running_port() is None:
            return
        self._pg_ctl("stop", "-w", "-t", str(START_TIMEOUT_S), "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port (for fault tests)."""
        port = self.port
        self.stop(mode)
        self.requested_port = port
        self.start()

    def _running_port(self) -> int | None:
        """Return the port of a live postmaster for this cluster, else None."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return port

    def _initdb(self) -> None:
        log.info("creating a PostgreSQL cluster in %s", self.pgdata)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if self._run_as:
            os.chown(self.pgdata, self._run_as.pw_uid, self._run_as.pw_gid)
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions",
        )

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), *args)

    def _run(self, *cmd: str) -> None:
        kwargs = {}
        if self._run_as:
            kwargs = dict(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            # Output to files, not pipes: the postmaster inherits them and outlives us.
            with open(self.data_dir / "pg_ctl.log", "ab") as out:
                result = subprocess.run(
                    cmd, cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S + 30, **kwargs,
                )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedServerError(f"{Path(cmd[0]).name} failed: {exc}") from exc
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed (exit {result.returncode}); "
                f"see {self.data_dir / 'pg_ctl.log'} and {self.logfile}:\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        text = ""
        for path in (self.data_dir / "pg_ctl.log", self.logfile):
            if path.exists():
                text += "".join(path.read_text(errors="replace").splitlines(True)[-15:])
        return text

    def _grant_service_user_access(self) -> None:
        """Let the service user reach the data folder and the binaries (traverse bits only)."""
        os.chown(self.data_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        for leaf in (self.data_dir, self.bindir, self.bindir.parent / "lib", self.bindir.parent / "share"):
            for folder in [*leaf.parents]:
                mode = folder.stat().st_mode
                if not mode & stat.S_IXOTH:
                    log.info("adding o+x to %s so the %s user can reach %s", folder, SERVICE_USER, leaf)
                    folder.chmod(mode | stat.S_IXOTH)


def _service_account() -> pwd.struct_passwd:
    """Return the unprivileged account to run PostgreSQL as, creating it if needed."""
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    created = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
        capture_output=True, text=True,
    )
    if created.returncode == 0:
        return pwd.getpwnam(SERVICE_USER)
    log.warning("could not create user %s (%s); running PostgreSQL as nobody",
                SERVICE_USER, created.stderr.strip())
    return pwd.getpwnam("nobody")
