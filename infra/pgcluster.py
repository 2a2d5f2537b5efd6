"""A private PostgreSQL cluster for the shared servers: initdb, start, stop, databases.

Used by ``infra/services.py``; standard library only (the ``psql``/``pg_ctl`` binaries of
Debian's ``postgresql`` package do the work), so it runs before anything is installed.

Why the contortions around users: the postgres server refuses to run as root. When this
script runs as root (our CI, containers), every server-side command (initdb, pg_ctl) runs as
the unprivileged ``postgres`` user through ``runuser``, and the files the server touches
(the data directory) belong to that user. Clients (psql, pg_isready) run as whoever we are.
Connections go over TCP only (unix sockets off: their path is limited to ~107 bytes, which
deep temporary state folders exceed) and always need the generated password
(scram-sha-256), so a cluster bound beyond loopback is never open.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra.safety import PG_CONF_MARK, ServiceError, is_pg_data_dir, os_environ_path, remove_tree

PG_USER = "postgres"  # the OS user the server runs as when we are root
APP_ROLE = "vaepipe"  # the login role owning the application databases
DATABASES = ("mlflow", "mlflow_auth", "prefect")
# Debian keeps the server binaries off PATH; newest version first
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
FALLBACK_ROOT = Path("/var/lib/postgresql/vaepipe")


def find_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl: $VAEPIPE_PG_BIN, Debian's layout, or PATH."""
    env = os.environ.get("VAEPIPE_PG_BIN")
    if env:
        return Path(env) if (Path(env) / "pg_ctl").exists() else None
    candidates = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")),
                        key=lambda p: _version_key(p.parent.name), reverse=True)
    for c in candidates:
        if (c / "pg_ctl").exists() and (c / "initdb").exists():
            return c
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in name.split("."))
    except ValueError:
        return (0,)


def as_root() -> bool:
    return os.geteuid() == 0


def _server_cmd(cmd: list[str]) -> list[str]:
    """Run a server-side command as the unprivileged postgres user when we are root."""
    return ["runuser", "-u", PG_USER, "--", *cmd] if as_root() else cmd


def _chown_pg(path: Path) -> None:
    if as_root():
        pw = pwd.getpwnam(PG_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _pg_can_reach(path: Path) -> bool:
    """Whether the postgres user can create files in ``path`` (every ancestor searchable)."""
    if not as_root():
        return True
    r = subprocess.run(_server_cmd(["test", "-w", str(path), "-a", "-x", str(path)]),
                       capture_output=True)
    return r.returncode == 0


@dataclass(frozen=True)
class Cluster:
    """One cluster: where it lives, where it listens, and the app role's password."""

    data_dir: Path
    log_file: Path
    host: str
    port: int
    password: str
    bindir: Path

    # -- paths -----------------------------------------------------------------------------

    @staticmethod
    def locate(state_dir: Path) -> Path:
        """The data directory for a state folder (created on the way); always absolute.

        ``$STATE/postgres/data`` normally. As root, when the postgres user cannot reach the
        state folder (the default ``/root/.local/state/vaepipe`` sits under a 0700 /root),
        we do not loosen /root: the cluster goes to ``/var/lib/postgresql/vaepipe/<hash of
        the state path>/data`` and ``$STATE/postgres/LOCATION`` records where, so ``down`` and
        ``purge`` find it. ``$VAEPIPE_PG_DATA`` overrides both.
        """
        pg_dir = state_dir / "postgres"
        pg_dir.mkdir(parents=True, exist_ok=True)
        record = pg_dir / "LOCATION"
        recorded = record.read_text().strip() if record.exists() else ""
        given = os_environ_path("VAEPIPE_PG_DATA")  # absolute, or a ServiceError
        if given is not None:
            data = given.resolve()
        elif recorded and Path(recorded).is_absolute():
            return Path(recorded)
        else:
            _chown_pg(pg_dir)
            if _pg_can_reach(pg_dir):
                data = (pg_dir / "data").resolve()
            else:
                digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
                data = FALLBACK_ROOT / digest / "data"
        if str(data) != recorded:
            # atomically: MLflow and Prefect start side by side and both read this file (a
            # plain write_text let one of them read it empty, i.e. Path("") == ".")
            tmp = record.with_name(f".LOCATION.{os.getpid()}.tmp")
            tmp.write_text(f"{data}\n")
            os.replace(tmp, record)
        return data

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb with a password-only superuser, TCP only; then include our settings file."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        _chown_pg(self.data_dir.parent)
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise ServiceError(f"{self.data_dir}: not empty and not a PostgreSQL data directory")
        # initdb reads the superuser password from a file it can open: put it beside the
        # data directory, readable by the postgres user only, and remove it right after
        pwfile = self.data_dir.parent / ".initdb-pw"
        pwfile.write_text(self.password + "\n")
        os.chmod(pwfile, 0o600)
        _chown_pg(pwfile)
        try:
            self._run([str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", APP_ROLE,
                       f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                       "--locale=C.UTF-8"], server=True, what="initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.data_dir / "postgresql.conf", "a") as f:
            # this line is also the marker that lets purge delete the folder (safety.py)
            f.write("\n# vaepipe: listen address and port, rewritten by infra/services.py\n"
                    f"{PG_CONF_MARK}\n")

    def _write_settings(self) -> None:
        listen = "*" if self.host in ("0.0.0.0", "::") else self.host
        conf = self.data_dir / "vaepipe.conf"
        conf.write_text(
            f"listen_addresses = '{listen}'\n"
            f"port = {self.port}\n"
            "unix_socket_directories = ''\n"
            "max_connections = 200\n"
        )
        _chown_pg(conf)
        # passwords are always required; beyond loopback accept any address (still scram)
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "# written by infra/services.py: TCP only, password (scram-sha-256) always\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
            + ("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n"
               if listen not in ("127.0.0.1", "localhost", "::1") else "")
        )
        _chown_pg(hba)

    def start(self, timeout: float) -> None:
        if not self.initialised:
            self.init()
        self._write_settings()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # We open the log and hand the server the descriptor (no ``pg_ctl -l``): the postgres
        # user may not be allowed into the state folder, but it can write an inherited fd.
        with open(self.log_file, "ab") as log:
            r = subprocess.run(_server_cmd([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-w",
                                            "-t", str(int(timeout)), "start"]),
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if r.returncode:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
            errors = [ln for ln in lines[-30:] if "FATAL" in ln or "ERROR" in ln] or lines[-1:] or ["no output"]
            raise ServiceError(f"pg_ctl start failed (exit {r.returncode}): {errors[-1].strip()} "
                               f"(log: {self.log_file})")
        self.ensure_databases()

    def stop(self, timeout: float) -> None:
        if self.running():
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                       "-t", str(int(timeout)), "stop"], server=True, what="pg_ctl stop")

    def running(self) -> bool:
        if not self.initialised:
            return False
        r = subprocess.run(_server_cmd([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir),
                                        "status"]), capture_output=True, text=True)
        return r.returncode == 0

    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def ready(self) -> bool:
        """pg_isready over TCP: accepting connections."""
        r = subprocess.run([str(self.bindir / "pg_isready"), "-h", self._client_host(),
                            "-p", str(self.port), "-t", "3"], capture_output=True)
        return r.returncode == 0

    # -- SQL -------------------------------------------------------------------------------

    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "*") else ("::1" if self.host == "::" else self.host)

    def psql(self, sql: str, db: str = "postgres") -> str:
        env = {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        r = subprocess.run([str(self.bindir / "psql"), "-h", self._client_host(), "-p", str(self.port),
                            "-U", APP_ROLE, "-d", db, "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            raise ServiceError(f"psql on port {self.port}: {r.stderr.strip().splitlines()[-1:]}")
        return r.stdout.strip()

    def ensure_databases(self) -> None:
        existing = set(self.psql("SELECT datname FROM pg_database").split())
        for db in DATABASES:
            if db not in existing:
                self.psql(f'CREATE DATABASE "{db}" OWNER "{APP_ROLE}"')

    def url(self, db: str, driver: str) -> str:
        """SQLAlchemy URL for ``db``: driver ``psycopg`` (MLflow) or ``asyncpg`` (Prefect)."""
        from urllib.parse import quote

        return (f"postgresql+{driver}://{APP_ROLE}:{quote(self.password, safe='')}"
                f"@{self._client_host()}:{self.port}/{db}")

    # -- helpers ---------------------------------------------------------------------------

    def _run(self, cmd: list[str], *, server: bool, what: str) -> None:
        r = subprocess.run(_server_cmd(cmd) if server else cmd, capture_output=True, text=True)
        if r.returncode:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ServiceError(f"{what} failed (exit {r.returncode}): {tail[0]} "
                               f"(log: {self.log_file})")

    def remove(self, state_dir: Path) -> None:
        """Delete the data directory (purge); the cluster must be stopped.

        Only through ``safety.remove_tree``: an absolute, resolved folder inside the state
        folder or the fallback root (or the exact folder ``VAEPIPE_PG_DATA`` names), holding
        PG_VERSION and the line our ``init`` appended to postgresql.conf, and never ``/``,
        home, the temporary folder, the cwd or the checkout, nor anything above them. An empty
        folder (an initdb that failed early) is only ``rmdir``-ed.
        """
        d = self.data_dir
        if not d.is_absolute():
            raise ServiceError(f"PostgreSQL data folder {str(d)!r} is not absolute; refusing to delete it")
        if not d.exists():
            return
        if self.running():
            raise ServiceError(f"PostgreSQL is still running on {d}; stop it before deleting its data")
        roots = [state_dir, FALLBACK_ROOT]
        given = os_environ_path("VAEPIPE_PG_DATA")
        if given is not None:
            roots.append(given)
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()
        else:
            remove_tree(d, what="PostgreSQL data folder", marker=is_pg_data_dir,
                        marker_text="PG_VERSION + vaepipe.conf include in postgresql.conf", under=roots)
        holder = d.parent
        if holder.parent == FALLBACK_ROOT:
            try:
                holder.rmdir()  # the per-state-folder directory made by locate, when empty
            except OSError:
                pass
