"""Run a private PostgreSQL server from a data folder, for `serve` with no DSN and for tests."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import stat
import subprocess
from pathlib import Path

import platformdirs

from .errors import EmbeddedServerError
from .pg_binaries import ServerVersion, find_bindir, runs_as, server_version, shared_copy

log = logging.getLogger("pgnet_curl.embedded")

# initdb and postgres refuse to run as root: as root we run them as this system user.
SERVICE_USER = "pgnet-curl"
# The data folder as root: the service user reaches it without anyone's home folder opening up.
ROOT_DATA_DIR = Path("/var/lib/pgnet-curl")
DEFAULT_PORT = 54329
START_TIMEOUT_S = 60
# Starts tried when the port chosen is taken before the server binds it.
_START_ATTEMPTS = 3


def default_data_dir() -> Path:
    """Return where `serve` keeps its cluster: /var/lib/pgnet-curl as root, else the user data folder."""
    user_dir = Path(platformdirs.user_data_dir("pgnet-curl"))
    if os.geteuid() != 0:
        return user_dir
    if (user_dir / "pgdata").exists() and not (ROOT_DATA_DIR / "pgdata").exists():
        log.warning("%s holds a cluster from an older pgnet-curl; as root the default is now %s. "
                    "Pass --data-dir %s to keep serving it.", user_dir, ROOT_DATA_DIR, user_dir)
    return ROOT_DATA_DIR


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
    As root, the server runs as the pgnet-curl system user, and no permission is changed
    outside data_dir: a data_dir that user cannot reach is refused, and binaries it cannot
    reach are run from a root-owned read-only copy.
    """

    def __init__(self, data_dir: Path | str, port: int | None = None, fast_unsafe: bool = False,
                 bindir: Path | str | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.logfile = self.data_dir / "postgres.log"
        self.requested_port = port
        self.port: int | None = None
        # fsync off: much faster CREATE DATABASE and commits; a host crash may corrupt data.
        self.fast_unsafe = fast_unsafe
        self.bindir = Path(bindir).resolve() if bindir else find_bindir()
        self.version: ServerVersion | None = None
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
        if self.version is None:
            self.version = server_version(self.bindir)
        if self._run_as:
            self._use_binaries_the_service_user_reaches()
            self._prepare_data_dir_for_service_user()
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_data_version()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        running_port = self._running_port()
        if running_port:
            log.info("embedded PostgreSQL already running on port %d", running_port)
            self.port = running_port
            return self.dsn
        preferred = self._preferred_port()
        for attempt in range(_START_ATTEMPTS):
            self.port = free_port(preferred)
            (self.data_dir / "port").write_text(f"{self.port}\n")
            options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
            if self.fast_unsafe:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            try:
                self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.logfile), "-o", options)
                return self.dsn
            except EmbeddedServerError as exc:
                # Another process took the port between our check and the server's bind: unless
                # this port was asked for by number, take any other.
                if "Address already in use" not in str(exc) or self.requested_port not in (None, 0) \
                        or attempt == _START_ATTEMPTS - 1:
                    raise
                log.info("port %d was taken as PostgreSQL started; trying another", self.port)
                preferred = 0
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

    def _check_data_version(self) -> None:
        """Refuse a cluster of another major version, with the ways forward."""
        try:
            data_major = (self.pgdata / "PG_VERSION").read_text().strip()
        except FileNotFoundError:
            return
        if data_major == str(self.version.major):
            return
        older_wheel = " (`pip install pgserver` has PostgreSQL 16, which pgnet-curl 0.1 ran)" if data_major == "16" else ""
        raise EmbeddedServerError(
            f"{self.pgdata} holds a PostgreSQL {data_major} cluster, but {self.bindir} is PostgreSQL "
            f"{self.version.text}: a server opens only data folders of its own major version, so "
            f"nothing was started and the folder is left as it was. Either:\n"
            f"  - start afresh: pass another --data-dir (the old folder keeps its requests and responses);\n"
            f"  - keep serving it: set PGNET_PG_BINDIR to the bin folder of PostgreSQL {data_major}{older_wheel};\n"
            f"  - upgrade it to PostgreSQL {self.version.major} with pg_upgrade, or with pg_dumpall into a "
            f"new --data-dir: README.md, section \"Supported PostgreSQL versions\", shows the commands."
        )

    def _initdb(self) -> None:
        log.info("creating a PostgreSQL %s cluster in %s", self.version.text, self.pgdata)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if self._run_as:
            os.chown(self.pgdata, self._run_as.pw_uid, self._run_as.pw_gid)
        options = ["--no-instructions"] if self.version.major >= 14 else []
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--locale=C", *options,
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

    def _use_binaries_the_service_user_reaches(self) -> None:
        """Switch to a root-owned read-only copy of the binaries if the service user can't run them."""
        uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
        if runs_as(self.bindir, uid, gid):
            return
        copy = shared_copy(self.bindir, self.version)
        if not runs_as(copy, uid, gid):
            raise EmbeddedServerError(
                f"the {self._run_as.pw_name} user can run neither {self.bindir}/postgres nor its copy "
                f"{copy}/postgres: {_first_closed_folder(copy, self._run_as) or copy} is closed to it")
        log.info("running PostgreSQL from %s: the %s user cannot reach %s", copy, self._run_as.pw_name, self.bindir)
        self.bindir = copy

    def _prepare_data_dir_for_service_user(self) -> None:
        """Create data_dir for the service user; refuse one it cannot reach, changing nothing above it."""
        existing = next(folder for folder in self.data_dir.parents if folder.exists())
        if not self._service_user_enters(existing):
            raise self._unreachable_data_dir(existing)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.data_dir.stat().st_uid != self._run_as.pw_uid:
            os.chown(self.data_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        if not self._service_user_enters(self.data_dir):
            raise self._unreachable_data_dir(self.data_dir)

    def _service_user_enters(self, folder: Path) -> bool:
        result = subprocess.run(
            ["sh", "-c", 'cd -- "$1"', "sh", str(folder)], cwd="/", capture_output=True,
            user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[],
        )
        return result.returncode == 0

    def _unreachable_data_dir(self, folder: Path) -> EmbeddedServerError:
        closed = _first_closed_folder(folder, self._run_as) or folder
        info = closed.stat()
        return EmbeddedServerError(
            f"the {self._run_as.pw_name} user, which runs PostgreSQL when pgnet-curl runs as root, cannot "
            f"reach {self.data_dir}: {closed} (mode {stat.filemode(info.st_mode)}, owner "
            f"{_user_name(info.st_uid)}) is closed to it, and pgnet-curl changes no permission outside its "
            f"data folder. Pass a --data-dir that user can reach (as root the default is {ROOT_DATA_DIR}), "
            f"open {closed} to it yourself, or run pgnet-curl as an ordinary user."
        )


def _first_closed_folder(path: Path, account: pwd.struct_passwd) -> Path | None:
    """The outermost folder on path's way that account may not pass through (by mode bits)."""
    groups = {account.pw_gid, *(g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem)}
    for folder in [*reversed(path.parents), path]:
        try:
            info = folder.stat()
        except OSError:
            return folder
        if info.st_uid == account.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return folder
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


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
    try:
        return pwd.getpwnam(SERVICE_USER)  # made now, or by a process that ran useradd at the same time
    except KeyError:
        pass
    log.warning("could not create user %s (%s); running PostgreSQL as nobody",
                SERVICE_USER, created.stderr.strip())
    return pwd.getpwnam("nobody")
