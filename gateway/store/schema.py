"""The schema both store backends share: their migrations, written once with the column
types as parameters (SQLite's ``REAL`` and ``INTEGER`` are PostgreSQL's ``DOUBLE PRECISION``
and ``BIGINT``) and the loop that applies them, the entitlement upsert, and the check that a
stored schema is not newer than this gateway."""

import logging
import re
from collections.abc import Awaitable, Callable, Sequence

from gateway.emails import mailbox_key
from gateway.logs import log_event
from gateway.store.base import ENTITLEMENTS, StoreError, Tx

__all__ = [
    "BACKFILLS",
    "COPIED_TABLES",
    "ENT_UPSERT",
    "LIVE_ONLY",
    "migrate",
    "migrations",
    "migrations_due",
]

log = logging.getLogger("gateway.store")


# The migrations with ``{real}`` and ``{bigint}`` for the column types.
_TEMPLATES: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        """CREATE TABLE customers (
            customer_id TEXT PRIMARY KEY,
            email TEXT,
            updated_at {real} NOT NULL
        )""",
        "CREATE INDEX customers_email ON customers (email)",
        """CREATE TABLE entitlements (
            customer_id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            subscription_id TEXT,
            price_id TEXT,
            period_end {real},
            cancel_at_period_end INTEGER NOT NULL DEFAULT 0,
            cancel_at {real},
            trial_end {real},
            paused INTEGER NOT NULL DEFAULT 0,
            source TEXT NOT NULL,
            event_created {bigint} NOT NULL DEFAULT 0,
            checked_at {real} NOT NULL,
            expires_at {real} NOT NULL
        )""",
        """CREATE TABLE email_lookups (
            email TEXT PRIMARY KEY,
            customer_ids TEXT NOT NULL,
            checked_at {real} NOT NULL
        )""",
        """CREATE TABLE webhook_events (
            event_id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            created {bigint} NOT NULL,
            processed_at {real} NOT NULL
        )""",
        "CREATE INDEX webhook_events_processed ON webhook_events (processed_at)",
        """CREATE TABLE login_tokens (
            token_hash TEXT PRIMARY KEY,
            email TEXT NOT NULL,
            expires_at {real} NOT NULL
        )""",
        """CREATE TABLE hits (
            bucket TEXT NOT NULL,
            at {real} NOT NULL
        )""",
        "CREATE INDEX hits_bucket_at ON hits (bucket, at)",
        """CREATE TABLE grants (
            subject TEXT PRIMARY KEY,
            until {real} NOT NULL,
            note TEXT NOT NULL,
            created_at {real} NOT NULL
        )""",
    ),
    # 2: start of the current period (past_due grace counts from it)
    ("ALTER TABLE entitlements ADD COLUMN period_start {real}",),
    # 3: server-side sessions (the cookie carries a random id; only its hash is kept here)
    (
        """CREATE TABLE sessions (
            id_hash TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            email TEXT,
            created_at {real} NOT NULL,
            last_seen {real} NOT NULL,
            expires_at {real} NOT NULL,
            device TEXT NOT NULL DEFAULT '',
            revoked_at {real}
        )""",
        "CREATE INDEX sessions_customer ON sessions (customer_id, revoked_at)",
    ),
    # 4: the customer's active entitlement features (lookup keys, comma-separated, sorted)
    ("ALTER TABLE entitlements ADD COLUMN features TEXT NOT NULL DEFAULT ''",),
    # 5: short leases: one replica reads Stripe for a cold customer (gateway.store.bus); in
    # SQLite too, so that both backends number alike
    (
        """CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            until {real} NOT NULL
        )""",
    ),
    # 6: when each sign-in token was issued (an address's cool-down), and an address's tokens
    # found without a scan (several live links per address)
    (
        "ALTER TABLE login_tokens ADD COLUMN created_at {real} NOT NULL DEFAULT 0",
        "CREATE INDEX login_tokens_email ON login_tokens (email, expires_at)",
    ),
    # 7: the mailbox an email lands in (gateway.emails.mailbox_key: ``a+x@…`` is ``a@…``),
    # for customers (one free trial per mailbox) and sign-in tokens (the per-address limits
    # count per mailbox); existing rows are backfilled in Python (:data:`BACKFILLS`)
    (
        "ALTER TABLE customers ADD COLUMN mailbox TEXT",
        "CREATE INDEX customers_mailbox ON customers (mailbox)",
        "ALTER TABLE login_tokens ADD COLUMN mailbox TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX login_tokens_mailbox ON login_tokens (mailbox, expires_at)",
    ),
    # teams: a customer's seats, its members (one team per email) and their invitations
    # (only the SHA-256 of an invitation token is kept) — gateway.teams
    (
        """CREATE TABLE teams (
            customer_id TEXT PRIMARY KEY,
            seats INTEGER NOT NULL DEFAULT 1,
            subscription_id TEXT,
            item_id TEXT,
            notice TEXT NOT NULL DEFAULT '',
            updated_at {real} NOT NULL
        )""",
        """CREATE TABLE team_members (
            email TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            state TEXT NOT NULL,
            joined_at {real} NOT NULL,
            last_seen {real},
            reason TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX team_members_customer ON team_members (customer_id, state)",
        """CREATE TABLE team_invitations (
            token_hash TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            email TEXT NOT NULL,
            created_at {real} NOT NULL,
            expires_at {real} NOT NULL,
            used_at {real},
            canceled INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX team_invitations_customer ON team_invitations (customer_id, expires_at)",
    ),
    # API keys (gateway.apikeys): the SHA-256 of each key, never the key; revoked_at may be in
    # the future (a rolled key keeps working until then)
    (
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,
            customer_id TEXT NOT NULL,
            name TEXT NOT NULL,
            start TEXT NOT NULL,
            created_at {real} NOT NULL,
            expires_at {real},
            last_used {real},
            revoked_at {real}
        )""",
        "CREATE INDEX api_keys_customer ON api_keys (customer_id, revoked_at)",
    ),
    # usage quotas and Stripe Meters (gateway.store.usage): units per customer, meter and
    # period (used, and reserved by workers/replicas), the reservations, the outbox of meter
    # events (one row per customer, meter and report window), the app's report ids (dedupe);
    # and the meters (Stripe ids) of the metered prices of a customer's subscriptions
    (
        """CREATE TABLE usage_periods (
            customer_id TEXT NOT NULL,
            meter TEXT NOT NULL,
            period_start {real} NOT NULL,
            period_end {real} NOT NULL,
            quota {bigint} NOT NULL DEFAULT -1,
            used {bigint} NOT NULL DEFAULT 0,
            reserved {bigint} NOT NULL DEFAULT 0,
            updated_at {real} NOT NULL,
            PRIMARY KEY (customer_id, meter, period_start)
        )""",
        """CREATE TABLE usage_reservations (
            holder TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            meter TEXT NOT NULL,
            period_start {real} NOT NULL,
            units {bigint} NOT NULL,
            expires_at {real} NOT NULL,
            PRIMARY KEY (customer_id, meter, period_start, holder)
        )""",
        """CREATE TABLE usage_windows (
            identifier TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            meter TEXT NOT NULL,
            window_start {real} NOT NULL,
            value {bigint} NOT NULL,
            first_at {real} NOT NULL,
            sent_at {real},
            dropped TEXT,
            claimed_by TEXT,
            claimed_until {real}
        )""",
        "CREATE INDEX usage_windows_pending ON usage_windows (sent_at, window_start)",
        """CREATE TABLE usage_reports (
            report_id TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            meter TEXT NOT NULL,
            value {bigint} NOT NULL,
            at {real} NOT NULL
        )""",
        "ALTER TABLE entitlements ADD COLUMN meters TEXT NOT NULL DEFAULT ''",
    ),
)

#: Tables whose rows live only as long as the processes holding them (replicas' leases, a
#: worker's usage reservations): ``gateway migrate --from`` leaves them out.
LIVE_ONLY = frozenset({"leases", "usage_reservations"})

#: The tables ``gateway migrate --from`` copies, in the order the migrations create them.
COPIED_TABLES = tuple(
    name
    for step in _TEMPLATES
    for sql in step
    for name in re.findall(r"^CREATE TABLE (\w+)", sql)
    if name not in LIVE_ONLY
)

#: Rows a migration fills from Python after its statements, in the same transaction: by
#: migration number, (``SELECT key, email``, ``UPDATE … SET mailbox = $1 WHERE key = $2``),
#: the update's ``$1`` being :func:`gateway.emails.mailbox_key` of the row's email — one rule,
#: written once, rather than a copy of it in each backend's SQL dialect.
BACKFILLS: dict[int, tuple[tuple[str, str], ...]] = {
    7: (
        (
            "SELECT customer_id AS key, email FROM customers WHERE email IS NOT NULL",
            "UPDATE customers SET mailbox = $1 WHERE customer_id = $2",
        ),
        (
            "SELECT token_hash AS key, email FROM login_tokens",
            "UPDATE login_tokens SET mailbox = $1 WHERE token_hash = $2",
        ),
    ),
}


def migrations(*, real: str, bigint: str) -> tuple[tuple[str, ...], ...]:
    """The migrations in one backend's types (``real``: a float; ``bigint``: a 64-bit
    integer). Each is a sequence of statements run in one transaction. Append, never edit."""
    return tuple(tuple(sql.format(real=real, bigint=bigint) for sql in m) for m in _TEMPLATES)


def migrations_due(version: int, count: int, where: str) -> range:
    """The numbers of the migrations to run on a schema at ``version``, of ``count``; a
    :class:`StoreError` naming ``where`` if the schema is newer than this gateway."""
    if version > count:
        raise StoreError(
            f"{where}: schema version {version} is newer than this gateway understands "
            f"({count}); upgrade the gateway"
        )
    return range(version + 1, count + 1)


#: ``INSERT`` an entitlement row (:meth:`~gateway.store.base.Table.params` of
#: :data:`~gateway.store.base.ENTITLEMENTS`), or replace the stored one.
ENT_UPSERT = (
    ENTITLEMENTS.insert()
    + " ON CONFLICT (customer_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in ENTITLEMENTS.column_names if c != "customer_id")
)


async def migrate(
    tx: Tx,
    steps: Sequence[Sequence[str]],
    version: int,
    where: str,
    record: Callable[[int], Awaitable[object]],
    **fields: str,
) -> None:
    """Bring a schema at ``version`` up to date inside ``tx`` (which the backend holds so
    that processes opening the store at once run each migration once): each due migration's
    statements, its :data:`BACKFILLS`, then ``record(number)`` storing the new version.
    :class:`StoreError` naming ``where`` if the schema is newer than this gateway."""
    for number in migrations_due(version, len(steps), where):
        for statement in steps[number - 1]:
            await tx.execute(statement)
        for select, update in BACKFILLS.get(number, ()):
            for row in await tx.fetch(select):
                await tx.execute(update, mailbox_key(row["email"]), row["key"])
        await record(number)
        log_event(log, "store_migrated", level=logging.INFO, **fields, version=number)
