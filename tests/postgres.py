"""A real PostgreSQL server for tests, on 127.0.0.1, in a temporary data directory.

Debian's ``postgresql`` package (``scripts/test`` installs it). PostgreSQL refuses to run as
root, so the data directory belongs to the ``postgres`` user and the server runs as that user
(started directly with that uid, so that signals reach it); the database superuser is
``gate`` with ``trust`` authentication on loopback. ``fsync=off``: the tests kill and restart
it, durability across a power cut is not the point.

The server can be stopped and started again on the same port and data directory
(:meth:`PostgresServer.stop` / :meth:`PostgresServer.start`), which is how fault tests take the
database away under traffic. A missing binary fails the test: nothing here skips.
"""

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.processes import Child, spawn, start_on_free_port, wait_for_port

__all__ = ["PG_BIN", "PostgresServer", "running_postgres"]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
_USER = "gate"
_START_SECONDS = 30.0


class PostgresServer:
    """One PostgreSQL server (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = 0
        self._child: Child | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def init(self) -> None:
        """``initdb`` as the postgres user (superuser ``gate``, trust auth)."""
        pw = pwd.getpwnam("postgres")
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._as_postgres(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", _USER, "-E", "UTF8"]
        )

    def start(self) -> None:
        """Start the server (a free port the first time, the same port afterwards) and wait
        until it accepts connections."""
        if self.port:
            self._child = self._spawn(self.port, append=True)
            wait_for_port(self._child, self.port, _START_SECONDS)
        else:
            self._child, self.port = start_on_free_port(self._spawn, _START_SECONDS)
        if not self._wait_ready(self.port):
            raise AssertionError(f"postgres did not start:\n{self.log.read_text()[-4000:]}")

    def _spawn(self, port: int, append: bool = False) -> Child:
        argv = [
            str(PG_BIN / "postgres"),
            *("-D", str(self.data), "-k", str(self.root), "-p", str(port)),
            *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"),
        ]
        # As the postgres user, directly (not through runuser): signals reach postgres.
        return spawn(
            "postgres",
            argv,
            self.log,
            append=append,
            user="postgres",
            group="postgres",
            extra_groups=[],
        )

    def stop(self) -> None:
        """Fast shutdown (SIGINT: active connections are closed), waiting for the exit."""
        child, self._child = self._child, None
        if child is None or child.popen.poll() is not None:
            return
        proc = child.popen
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.popen.poll() is None

    # --- databases -----------------------------------------------------------------------------

    def url(self, database: str = "postgres", *, password: str = "") -> str:
        secret = f":{password}" if password else ""
        return f"postgresql://{_USER}{secret}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` (tab-separated, unaligned output)."""
        out = subprocess.run(
            [
                *("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", _USER, "-d", database),
                *("-v", "ON_ERROR_STOP=1", "-At", "-c", sql),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise AssertionError(f"psql failed ({sql!r}): {out.stderr}")
        return out.stdout

    # --- helpers -------------------------------------------------------------------------------

    def _wait_ready(self, port: int) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._child is not None and self._child.popen.poll() is not None:
                return False  # exited: e.g. the port was taken
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", _USER],
                capture_output=True,
            )
            if ready.returncode == 0:
                return True
            time.sleep(0.1)
        return False

    def _as_postgres(self, argv: list[str]) -> None:
        out = subprocess.run(
            argv, capture_output=True, user="postgres", group="postgres", extra_groups=[]
        )
        if out.returncode != 0:
            raise AssertionError(f"{argv[0]} failed: {out.stderr.decode(errors='replace')}")


def running_postgres() -> Iterator[PostgresServer]:
    """A started server in a fresh temporary directory, stopped and removed afterwards (use as
    a pytest fixture body: ``yield from running_postgres()``)."""
    root = Path(tempfile.mkdtemp(prefix="gate-pg-"))
    server = PostgresServer(root)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
