"""The only package that speaks SQL: the gate's persistent state.

- :mod:`gateway.store.base`: row types, shared conversions, the calls a backend gives;
- :mod:`gateway.store.interface`: the :class:`Store` interface (the shared reads and writes);
- :mod:`gateway.store.schema`: the migrations (in either backend's column types, and the loop
  that applies them) and the entitlement upsert, written once;
- :mod:`gateway.store.reads`: the reads both backends share (one SQL statement each);
- :mod:`gateway.store.writes`: the writes both backends share (a statement or a transaction);
- :mod:`gateway.store.sqlite`: :class:`SQLiteStore`, the embedded default for one host;
- :mod:`gateway.store.postgres`: :class:`PostgresStore`, one truth shared by several replicas;
- :mod:`gateway.store.copy`: ``gateway migrate --from … --to …``.

:func:`open_store` builds the backend ``DATABASE_URL`` names (not yet opened).
"""

import asyncio
from collections.abc import Callable
from datetime import datetime

from gateway.dburl import DatabaseURL, parse_database_url
from gateway.model import utcnow
from gateway.settings import Settings, SettingsError
from gateway.store.base import (
    EVENTS_RETENTION,
    HITS_RETENTION,
    Grant,
    SessionRow,
    StoreError,
    TokenFate,
    email_key,
)
from gateway.store.interface import Store
from gateway.store.postgres import PG_MIGRATIONS, PostgresStore
from gateway.store.sqlite import MIGRATIONS, SQLiteStore

__all__ = [
    "EVENTS_RETENTION",
    "HITS_RETENTION",
    "MIGRATIONS",
    "PG_MIGRATIONS",
    "Backend",
    "DatabaseURL",
    "Grant",
    "PostgresStore",
    "SQLiteStore",
    "SessionRow",
    "Store",
    "StoreError",
    "TokenFate",
    "database_url_of",
    "email_key",
    "open_store",
    "parse_database_url",
    "preflight",
    "store_for",
]

#: What :func:`open_store` returns: either backend (both implement :class:`Store` and the
#: readiness/migration helpers the server and CLI use).
Backend = SQLiteStore | PostgresStore


def store_for(url: DatabaseURL, *, clock: Callable[[], datetime] = utcnow) -> Backend:
    """The (unopened) store for a parsed ``DATABASE_URL``."""
    if url.scheme == "sqlite":
        return SQLiteStore(url.path, clock=clock)
    return PostgresStore(url, clock=clock)


def open_store(settings: Settings, *, clock: Callable[[], datetime] = utcnow) -> Backend:
    """The (unopened) store the settings select: ``DATABASE_URL``, else ``DATABASE_PATH``."""
    return store_for(database_url_of(settings), clock=clock)


def database_url_of(settings: Settings) -> DatabaseURL:
    """The settings' ``DATABASE_URL`` (``sqlite:///`` + ``DATABASE_PATH`` when unset)."""
    raw = str(getattr(settings, "database_url", "") or "")
    if raw:
        return parse_database_url(raw)
    return DatabaseURL(scheme="sqlite", raw="", path=str(settings.database_path))


def preflight(settings: Settings) -> None:
    """Before serving (in the parent, before any worker forks): open the store once and bring
    its schema up to date, so that workers start on a migrated database (on a new SQLite file,
    already in WAL mode: several workers switching it at once could fail). A store that cannot
    be opened (an unreachable or wrong ``DATABASE_URL``; a SQLite file or directory that is
    read-only or missing) raises :class:`~gateway.settings.SettingsError` naming the setting,
    password hidden: the CLI prints one line and exits 2, instead of every worker failing."""
    if not settings.billing_enabled:
        return  # the store is not opened at all
    url = database_url_of(settings)
    if settings.database_url:
        where = f"DATABASE_URL={url.shown}"
    else:
        where = f"DATABASE_PATH={settings.database_path}"

    async def probe() -> None:
        store = store_for(url)
        try:
            await store.open()
        finally:
            await store.close()

    try:
        asyncio.run(probe())
    except StoreError as exc:
        message = str(exc)
        # PostgreSQL's messages already start with DATABASE_URL=…
        raise SettingsError(
            message if message.startswith(where) else f"{where}: {message}"
        ) from None
