"""Real PostgreSQL servers for tests, from the machine's server binaries (Debian's ``postgresql`` package).

Why this exists: the cluster's ledger and journal live in Postgres and the tests talk to a real server, never a
fake. There is no Docker here, so the harness runs the server binaries directly: ``initdb`` into a temp directory,
``pg_ctl start`` on a free loopback port with the Unix socket in that directory, ``pg_ctl stop`` at the end.

Pieces:

* :func:`find_bindir` locates ``initdb`` / ``pg_ctl`` / ``postgres`` (``$TRACE_SOURCE_TEST_PG_BINDIR``,
  ``/usr/lib/postgresql/<newest>/bin``, ``pg_config --bindir``, ``PATH``).
* :class:`PostgresServer` runs one server. Postgres refuses to run as root, so when the tests run as root it runs
  ``initdb`` and the server as the ``postgres`` user (created by the Debian package) through ``runuser`` and gives
  that user the temp directory. TCP connections need a password (scram-sha-256), so the URL carries one.
* :func:`probe_postgres`, :func:`create_database`, :func:`drop_database` work on any server given by URL (also one
  named by ``TRACE_SOURCE_TEST_DATABASE_URL``).
* ``python tests/postgres_harness.py --find`` prints the binaries' directory (exit 1 when there are none; the
  Makefile then installs Debian's ``postgresql``); ``--run`` runs a server until Ctrl-C and prints its URL.

The core does not depend on pytest; ``tests/conftest.py`` wraps it in fixtures. Everything is synchronous.
"""

from __future__ import annotations

import argparse
import atexit
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

HOST = "127.0.0.1"
BINDIR_ENV = "TRACE_SOURCE_TEST_PG_BINDIR"
RUN_AS = "postgres"

# Test servers trade durability for speed (the machine is shared; nothing here survives a power cut anyway) and
# keep their memory small; enough connections for several worker processes, each with a pool, per test.
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": HOST,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "200",
}


class PostgresHarnessError(RuntimeError):
    """No server binaries, or a server that would not start (the message carries its log tail)."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or ``None``."""
    candidates: list[str] = []
    if given := os.environ.get(BINDIR_ENV):
        candidates.append(given)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                      key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0, reverse=True)
    candidates += versions
    if pg_config := shutil.which("pg_config"):
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                             check=True, timeout=10).stdout.strip())
        except (subprocess.SubprocessError, OSError):
            pass
    if on_path := shutil.which("initdb"):
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        path = Path(candidate)
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return path
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One Postgres server on loopback in a fresh temp directory.

    :meth:`start` blocks until it accepts connections; :attr:`url` is the superuser's URL of its ``postgres``
    database; :meth:`stop` shuts it down and removes the directory.
    """

    def __init__(self, bindir: Path | None = None, port: int | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.port = port
        self.password = secrets.token_urlsafe(16)
        self.root: Path | None = None
        self._user: pwd.struct_passwd | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{quote(self.password)}@{HOST}:{self.port}/postgres"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    def _command(self, tool: str, *args: str) -> list[str]:
        assert self.bindir is not None
        cmd = [str(self.bindir / tool), *args]
        return ["runuser", "-u", RUN_AS, "--", *cmd] if self._user else cmd

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run(self._command(tool, *args), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if proc.returncode:
            raise PostgresHarnessError(f"{tool} {' '.join(args[:2])}… failed ({proc.returncode}):\n"
                                       f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}\n{self.log_tail()}")

    def start(self) -> None:
        if self.bindir is None:
            raise PostgresHarnessError(
                "no Postgres server binaries (initdb, pg_ctl, postgres) in /usr/lib/postgresql/*/bin, "
                f"`pg_config --bindir`, ${BINDIR_ENV} or PATH")
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                self._user = pwd.getpwnam(RUN_AS)
            except KeyError:
                raise PostgresHarnessError(f"running as root, and there is no {RUN_AS!r} user to run Postgres as "
                                           "(Debian's postgresql package creates it)") from None
        self.root = Path(tempfile.mkdtemp(prefix="trace-source-pg-"))
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._user:
            for path in (self.root, pwfile):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        data = self.root / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile), "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions")
        options = " ".join([f"-k {self.root}", *(f"-c {k}={v}" for k, v in SERVER_SETTINGS.items())])
        for attempt in range(3):  # another process may take the free port before the server binds it
            self.port = self.port or _free_port()
            try:
                self._run("pg_ctl", "-D", str(data), "-l", str(self.log_path), "-w", "-t", "60",
                          "-o", f"-p {self.port} {options}", "start")
                break
            except PostgresHarnessError:
                if attempt == 2 or "could not bind" not in self.log_tail():
                    raise
                self.port = None
        _live.add(self)

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
            except (PostgresHarnessError, subprocess.SubprocessError):
                self._kill(data)
        _live.discard(self)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    @staticmethod
    def _kill(data: Path) -> None:
        try:
            pid = int((data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown
        except (OSError, ValueError, IndexError):
            pass

    def log_tail(self, lines: int = 30) -> str:
        if self.root is None or not self.log_path.is_file():
            return "(no server log)"
        text = self.log_path.read_text(errors="replace")
        return f"--- {self.log_path} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def probe_postgres(url: str, timeout: float = 10.0) -> str:
    """Connect to ``url`` and return the server's version. Raises ``psycopg.Error``."""
    with psycopg.connect(url, connect_timeout=max(1, round(timeout))) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


def database_url(url: str, dbname: str) -> str:
    """``url`` (a ``postgresql://`` URL) pointing at database ``dbname`` instead."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(dbname)))


def create_database(admin_url: str, dbname: str) -> str:
    """Create the empty database ``dbname`` through ``admin_url`` (a role allowed to); returns its URL."""
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return database_url(admin_url, dbname)


def drop_database(admin_url: str, dbname: str) -> None:
    """Drop ``dbname``, disconnecting whoever still uses it (a test's leftover worker)."""
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


# Servers still running when the interpreter exits (a test crashed, Ctrl-C) are stopped on the way out.
_live: set[PostgresServer] = set()


@atexit.register
def _stop_leftover_servers() -> None:
    for server in list(_live):
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--find", action="store_true", help="print the server binaries' directory (exit 1: none)")
    action.add_argument("--run", action="store_true", help="run a server until Ctrl-C / SIGTERM, print its URL")
    args = parser.parse_args(argv)
    if args.find:
        bindir = find_bindir()
        print(bindir or "no Postgres server binaries found", file=sys.stdout if bindir else sys.stderr)
        return 0 if bindir else 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    began = time.monotonic()
    with PostgresServer() as server:
        print(f"ready after {time.monotonic() - began:.1f}s; log: {server.log_path}", file=sys.stderr)
        print(server.url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
