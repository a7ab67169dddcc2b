"""What every store backend shares: the row types and :class:`Table` (the conversions between
Python values and stored columns), and :class:`SQL`, the calls the shared SQL runs on (the
:class:`~gateway.store.interface.Store` interface is built on it).

Both backends store datetimes as Unix seconds (a float) and return them timezone-aware UTC,
emails lower-cased, and the same tables and columns, so ``gateway migrate --from … --to …``
copies rows as they are. Every backend failure surfaces as :class:`StoreError`.
"""

import json
import types
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, Protocol, TypeVar

from gateway.errors import GatewayError
from gateway.model import Entitlement

#: How long rate-limit hits, consumed-or-expired sign-in tokens and email lookups are kept.
HITS_RETENTION = timedelta(days=1)
#: Stripe retries deliveries for 3 days and lists events for 30; dedupe ids live as long.
EVENTS_RETENTION = timedelta(days=30)

#: A result row: ``sqlite3.Row`` or an asyncpg ``Record`` (both index by column name).
Row = Any

R = TypeVar("R")
T = TypeVar("T")

# Sign-in token marks (no schema change: rows of ``hits``, pruned with them): why a token that
# no longer exists does not work, so the page can say "already used" rather than "expired".
USED, EXPIRED = "login:used:", "login:expired:"
TokenFate = Literal["used", "expired"]
FATES: dict[str, TokenFate] = {
    USED: "used",
    EXPIRED: "expired",
}

#: A mailbox's (``$1``: :func:`gateway.emails.mailbox_key`) unexpired sign-in tokens
#: (``live``) and those issued after ``$3`` (``recent``), at ``$2``: whatever sub-address of
#: the mailbox each was sent to.
TOKENS_HELD = (
    "SELECT COUNT(*) AS live, COALESCE(SUM(CASE WHEN created_at > $3 THEN 1 ELSE 0 END), 0) "
    "AS recent FROM login_tokens WHERE mailbox = $1 AND expires_at > $2"
)


class StoreError(GatewayError):
    """The store failed (I/O error, corrupt file, closed store…)."""


class Tx(Protocol):
    """One open transaction of a backend; SQL takes ``$1``, ``$2``… placeholders."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run one statement; its rows."""
        ...

    async def lock(self, space: int, key: str) -> None:
        """Hold ``key`` of ``space`` until the transaction ends: transactions that lock the
        same key run one after another, whichever process or replica runs them."""
        ...


@dataclass(frozen=True, slots=True)
class Grant:
    """An operator's manual override (``gateway grant``): access until ``until``."""

    subject: str  # a customer id (cus_…) or a lower-cased email
    until: datetime
    note: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SessionRow:
    """One server-side session (:mod:`gateway.sessions`). ``id_hash`` is the SHA-256 of the
    cookie's random session id: the store never holds an id that would let its reader in."""

    id_hash: str
    customer_id: str
    email: str | None
    created_at: datetime
    last_seen: datetime
    expires_at: datetime
    device: str
    revoked_at: datetime | None

    def active(self, now: datetime) -> bool:
        """Not revoked and not past its lifetime at ``now``."""
        return self.revoked_at is None and now < self.expires_at


def email_key(email: str) -> str:
    """How the store keys an email: stripped and lower-cased (``emails.valid_email`` decides
    what is an email; ``emails.mailbox_key`` which addresses share a mailbox)."""
    return email.strip().lower()


def subject(customer_or_email: str) -> str:
    text = customer_or_email.strip()
    return email_key(text) if "@" in text else text


def need(value: datetime) -> float:
    if value.tzinfo is None:
        raise ValueError("naive datetime: the store only takes timezone-aware UTC datetimes")
    return value.timestamp()


def ts(value: datetime | None) -> float | None:
    return None if value is None else need(value)


def dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _split(text: str) -> frozenset[str]:
    return frozenset(part for part in text.split(",") if part)


def _joined(values: frozenset[str]) -> str:
    return ",".join(sorted(values))


def _same(value: Any) -> Any:
    return value


#: How a field's type is stored: (column value → field value, field value → column value).
_BY_TYPE: dict[Any, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    datetime: (dt, need),
    bool: (bool, int),
    int: (int, int),
    float: (float, float),
    frozenset[str]: (_split, _joined),
}


def _conversions(hint: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """How a field annotated ``hint`` is read and written (``X | None``: as ``X``, None as
    NULL; ``str`` and ``Literal`` strings as they are)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        [inner] = [a for a in args if a is not type(None)]
        read, write = _conversions(inner)
        return (
            lambda v: None if v is None else read(v),
            lambda v: None if v is None else write(v),
        )
    return _BY_TYPE.get(hint, (_same, _same))


#: A column: its name, how it is read, how it is written.
_Column = tuple[str, Callable[[Any], Any], Callable[[Any], Any]]


def _columns_of(cls: type[Any]) -> tuple[_Column, ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, *_conversions(hints[f.name])) for f in fields(cls))


@dataclass(frozen=True)
class Table(Generic[R]):
    """A table whose rows are the dataclass ``row``: its fields are the columns (same names,
    same order), stored as their types say — datetimes as Unix seconds (:func:`need`,
    :func:`dt`), bools as 0/1, feature sets as sorted comma-joined text, ``X | None`` as ``X``
    or NULL. A column stored otherwise is passed to :meth:`load` / :meth:`params` by name."""

    name: str
    row: type[R]
    _columns: tuple[_Column, ...] = field(init=False, repr=False, compare=False)
    column_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: The column list of a ``SELECT``, ``INSERT`` or ``RETURNING``.
    columns: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        columns = _columns_of(self.row)
        names = tuple(name for name, _, _ in columns)
        object.__setattr__(self, "_columns", columns)  # frozen: set once, here
        object.__setattr__(self, "column_names", names)
        object.__setattr__(self, "columns", ", ".join(names))

    def select(self, where: str) -> str:
        """``SELECT`` every column of the rows ``where`` (which may go on with ``ORDER BY``)."""
        return f"SELECT {self.columns} FROM {self.name} WHERE {where}"  # noqa: S608 - constants

    def insert(self) -> str:
        """``INSERT`` one row, its columns as ``$1``… in order (:meth:`params`)."""
        marks = ", ".join(f"${i}" for i in range(1, len(self.column_names) + 1))
        return f"INSERT INTO {self.name} ({self.columns}) VALUES ({marks})"  # noqa: S608

    def load(self, row: Row, **given: Any) -> R:
        """The row type's value of a result ``row`` (holding every column); ``given``: fields
        the caller read itself."""
        values = {
            name: given[name] if name in given else read(row[name])
            for name, read, _ in self._columns
        }
        return self.row(**values)

    def params(self, value: R, **given: Any) -> tuple[Any, ...]:
        """``value``'s columns in order, as stored; ``given``: columns the caller stores
        itself."""
        return tuple(
            given[name] if name in given else write(getattr(value, name))
            for name, _, write in self._columns
        )


class SQL:
    """A backend's four calls, which the SQL written once for both (reads, writes, teams,
    API keys, usage) runs on; ``$n`` placeholders; every failure a :class:`StoreError` naming
    ``op``. :class:`~gateway.store.sqlite.SQLiteStore` and
    :class:`~gateway.store.postgres.PostgresStore` give them."""

    async def _select(self, op: str, sql: str, *args: Any) -> list[Row]:
        """The rows of a read."""
        raise NotImplementedError

    async def _execute(self, op: str, sql: str, *args: Any) -> int:
        """Run one write statement; the rows it changed."""
        raise NotImplementedError

    async def _returning(self, op: str, sql: str, *args: Any) -> list[Row]:
        """Run one write statement with a ``RETURNING`` clause; its rows."""
        raise NotImplementedError

    async def _transaction(self, op: str, work: Callable[[Tx], Awaitable[T]]) -> T:
        """``work`` in one transaction: all its statements commit, or none does."""
        raise NotImplementedError

    async def _one(self, op: str, table: Table[R], where: str, *args: Any) -> R | None:
        """The row of ``table`` that ``where`` selects, if any."""
        rows = await self._select(op, table.select(where), *args)
        return table.load(rows[0]) if rows else None

    async def _all(self, op: str, table: Table[R], where: str, *args: Any) -> list[R]:
        """The rows of ``table`` that ``where`` selects, in its order."""
        return [table.load(r) for r in await self._select(op, table.select(where), *args)]

    async def _changed_one(self, op: str, table: Table[R], sql: str, *args: Any) -> R | None:
        """The row of ``table`` that ``sql`` (an ``UPDATE``) changed, as it is then, if any."""
        rows = await self._returning(op, f"{sql} RETURNING {table.columns}", *args)
        return table.load(rows[0]) if rows else None


#: The tables of the rows above (``ENTITLEMENTS``: of :class:`~gateway.model.Entitlement`).
ENTITLEMENTS = Table("entitlements", Entitlement)
SESSIONS = Table("sessions", SessionRow)
GRANTS = Table("grants", Grant)


def wrap(op: str, exc: BaseException) -> StoreError:
    """``exc`` (a backend's own error) as the :class:`StoreError` callers handle."""
    if isinstance(exc, StoreError):
        return exc
    err = StoreError(f"store {op} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def fate_buckets(token_hash: str) -> tuple[str, str]:
    """The ``hits`` buckets that may hold a mark of why ``token_hash`` no longer works."""
    return (f"{USED}{token_hash}", f"{EXPIRED}{token_hash}")


def token_limits(max_live: int | None, issued_since: datetime | None) -> tuple[bool, int, float]:
    """:meth:`Store.put_login_token`'s conditions as (any?, max_live, issued_since seconds);
    a missing one never refuses."""
    checked = max_live is not None or issued_since is not None
    limit = max_live if max_live is not None else 2**62
    since = need(issued_since) if issued_since is not None else float("inf")
    return checked, limit, since


def fate_from(rows: Sequence[Row], token_hash: str) -> TokenFate | None:
    """The fate the newest of ``rows`` (``SELECT bucket`` of :func:`fate_buckets`) marks."""
    if not rows:
        return None
    return FATES[str(rows[0]["bucket"])[: -len(token_hash)]]


def lookup_from(rows: Sequence[Row]) -> tuple[list[str], datetime] | None:
    """An ``email_lookups`` result (``customer_ids, checked_at``) as ids and time, if any."""
    if not rows:
        return None
    ids = json.loads(rows[0]["customer_ids"])
    return [str(i) for i in ids], dt(rows[0]["checked_at"])


#: A bucket's (``$1``) rate-limit hits since ``$2``.
COUNT_HITS = "SELECT COUNT(*) FROM hits WHERE bucket = $1 AND at >= $2"

#: Statements both backends speak alike (they take no parameters, so no placeholder style).
LIST_CUSTOMERS = (
    "SELECT customer_id FROM customers UNION SELECT customer_id FROM entitlements ORDER BY 1"
)
