"""What every store backend shares: the :class:`Store` interface, its row types, and the
conversions between Python values and stored columns.

Both backends store datetimes as Unix seconds (a float) and return them timezone-aware UTC,
emails lower-cased, and the same tables and columns, so ``gateway migrate --from … --to …``
copies rows as they are. Every backend failure surfaces as :class:`StoreError`.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from gateway.errors import GatewayError
from gateway.model import Entitlement, from_unix

#: How long rate-limit hits, consumed-or-expired sign-in tokens and email lookups are kept.
HITS_RETENTION = timedelta(days=1)
#: Stripe retries deliveries for 3 days and lists events for 30; dedupe ids live as long.
EVENTS_RETENTION = timedelta(days=30)

#: The tables, in the order ``gateway migrate --from`` copies them, with their key columns
#: (``hits`` has none: its rows are copied only into an empty table).
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("meta", ("key",)),
    ("customers", ("customer_id",)),
    ("entitlements", ("customer_id",)),
    ("email_lookups", ("email",)),
    ("webhook_events", ("event_id",)),
    ("login_tokens", ("token_hash",)),
    ("hits", ()),
    ("grants", ("subject",)),
    ("sessions", ("id_hash",)),
    ("teams", ("customer_id",)),
    ("team_members", ("email",)),
    ("team_invitations", ("token_hash",)),
    ("api_keys", ("id",)),
    ("usage_periods", ("customer_id", "meter", "period_start")),
    ("usage_windows", ("identifier",)),
    ("usage_reports", ("report_id",)),
)

#: A result row: ``sqlite3.Row`` or an asyncpg ``Record`` (both index by column name).
Row = Any

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

ENT_COLUMNS = (
    "customer_id",
    "status",
    "subscription_id",
    "price_id",
    "period_end",
    "cancel_at_period_end",
    "cancel_at",
    "trial_end",
    "paused",
    "source",
    "event_created",
    "checked_at",
    "expires_at",
    "period_start",
    "features",
    "meters",
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


class Store(Protocol):
    """The gate's persistent state. All datetimes are timezone-aware UTC."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def check_writable(self) -> bool: ...
    async def file_problem(self) -> str | None: ...
    async def readiness(self) -> str | None: ...
    async def schema_version(self) -> int: ...

    async def get_entitlement(self, customer_id: str) -> Entitlement | None: ...
    async def put_entitlement(self, ent: Entitlement) -> None: ...
    async def put_entitlement_if_newer(
        self, ent: Entitlement, *, strictly: bool = False
    ) -> bool: ...
    async def delete_entitlement(self, customer_id: str) -> None: ...

    async def customer_ids_for_email(self, email: str) -> list[str]: ...
    async def customer_email(self, customer_id: str) -> str | None: ...
    async def customer_ids_for_mailbox(self, email: str) -> list[str]: ...
    async def put_customer(self, customer_id: str, email: str | None) -> None: ...
    async def forget_customer(self, customer_id: str) -> None: ...
    async def list_customers(self) -> list[str]: ...
    async def email_lookup_cached(self, email: str) -> tuple[list[str], datetime] | None: ...
    async def put_email_lookup(
        self, email: str, customer_ids: Sequence[str], checked_at: datetime
    ) -> None: ...

    async def record_event(self, event_id: str, type_: str, created: int) -> bool: ...
    async def has_event(self, event_id: str) -> bool: ...
    async def forget_event(self, event_id: str) -> None: ...

    async def put_login_token(
        self,
        token_hash: str,
        email: str,
        expires_at: datetime,
        now: datetime | None = None,
        *,
        max_live: int | None = None,
        issued_since: datetime | None = None,
    ) -> bool: ...
    async def forget_login_token(self, token_hash: str) -> None: ...
    async def consume_login_token(self, token_hash: str, now: datetime) -> str | None: ...
    async def login_token_email(self, token_hash: str, now: datetime) -> str | None: ...
    async def login_token_fate(self, token_hash: str) -> TokenFate | None: ...
    async def login_tokens_held(
        self, email: str, now: datetime, issued_since: datetime
    ) -> tuple[int, int]: ...
    async def count_recent(self, bucket: str, since: datetime) -> int: ...
    async def hit(self, bucket: str, at: datetime) -> None: ...
    async def hit_if(
        self,
        buckets: Sequence[str],
        since: datetime,
        at: datetime,
        allow: Callable[[Sequence[int]], bool],
    ) -> bool: ...

    async def put_grant(self, customer_or_email: str, until: datetime, note: str) -> None: ...
    async def delete_grant(self, customer_or_email: str) -> bool: ...
    async def get_grant(self, customer_or_email: str) -> Grant | None: ...
    async def list_grants(self) -> list[Grant]: ...

    async def create_session(self, row: SessionRow) -> None: ...
    async def get_session(self, id_hash: str) -> SessionRow | None: ...
    async def touch_session(self, id_hash: str, at: datetime) -> None: ...
    async def revoke_session(self, id_hash: str, at: datetime) -> SessionRow | None: ...
    async def revoke_sessions_of(self, customer_id: str, at: datetime) -> list[str]: ...
    async def active_sessions(self, customer_id: str, now: datetime) -> list[SessionRow]: ...

    async def prune(self, now: datetime) -> int: ...


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


def ent_row(ent: Entitlement) -> tuple[Any, ...]:
    return (
        ent.customer_id,
        ent.status,
        ent.subscription_id,
        ent.price_id,
        ts(ent.period_end),
        int(ent.cancel_at_period_end),
        ts(ent.cancel_at),
        ts(ent.trial_end),
        int(ent.paused),
        ent.source,
        int(ent.event_created),
        need(ent.checked_at),
        need(ent.expires_at),
        ts(ent.period_start),
        ",".join(sorted(ent.features)),
        ",".join(sorted(ent.meters)),
    )


def ent_from(row: Row) -> Entitlement:
    return Entitlement(
        customer_id=row["customer_id"],
        status=row["status"],
        checked_at=dt(row["checked_at"]),
        expires_at=dt(row["expires_at"]),
        subscription_id=row["subscription_id"],
        price_id=row["price_id"],
        period_end=from_unix(row["period_end"]),
        cancel_at_period_end=bool(row["cancel_at_period_end"]),
        cancel_at=from_unix(row["cancel_at"]),
        trial_end=from_unix(row["trial_end"]),
        paused=bool(row["paused"]),
        source=row["source"],
        event_created=int(row["event_created"]),
        period_start=from_unix(row["period_start"]),
        features=frozenset(f for f in row["features"].split(",") if f),
        meters=frozenset(m for m in row["meters"].split(",") if m),
    )


SESSION_COLUMNS = (
    "id_hash, customer_id, email, created_at, last_seen, expires_at, device, revoked_at"
)


def session_from(row: Row) -> SessionRow:
    return SessionRow(
        id_hash=row["id_hash"],
        customer_id=row["customer_id"],
        email=row["email"],
        created_at=dt(row["created_at"]),
        last_seen=dt(row["last_seen"]),
        expires_at=dt(row["expires_at"]),
        device=row["device"],
        revoked_at=from_unix(row["revoked_at"]),
    )


def grant_from(row: Row) -> Grant:
    return Grant(
        subject=row["subject"],
        until=dt(row["until"]),
        note=row["note"],
        created_at=dt(row["created_at"]),
    )


def wrap(op: str, exc: BaseException) -> StoreError:
    """``exc`` (a backend's own error) as the :class:`StoreError` callers handle."""
    if isinstance(exc, StoreError):
        return exc
    err = StoreError(f"store {op} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def session_params(row: SessionRow) -> tuple[Any, ...]:
    """``row`` as the values of ``INSERT INTO sessions (SESSION_COLUMNS)``, in that order."""
    return (
        row.id_hash,
        row.customer_id,
        email_key(row.email) if row.email else None,
        need(row.created_at),
        need(row.last_seen),
        need(row.expires_at),
        row.device,
        ts(row.revoked_at),
    )


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
LIST_GRANTS = "SELECT subject, until, note, created_at FROM grants ORDER BY subject"
