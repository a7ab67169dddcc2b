"""The PostgreSQL backend as several replicas see it: two store instances (two pools, as two
gate processes have) on one real database; migrations under a race; faults (server stopped,
unresponsive, locked); the password hidden everywhere; ``gateway migrate`` and the SQLite copy."""

import asyncio
import random
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from gateway.cli import main
from gateway.dburl import parse_database_url
from gateway.store import MIGRATIONS, PG_MIGRATIONS, PostgresStore, SQLiteStore, StoreError
from gateway.store.schema import COPIED_TABLES, LIVE_ONLY
from gateway.store.usage import PeriodKey, UsageSQL
from tests.conftest import closed_port, make_settings
from tests.postgres import PostgresServer
from tests.stores import T0, ent, opened, session_row

pytestmark = pytest.mark.timeout(120)


def pg(url: str, **kw: float) -> PostgresStore:
    return PostgresStore(parse_database_url(url), clock=lambda: T0, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database: what two gate replicas hold."""
    a, b = pg(pg_url), pg(pg_url)
    await asyncio.gather(a.open(), b.open())  # both migrate at once: the advisory lock
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def alternating(replicas: tuple[PostgresStore, PostgresStore], n: int) -> list[PostgresStore]:
    """``n`` stores taking turns between the two replicas: where ``n`` concurrent calls spread
    over two gate processes land."""
    a, b = replicas
    return [a if k % 2 else b for k in range(n)]


async def test_concurrent_newer_wins_writes_from_two_replicas_never_end_older(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    rng = random.Random(7)
    for strictly in (False, True):
        for round_ in range(20):
            customer = f"cus_{strictly}_{round_}"
            created = list(range(1, 41))
            rng.shuffle(created)
            stores = alternating(replicas, len(created))
            results = await asyncio.gather(
                *(
                    store.put_entitlement_if_newer(
                        ent(customer, status=f"s{n}", event_created=n), strictly=strictly
                    )
                    for store, n in zip(stores, created, strict=True)
                )
            )
            got = await a.get_entitlement(customer)
            assert got is not None and (got.event_created, got.status) == (40, "s40")
            assert any(results)
            # The state read by the other replica is the same newest one.
            assert await b.get_entitlement(customer) == got


async def test_same_event_on_two_replicas_is_recorded_once(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    stores = alternating(replicas, 6)
    for i in range(30):
        event = f"evt_{i}"
        results = await asyncio.gather(*(s.record_event(event, "invoice.paid", i) for s in stores))
        assert results.count(True) == 1, results


async def test_one_token_consumed_on_two_replicas_gives_one_email(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    stores = alternating(replicas, 8)
    for i in range(20):
        token = f"h{i}"
        await a.put_login_token(token, "u@example.com", T0 + timedelta(minutes=15))
        results = await asyncio.gather(*(s.consume_login_token(token, T0) for s in stores))
        assert results.count("u@example.com") == 1, results
        assert results.count(None) == 7
        assert await b.login_token_fate(token) == "used"


async def test_rate_limits_grants_and_sessions_are_shared(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    await asyncio.gather(*(s.hit("ip:1", T0) for s in alternating(replicas, 10)))
    assert await a.count_recent("ip:1", T0) == 10
    await a.put_grant("vip@example.com", T0 + timedelta(days=1), "press")
    grant = await b.get_grant("VIP@example.com")
    assert grant is not None and grant.note == "press"
    await a.create_session(session_row("sid"))
    revoked = await b.revoke_session("sid", T0)
    assert revoked is not None
    row = await a.get_session("sid")
    assert row is not None and not row.active(T0)


async def test_migrations_are_idempotent_and_raced_safely(pg_url: str) -> None:
    stores = [pg(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))  # four replicas start at once
    try:
        for s in stores:
            assert await s.schema_version() == len(PG_MIGRATIONS)
        await stores[0].put_customer("cus_1", "a@example.com")
    finally:
        for s in stores:
            await s.close()
    again = pg(pg_url)
    await again.open()  # re-opening applies nothing and keeps the rows
    try:
        assert await again.schema_version() == len(PG_MIGRATIONS)
        assert await again.customer_ids_for_email("a@example.com") == ["cus_1"]
        versions = await again._run(
            "t", lambda c: c.fetch("SELECT version FROM schema_version ORDER BY version")
        )
        assert [r["version"] for r in versions] == list(range(1, len(PG_MIGRATIONS) + 1))
    finally:
        await again.close()


async def test_migration_7_backfills_the_mailboxes_of_existing_rows(pg_url: str) -> None:
    """A PostgreSQL database at version 6: existing customers and sign-in tokens get their
    mailbox key when a gate of version 7 opens it."""
    conn = await asyncpg.connect(pg_url)
    try:
        async with conn.transaction():
            await conn.execute(
                "CREATE TABLE schema_version ("
                "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            for number, migration in enumerate(PG_MIGRATIONS[:6], start=1):
                for statement in migration:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_version VALUES ($1, 0)", number)
            await conn.execute(
                "INSERT INTO customers (customer_id, email, updated_at) VALUES "
                "('cus_a', 'alice+old@example.com', 1), ('cus_n', NULL, 1)"
            )
            await conn.execute(
                "INSERT INTO login_tokens (token_hash, email, expires_at, created_at) "
                "VALUES ('tok', 'v.i+1@gmail.com', $1, 1)",
                T0.timestamp() + 3600,
            )
    finally:
        await conn.close()
    store = pg(pg_url)
    await store.open()
    try:
        assert await store.schema_version() == len(PG_MIGRATIONS) >= 7
        assert await store.customer_ids_for_mailbox("alice@example.com") == ["cus_a"]
        assert await store.login_tokens_held("vi@googlemail.com", T0, T0) == (1, 0)
        assert await store.consume_login_token("tok", T0) == "v.i+1@gmail.com"
    finally:
        await store.close()


async def test_refuses_a_newer_schema(pg_url: str) -> None:
    s = pg(pg_url)
    await s.open()
    await s._run(
        "t",
        lambda c: c.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, 0)",
            len(PG_MIGRATIONS) + 1,
        ),
    )
    await s.close()
    with pytest.raises(StoreError, match="newer"):
        await pg(pg_url).open()


# --- faults


async def test_server_down_fails_fast_and_the_pool_reconnects(
    pg_url: str, pg_server: PostgresServer
) -> None:
    s = pg(pg_url, connect_timeout=2.0, command_timeout=2.0)
    await s.open()
    try:
        await s.put_entitlement(ent())
        await asyncio.to_thread(pg_server.stop)
        try:
            for _ in range(3):
                with pytest.raises(StoreError):
                    await s.get_entitlement("cus_1")
                with pytest.raises(StoreError):
                    await s.put_entitlement(ent("cus_2"))
            problem = await s.readiness()
            assert problem is not None and "unreachable" in problem
            assert not await s.check_writable()
        finally:
            await asyncio.to_thread(pg_server.start)
        # Back: the same store (no restart of the gate) works again.
        assert await s.get_entitlement("cus_1") == ent()
        await s.put_entitlement(ent("cus_2"))
        assert await s.readiness() is None
    finally:
        await s.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


async def test_an_unresponsive_server_is_a_store_error_not_a_hang(silent_port: int) -> None:
    url = f"postgresql://gate:hunter2-pw@127.0.0.1:{silent_port}/gate"
    s = pg(url, connect_timeout=0.5, command_timeout=0.5)
    with pytest.raises(StoreError) as caught:
        await s.open()
    message = str(caught.value)
    assert "DATABASE_URL=postgresql://gate:***@127.0.0.1" in message
    assert "hunter2-pw" not in message and "hunter2-pw" not in repr(s)
    assert "\n" not in message


async def test_a_slow_statement_is_bounded_by_command_timeout(pg_url: str) -> None:
    s = pg(pg_url, connect_timeout=2.0, command_timeout=0.5)
    holder = pg(pg_url)
    await s.open()
    await holder.open()
    locked = asyncio.Event()
    release = asyncio.Event()

    async def hold(c: object) -> None:
        async with c.transaction():  # type: ignore[attr-defined]
            await c.execute("LOCK TABLE entitlements IN ACCESS EXCLUSIVE MODE")  # type: ignore[attr-defined]
            locked.set()
            await release.wait()

    task = asyncio.create_task(holder._run("hold", hold))
    try:
        await locked.wait()
        with pytest.raises(StoreError):
            await s.get_entitlement("cus_1")
    finally:
        release.set()
        await task
    await s.put_entitlement(ent())  # the pool is usable afterwards
    assert await s.get_entitlement("cus_1") == ent()
    await s.close()
    await holder.close()


def test_settings_never_show_the_password() -> None:
    settings = make_settings({"DATABASE_URL": "postgresql://gate:hunter2-pw@db:5432/gate"})
    assert "hunter2-pw" not in repr(settings)
    from gateway.settings import SettingsError

    with pytest.raises(SettingsError) as caught:
        make_settings({"DATABASE_URL": "postgresql://gate:hunter2-pw@db:notaport/gate"})
    assert "DATABASE_URL" in str(caught.value) and "hunter2-pw" not in str(caught.value)
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        make_settings({"DATABASE_URL": "mysql://gate:hunter2-pw@db/gate"})


# --- gateway migrate


def test_migrate_applies_the_schema_and_prints_the_version(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    assert main(["migrate"]) == 0
    assert main(["migrate"]) == 0  # idempotent
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{pg_url}: schema version {len(PG_MIGRATIONS)}"] * 2
    monkeypatch.setenv("DATABASE_URL", f"sqlite://{tmp_path / 'gate.sqlite3'}")
    assert main(["migrate"]) == 0
    assert f"schema version {len(MIGRATIONS)}" in capsys.readouterr().out


_PERIOD = PeriodKey("cus_1", "mtr_1", T0.timestamp(), T0.timestamp() + 86400)


async def _fill_sqlite(path: str) -> None:
    s = SQLiteStore(path, clock=lambda: T0)
    await s.open()
    try:
        await s.put_customer("cus_1", "a@example.com")
        await s.put_customer("cus_2", None)
        await s.put_entitlement(ent("cus_1", event_created=5))
        await s.put_email_lookup("nobody@example.com", [], T0)
        await s.record_event("evt_1", "invoice.paid", 5)
        await s.put_login_token("tok", "a@example.com", T0 + timedelta(days=3650))
        await s.hit("ip:1", T0 + timedelta(days=3650))
        await s.put_grant("vip@example.com", T0 + timedelta(days=1), "press")
        await s.create_session(session_row("sid", expires_at=T0 + timedelta(days=3650)))
        await UsageSQL(s).report("rep_1", _PERIOD, 3, T0.timestamp(), 60.0)  # composite keys
    finally:
        await s.close()


async def _check_postgres(url: str) -> None:
    s = pg(url)
    await s.open()
    try:
        assert await s.customer_ids_for_email("a@example.com") == ["cus_1"]
        assert await s.list_customers() == ["cus_1", "cus_2"]
        assert await s.get_entitlement("cus_1") == ent("cus_1", event_created=5)
        assert await s.email_lookup_cached("nobody@example.com") == ([], T0)
        assert not await s.record_event("evt_1", "invoice.paid", 5)
        assert await s.consume_login_token("tok", T0) == "a@example.com"
        assert await s.count_recent("ip:1", T0) == 1
        grant = await s.get_grant("vip@example.com")
        assert grant is not None and grant.note == "press"
        session = await s.get_session("sid")
        assert session is not None and session.customer_id == "cus_1"
        assert [p.used for p in await UsageSQL(s).periods_of("cus_1", T0.timestamp())] == [3]
    finally:
        await s.close()


def test_migrate_copies_sqlite_into_postgres_idempotently(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "gate.sqlite3")
    asyncio.run(_fill_sqlite(path))
    with sqlite3.connect(path) as raw:
        before = raw.execute("SELECT COUNT(*) FROM customers").fetchone()[0]
    raw.close()
    argv = ["migrate", "--from", f"sqlite://{path}", "--to", pg_url]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "customers" in first and "2 in source, 2 added, 2 now" in first
    assert main(argv) == 0  # again: nothing duplicated
    second = capsys.readouterr().out
    copied = ("customers", "entitlements", "webhook_events", "grants", "sessions", "hits")
    for table in (*copied, "usage_periods", "usage_windows", "usage_reports"):
        line = next(x for x in second.splitlines() if x.startswith(table))
        assert ", 0 added," in line, line
    assert "2 in source, 0 added, 2 now" in second
    with sqlite3.connect(path) as raw:  # the source is left as it was
        assert raw.execute("SELECT COUNT(*) FROM customers").fetchone()[0] == before
    raw.close()
    asyncio.run(_check_postgres(pg_url))


async def test_migrate_copies_every_table_but_the_live_only_ones(tmp_path: Path) -> None:
    """A table a migration creates is copied without being listed anywhere else; only the
    live-only ones (leases, usage reservations) stay behind."""
    path = tmp_path / "gate.sqlite3"
    async with opened(SQLiteStore(str(path))):
        pass  # migrated
    with sqlite3.connect(path) as raw:
        query = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        tables = {r[0] for r in raw.execute(query)}
    raw.close()
    assert set(COPIED_TABLES) == tables - LIVE_ONLY
    assert tables >= LIVE_ONLY and "hits" in COPIED_TABLES


def test_migrate_copy_hides_the_password_and_refuses_bad_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "gate.sqlite3")
    asyncio.run(_fill_sqlite(path))
    target = f"postgresql://gate:hunter2-pw@127.0.0.1:{closed_port()}/gate"
    assert main(["migrate", "--from", f"sqlite://{path}", "--to", target]) == 1
    err = capsys.readouterr().err
    assert "DATABASE_URL=postgresql://gate:***@" in err and "hunter2-pw" not in err
    assert main(["migrate", "--from", "mysql://x:hunter2-pw@h/db", "--to", target]) == 2
    err = capsys.readouterr().err
    assert "--from" in err and "hunter2-pw" not in err
