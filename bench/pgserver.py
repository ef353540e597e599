"""A throwaway PostgreSQL server in a temp dir, from the binaries of Debian's package.

For the store's tests and ``imgpipe bench store``: ``initdb`` a cluster under a fresh
temp dir, start it with ``pg_ctl`` listening on a unix socket in that dir only (no TCP
port to collide with, nor with the cluster Debian's package may have started), make
databases, stop it and remove the dir. PostgreSQL refuses to run as root, so as root
it runs as the ``postgres`` user the package creates (``runuser``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

PORT = 5432  # names the socket file (.s.PGSQL.5432) in our own dir: nothing is bound


class PgUnavailable(RuntimeError):
    """No PostgreSQL binaries here (or no user to run them as)."""


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` with initdb and pg_ctl (Debian), else
    the folder of a ``pg_ctl`` on PATH that has an ``initdb`` beside it."""
    def version(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else 0

    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(Path(cand) / b, os.X_OK) for b in ("initdb", "pg_ctl")):
            return Path(cand)
    found = shutil.which("pg_ctl")
    if found and os.access(Path(found).parent / "initdb", os.X_OK):
        return Path(found).parent
    return None


class PgServer:
    """One PostgreSQL cluster under a temp dir; ``with PgServer() as pg: pg.new_database()``.

    ``durable=False`` (the tests) turns fsync off: a crash loses the throwaway cluster,
    which nobody keeps anyway. The bench keeps PostgreSQL's defaults.
    """

    def __init__(self, *, durable: bool = False) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise PgUnavailable("no PostgreSQL server binaries (initdb, pg_ctl): install "
                                "Debian's `postgresql` package (apt-get install postgresql)")
        self.bindir = bindir
        self.durable = durable
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PgUnavailable("running as root, and there is no `postgres` user to "
                                    "run PostgreSQL as (Debian's package makes one)") from None
            self.user = "postgres"
        # Short: a unix socket path must fit in ~100 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.started = False

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise PgUnavailable(f"{' '.join(args[:1])} failed ({done.returncode}): "
                                f"{done.stderr.strip()[-2000:]}\n{log}")

    def start(self) -> PgServer:
        """initdb and start; on failure the temp dir is removed again."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> PgServer:
        if self.user:
            shutil.chown(self.dir, self.user, self.user)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        opts = [f"-c listen_addresses='' -c unix_socket_directories={self.dir} -p {PORT}",
                "-c max_connections=200"]
        if not self.durable:
            opts.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", " ".join(opts), "start")
        self.started = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.dir}&port={PORT}"

    def new_database(self, prefix: str = "t") -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
                self.started = False
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
