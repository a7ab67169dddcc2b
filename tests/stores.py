"""Both store backends for store-level tests: ``BACKENDS`` to parametrize over, and
:func:`new_store` to build one (SQLite in ``tmp_path``; PostgreSQL: a new empty database on the
session's real server, from the ``pg_url`` fixture)."""

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from gateway.dburl import parse_database_url
from gateway.model import utcnow
from gateway.store import Backend, PostgresStore, SQLiteStore

__all__ = ["BACKENDS", "backend_url", "new_store"]

BACKENDS = ("sqlite", "postgres")


def backend_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """A ``DATABASE_URL`` for a new, empty store of ``backend``."""
    if backend == "sqlite":
        return f"sqlite://{tmp_path / 'gate.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")  # starts PostgreSQL on first use only
    return url


def new_store(url: str, *, clock: Callable[[], datetime] = utcnow, **pg: float) -> Backend:
    """An unopened store on ``url`` (``pg``: PostgresStore timeouts/sizes)."""
    parsed = parse_database_url(url)
    if parsed.scheme == "sqlite":
        return SQLiteStore(parsed.path, clock=clock)
    return PostgresStore(parsed, clock=clock, **pg)  # type: ignore[arg-type]
