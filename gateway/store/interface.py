"""The :class:`Store` interface: the reads and writes written once for both backends
(:mod:`gateway.store.reads`, :mod:`gateway.store.writes`) and the lifecycle each backend
gives. What the gate's services are typed against; :class:`~gateway.store.sqlite.SQLiteStore`
and :class:`~gateway.store.postgres.PostgresStore` are the two."""

from gateway.store.reads import SQLReads
from gateway.store.writes import SQLWrites

__all__ = ["Store"]


class Store(SQLReads, SQLWrites):
    """The gate's persistent state. All datetimes are timezone-aware UTC; every failure is a
    :class:`~gateway.store.base.StoreError`."""

    async def open(self) -> None:
        """Connect and bring the schema up to date (idempotent)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Let go of the connections (idempotent)."""
        raise NotImplementedError

    async def check_writable(self) -> bool:
        """Whether a write commits now."""
        raise NotImplementedError

    async def file_problem(self) -> str | None:
        """Why the store's file is no longer the one it opened, if it has one."""
        raise NotImplementedError

    async def readiness(self) -> str | None:
        """None if ready; else why not (for ``/readyz``)."""
        raise NotImplementedError

    async def schema_version(self) -> int:
        """The number of migrations applied."""
        raise NotImplementedError
