"""gateway.store: schema, round trips, ordering, single-use tokens, one writer.

Every test on the ``store`` fixture runs against both backends (SQLite and a real PostgreSQL);
tests of what only SQLite has (WAL, the file, PRAGMA user_version) build a SQLiteStore."""

import asyncio
import multiprocessing
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.store import MIGRATIONS, Backend, SQLiteStore, StoreError
from tests.stores import T0, ent, opened, session_row


@pytest.fixture
def store_clock() -> Callable[[], datetime]:
    """The ``store`` fixture's stores (conftest) run at ``T0``."""
    return lambda: T0


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with opened(SQLiteStore(str(tmp_path / "gate.sqlite3"), clock=lambda: T0)) as s:
        yield s


async def test_migrates_from_empty_and_reopens_idempotently(tmp_path: Path) -> None:
    path = str(tmp_path / "gate.sqlite3")
    s = SQLiteStore(path)
    await s.open()
    assert await s.schema_version() == len(MIGRATIONS)
    await s.put_customer("cus_1", "A@Example.com")
    await s.close()
    for _ in range(2):  # re-open: no migration re-run, data intact
        s = SQLiteStore(path)
        await s.open()
        assert await s.schema_version() == len(MIGRATIONS)
        assert await s.customer_ids_for_email("a@example.com") == ["cus_1"]
        await s.close()
    with sqlite3.connect(path) as raw:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"customers", "entitlements", "webhook_events", "login_tokens", "grants"} <= tables
    assert "sessions" in tables


async def test_migrates_an_older_schema_keeping_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "gate.sqlite3")
    with sqlite3.connect(path) as raw:  # a database left by the first release (version 1)
        for statement in MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute(
            "INSERT INTO entitlements (customer_id, status, source, checked_at, expires_at) "
            "VALUES ('cus_old', 'active', 'stripe', ?, ?)",
            (T0.timestamp(), T0.timestamp() + 60),
        )
        live_until = datetime.now(UTC) + timedelta(hours=1)  # a link mailed before the upgrade
        raw.execute(
            "INSERT INTO login_tokens (token_hash, email, expires_at) VALUES ('tok', 'o@x.org', ?)",
            (live_until.timestamp(),),
        )
        raw.execute("PRAGMA user_version = 1")
    raw.close()
    async with opened(SQLiteStore(path)) as s:
        assert await s.schema_version() == len(MIGRATIONS)
        old = await s.get_entitlement("cus_old")
        assert old is not None and old.status == "active" and old.period_start is None
        assert old.features == frozenset()  # migration 4: no features until read again
        await s.put_entitlement(ent())
        assert await s.get_entitlement("cus_1") == ent()
        # migration 6: the old link counts as held, not as just issued, and still works
        now = datetime.now(UTC)
        assert await s.login_tokens_held("o@x.org", now, now - timedelta(minutes=1)) == (1, 0)
        assert await s.consume_login_token("tok", now) == "o@x.org"


async def test_migration_7_backfills_the_mailboxes_of_existing_rows(tmp_path: Path) -> None:
    """A database of version 6 (before mailboxes): its customers and live sign-in tokens get
    their mailbox key on upgrade, so the per-mailbox limits and the trial check see them."""
    path = str(tmp_path / "gate.sqlite3")
    live_until = datetime.now(UTC) + timedelta(hours=1)
    with sqlite3.connect(path) as raw:
        for migration in MIGRATIONS[:6]:
            for statement in migration:
                raw.execute(statement)
        raw.execute(
            "INSERT INTO customers (customer_id, email, updated_at) VALUES "
            "('cus_a', 'a.lice+old@googlemail.com', 1), ('cus_n', NULL, 1)"
        )
        raw.execute(
            "INSERT INTO login_tokens (token_hash, email, expires_at, created_at) "
            "VALUES ('tok', 'v+1@example.com', ?, 1)",
            (live_until.timestamp(),),
        )
        raw.execute("PRAGMA user_version = 6")
    raw.close()
    async with opened(SQLiteStore(path)) as s:
        assert await s.schema_version() == len(MIGRATIONS) >= 7
        assert await s.customer_ids_for_mailbox("alice@gmail.com") == ["cus_a"]
        now = datetime.now(UTC)
        assert await s.login_tokens_held("v+2@example.com", now, now) == (1, 0)
        assert await s.consume_login_token("tok", now) == "v+1@example.com"


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = str(tmp_path / "gate.sqlite3")
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    s = SQLiteStore(path)
    with pytest.raises(StoreError, match="newer"):
        await s.open()
    await s.close()


async def test_wal_mode_and_busy_timeout(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    assert await sqlite_store.journal_mode() == "wal"
    with sqlite3.connect(tmp_path / "gate.sqlite3") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_entitlement_round_trip(store: Backend) -> None:
    assert await store.get_entitlement("cus_1") is None
    full = ent(
        cancel_at_period_end=True,
        cancel_at=T0 + timedelta(days=3),
        trial_end=T0 + timedelta(days=1),
        paused=True,
        source="webhook",
        event_created=1234,
    )
    await store.put_entitlement(full)
    got = await store.get_entitlement("cus_1")
    assert got == full
    assert got is not None and got.checked_at.tzinfo is not None
    assert got.checked_at.utcoffset() == timedelta(0)
    bare = ent(
        status="none", subscription_id=None, price_id=None, period_end=None, period_start=None
    )
    await store.put_entitlement(bare)
    assert await store.get_entitlement("cus_1") == bare
    await store.delete_entitlement("cus_1")
    assert await store.get_entitlement("cus_1") is None


async def test_naive_datetimes_are_refused(store: Backend) -> None:
    with pytest.raises(ValueError, match="naive"):
        await store.put_entitlement(ent(checked_at=datetime(2030, 1, 1)))


async def test_entitlement_features_round_trip(store: Backend) -> None:
    """Migration 4 (tiers): the active entitlements' lookup keys are stored with the
    entitlement, on both backends."""
    with_features = ent(features=frozenset({"search", "analysis"}))
    await store.put_entitlement(with_features)
    assert await store.get_entitlement("cus_1") == with_features
    assert await store.put_entitlement_if_newer(ent(event_created=5))
    got = await store.get_entitlement("cus_1")
    assert got is not None and got.features == frozenset()


async def test_put_entitlement_if_newer_keeps_event_order(store: Backend) -> None:
    assert await store.put_entitlement_if_newer(ent(status="active", event_created=100))
    assert not await store.put_entitlement_if_newer(ent(status="canceled", event_created=99))
    got = await store.get_entitlement("cus_1")
    assert got is not None and got.status == "active"
    assert await store.put_entitlement_if_newer(ent(status="past_due", event_created=100))
    assert await store.put_entitlement_if_newer(ent(status="canceled", event_created=101))
    got = await store.get_entitlement("cus_1")
    assert got is not None and (got.status, got.event_created) == ("canceled", 101)


async def test_put_entitlement_strictly_newer_refuses_the_same_second(store: Backend) -> None:
    assert await store.put_entitlement_if_newer(ent(status="canceled", event_created=100))
    same = ent(status="active", event_created=100)
    assert not await store.put_entitlement_if_newer(same, strictly=True)
    got = await store.get_entitlement("cus_1")
    assert got is not None and got.status == "canceled"
    newer = ent(status="active", event_created=101)
    assert await store.put_entitlement_if_newer(newer, strictly=True)


async def test_customers_and_email_lookups(store: Backend) -> None:
    await store.put_email_lookup("Nobody@Example.com", [], T0)
    assert await store.email_lookup_cached("nobody@example.com") == ([], T0)
    assert await store.email_lookup_cached("other@example.com") is None

    await store.put_customer("cus_1", "Nobody@Example.com")
    assert await store.customer_ids_for_email("NOBODY@example.com") == ["cus_1"]
    # learning a customer for the email drops the negative lookup
    assert await store.email_lookup_cached("nobody@example.com") is None
    await store.put_customer("cus_1", None)  # no email given: the known one stays
    assert await store.customer_ids_for_email("nobody@example.com") == ["cus_1"]

    await store.put_entitlement(ent("cus_2"))
    assert await store.list_customers() == ["cus_1", "cus_2"]

    await store.put_entitlement(ent("cus_1"))
    await store.put_email_lookup("nobody@example.com", ["cus_1"], T0)
    await store.forget_customer("cus_1")
    assert await store.customer_ids_for_email("nobody@example.com") == []
    assert await store.get_entitlement("cus_1") is None
    assert await store.email_lookup_cached("nobody@example.com") is None
    assert await store.list_customers() == ["cus_2"]


async def test_customers_of_one_mailbox(store: Backend) -> None:
    """:meth:`customer_ids_for_mailbox`: every customer whose email lands in the same inbox
    (``gateway.emails.mailbox_key``), most recent first; other mailboxes stay apart."""
    await store.put_customer("cus_1", "alice+1@example.com")
    await store.put_customer("cus_2", "Alice@Example.com")
    await store.put_customer("cus_3", "alice.b@example.com")
    await store.put_customer("cus_4", "a.l.ice@googlemail.com")
    await store.put_customer("cus_5", None)
    found = await store.customer_ids_for_mailbox("alice+2@example.com")
    assert sorted(found) == ["cus_1", "cus_2"]
    assert await store.customer_ids_for_mailbox("alice.b+x@example.com") == ["cus_3"]
    assert await store.customer_ids_for_mailbox("ali.ce+z@gmail.com") == ["cus_4"]
    assert await store.customer_ids_for_email("alice@example.com") == ["cus_2"]  # exact
    await store.put_customer("cus_1", None)  # no email given: the known mailbox stays
    assert "cus_1" in await store.customer_ids_for_mailbox("alice@example.com")
    await store.forget_customer("cus_2")
    assert await store.customer_ids_for_mailbox("alice@example.com") == ["cus_1"]


async def test_login_tokens_of_one_mailbox_count_together(store: Backend) -> None:
    later = T0 + timedelta(minutes=15)
    assert await store.put_login_token("t1", "v+1@example.com", later, T0)
    assert await store.put_login_token("t2", "V+2@example.com", later, T0)
    assert await store.login_tokens_held("v@example.com", T0, T0 - timedelta(1)) == (2, 2)
    assert await store.login_tokens_held("v+9@example.com", T0, T0 - timedelta(1)) == (2, 2)
    assert await store.login_tokens_held("w@example.com", T0, T0 - timedelta(1)) == (0, 0)
    # the conditional write counts the mailbox too
    assert not await store.put_login_token("t3", "v+3@example.com", later, T0, max_live=2)
    assert await store.put_login_token("t3", "w+3@example.com", later, T0, max_live=2)
    # a token still signs in the exact address it was sent to
    assert await store.consume_login_token("t2", T0) == "v+2@example.com"
    assert await store.login_token_email("t1", T0) == "v+1@example.com"


async def test_event_dedupe(store: Backend) -> None:
    assert not await store.has_event("evt_1")
    assert await store.record_event("evt_1", "invoice.paid", 100)
    assert await store.has_event("evt_1")
    assert not await store.record_event("evt_1", "invoice.paid", 100)
    assert await store.record_event("evt_2", "invoice.paid", 101)
    await store.forget_event("evt_1")
    assert await store.record_event("evt_1", "invoice.paid", 100)


async def test_login_token_single_use(store: Backend) -> None:
    await store.put_login_token("h1", "User@Example.com", T0 + timedelta(minutes=15))
    assert await store.consume_login_token("h1", T0) == "user@example.com"
    assert await store.consume_login_token("h1", T0) is None
    assert await store.consume_login_token("missing", T0) is None


async def test_login_token_email_reads_without_using_it(store: Backend) -> None:
    await store.put_login_token("h4", "Peek@Example.com", T0 + timedelta(minutes=15))
    for _ in range(2):  # a mail scanner, then the user
        assert await store.login_token_email("h4", T0) == "peek@example.com"
    assert await store.login_token_email("h4", T0 + timedelta(minutes=15)) is None  # expired
    assert await store.login_token_email("missing", T0) is None
    assert await store.consume_login_token("h4", T0) == "peek@example.com"
    assert await store.login_token_email("h4", T0) is None  # used


async def test_login_token_expiry(store: Backend) -> None:
    await store.put_login_token("h2", "u@example.com", T0 + timedelta(minutes=15))
    assert await store.consume_login_token("h2", T0 + timedelta(minutes=15)) is None
    # expired tokens are consumed too (never usable later with a skewed clock)
    assert await store.consume_login_token("h2", T0) is None


async def test_login_token_consumed_once_under_concurrency(store: Backend) -> None:
    await store.put_login_token("h3", "u@example.com", T0 + timedelta(minutes=15))
    results = await asyncio.gather(*(store.consume_login_token("h3", T0) for _ in range(20)))
    assert results.count("u@example.com") == 1
    assert results.count(None) == 19


async def test_login_tokens_of_an_address_live_side_by_side(store: Backend) -> None:
    later = T0 + timedelta(minutes=15)
    for i, at in enumerate((T0, T0 + timedelta(seconds=30), T0 + timedelta(seconds=90))):
        assert await store.put_login_token(f"t{i}", "U@example.com", at + timedelta(minutes=15), at)
    now = T0 + timedelta(seconds=90)
    assert await store.login_tokens_held("u@example.com", now, now - timedelta(seconds=61)) == (
        3,
        2,
    )
    assert await store.login_tokens_held("u@example.com", later, now) == (2, 0)
    assert await store.login_tokens_held("other@example.com", now, T0) == (0, 0)
    # conditional: refused at the bound, or with one issued after issued_since
    assert not await store.put_login_token(
        "t3", "u@example.com", later, now, max_live=3, issued_since=T0 - timedelta(minutes=1)
    )
    assert not await store.put_login_token(
        "t3", "u@example.com", later, now, max_live=9, issued_since=T0 + timedelta(seconds=60)
    )
    assert await store.put_login_token(
        "t3", "u@example.com", later, now, max_live=4, issued_since=now
    )
    for i in range(4):  # none replaced another
        assert await store.consume_login_token(f"t{i}", now) == "u@example.com"
    # a token forgotten (never delivered) leaves no mark
    await store.put_login_token("t9", "u@example.com", later, now)
    await store.forget_login_token("t9")
    assert await store.consume_login_token("t9", now) is None
    assert await store.login_token_fate("t9") is None


async def test_hit_if_counts_and_hits_atomically(store: Backend) -> None:
    def below(limit: int) -> Callable[[Sequence[int]], bool]:
        return lambda counts: counts[0] < limit

    results = await asyncio.gather(
        *(store.hit_if(("cap", f"net:{i % 3}"), T0, T0, below(7)) for i in range(30))
    )
    assert results.count(True) == 7
    assert await store.count_recent("cap", T0) == 7
    assert sum([await store.count_recent(f"net:{i}", T0) for i in range(3)]) == 7
    seen: list[list[int]] = []

    def record(counts: Sequence[int]) -> bool:
        seen.append(list(counts))
        return False

    assert not await store.hit_if(("cap", "net:0"), T0, T0, record)
    assert seen[0][0] == 7 and await store.count_recent("cap", T0) == 7  # refused: no hit
    assert await store.hit_if(("cap",), T0, T0, below(8))
    assert not await store.hit_if(("cap",), T0, T0, below(8))
    later = T0 + timedelta(minutes=1)  # only hits since ``since`` count
    assert await store.hit_if(("cap",), later, later, below(1))


async def test_hits_and_count_recent(store: Backend) -> None:
    for minutes in (0, 5, 10, 20):
        await store.hit("email:u@example.com", T0 + timedelta(minutes=minutes))
    await store.hit("ip:127.0.0.1", T0)
    since = T0 + timedelta(minutes=20) - timedelta(minutes=15)
    assert await store.count_recent("email:u@example.com", since) == 3
    assert await store.count_recent("ip:127.0.0.1", since) == 0
    assert await store.count_recent("ip:127.0.0.1", T0) == 1
    # a day later the old hits of the bucket are pruned as new ones arrive
    await store.hit("email:u@example.com", T0 + timedelta(days=2))
    assert await store.count_recent("email:u@example.com", T0 - timedelta(days=1)) == 1


async def test_grants(store: Backend) -> None:
    assert await store.get_grant("cus_1") is None
    await store.put_grant("cus_1", T0 + timedelta(days=7), "beta tester")
    await store.put_grant("VIP@Example.com", T0 + timedelta(days=1), "press")
    grant = await store.get_grant("cus_1")
    assert grant is not None
    assert (grant.until, grant.note, grant.created_at) == (
        T0 + timedelta(days=7),
        "beta tester",
        T0,
    )
    by_mail = await store.get_grant("vip@example.com")
    assert by_mail is not None and by_mail.subject == "vip@example.com"
    assert [g.subject for g in await store.list_grants()] == ["cus_1", "vip@example.com"]
    assert await store.delete_grant("cus_1")
    assert not await store.delete_grant("cus_1")
    assert await store.get_grant("cus_1") is None


async def test_prune(store: Backend) -> None:
    await store.put_login_token("old", "u@example.com", T0 - timedelta(minutes=1))
    await store.put_login_token("new", "u@example.com", T0 + timedelta(minutes=1))
    await store.hit("b", T0 - timedelta(days=2))
    assert await store.prune(T0) == 2
    assert await store.consume_login_token("new", T0) == "u@example.com"


async def test_concurrent_writes_never_fail(store: Backend) -> None:
    async def writer(i: int) -> None:
        await store.put_entitlement(ent(f"cus_{i % 50}", event_created=i))
        await store.record_event(f"evt_{i}", "invoice.paid", i)
        await store.hit("bucket", T0)
        await store.put_customer(f"cus_{i % 50}", f"user{i % 50}@example.com")

    await asyncio.gather(*(writer(i) for i in range(500)))
    assert await store.count_recent("bucket", T0) == 500
    assert len(await store.list_customers()) == 50


async def test_two_stores_on_one_file_do_not_lock(tmp_path: Path) -> None:
    """Two writers (as with two worker processes or the CLI) wait on busy_timeout, never fail."""
    path = str(tmp_path / "gate.sqlite3")
    a, b = SQLiteStore(path), SQLiteStore(path)
    await a.open()
    await b.open()
    try:
        await asyncio.gather(
            *(
                (a if i % 2 else b).put_entitlement(ent(f"cus_{i}", event_created=i))
                for i in range(200)
            ),
            *(b.get_entitlement(f"cus_{i}") for i in range(200)),
        )
        assert len(await a.list_customers()) == 200
    finally:
        await a.close()
        await b.close()


#: Processes and rounds of :func:`test_processes_opening_one_new_file_at_once_all_succeed`.
_OPENERS = 4
_ROUNDS = 200


async def _open_and_close(path: str) -> str:
    store = SQLiteStore(path)
    try:
        await store.open()
    except StoreError as exc:
        return str(exc)
    await store.close()
    return "ok"


def _open_rounds(
    paths: list[str],
    barrier: "multiprocessing.synchronize.Barrier",
    out: "multiprocessing.Queue[list[str]]",
) -> None:
    """One of the processes of the test below: open (and close) each new file in turn, every
    process at the same moment (the barrier), as the workers of a cold start do."""
    results = []
    for path in paths:
        barrier.wait(timeout=60)
        results.append(asyncio.run(_open_and_close(path)))
    out.put(results)


def test_processes_opening_one_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Switching a new file to WAL takes an exclusive lock without waiting on busy_timeout
    (SQLite's pager does not call the busy handler there): several processes opening one new
    file at once — the workers of a cold start — got "database is locked" (a few rounds in a
    hundred here). Each round: a new file, ``_OPENERS`` processes released together."""
    paths = [str(tmp_path / f"cold-{i}.sqlite3") for i in range(_ROUNDS)]
    ctx = multiprocessing.get_context("spawn")  # not fork: this process runs an event loop
    barrier = ctx.Barrier(_OPENERS)
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_open_rounds, args=(paths, barrier, out)) for _ in range(_OPENERS)]
    for proc in procs:
        proc.start()
    try:
        results = [out.get(timeout=300) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.exitcode is None:
                proc.kill()
    failures = [r for rs in results for r in rs if r != "ok"]
    assert not failures, f"{len(failures)} of {_OPENERS * _ROUNDS} opens failed: {failures[:3]}"
    for path in paths:
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert raw.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_cancelled_writer_call_does_not_break_the_store(store: Backend) -> None:
    tasks = [asyncio.create_task(store.put_entitlement(ent(f"cus_{i}"))) for i in range(50)]
    await asyncio.sleep(0)
    for t in tasks[::2]:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
    await store.put_entitlement(ent("cus_after"))
    assert await store.get_entitlement("cus_after") is not None
    assert await store.check_writable()


async def test_restart_keeps_state(tmp_path: Path) -> None:
    path = str(tmp_path / "gate.sqlite3")
    s = SQLiteStore(path, clock=lambda: T0)
    await s.open()
    await s.put_entitlement(ent())
    await s.record_event("evt_1", "invoice.paid", 1)
    await s.put_grant("cus_1", T0 + timedelta(days=1), "x")
    await s.close()
    s = SQLiteStore(path, clock=lambda: T0)
    await s.open()
    try:
        assert await s.get_entitlement("cus_1") == ent()
        assert not await s.record_event("evt_1", "invoice.paid", 1)
        assert await s.get_grant("cus_1") is not None
    finally:
        await s.close()


async def test_check_writable_and_closed_store(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "gate.sqlite3"))
    assert not await s.check_writable()
    await s.open()
    assert await s.check_writable()
    await s.close()
    assert not await s.check_writable()
    with pytest.raises(StoreError):
        await s.get_entitlement("cus_1")
    with pytest.raises(StoreError):
        await s.put_entitlement(ent())
    await s.close()  # idempotent


async def test_database_path_deleted_while_open_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "gate.sqlite3"
    s = SQLiteStore(str(path))
    await s.open()
    try:
        assert await s.file_problem() is None
        path.unlink()  # SQLite would go on writing to the deleted file
        problem = await s.file_problem()
        assert problem is not None and "deleted" in problem and str(path) in problem
        assert not await s.check_writable()
    finally:
        await s.close()


async def test_database_path_replaced_while_open_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "gate.sqlite3"
    s = SQLiteStore(str(path))
    await s.open()
    other = SQLiteStore(str(tmp_path / "other.sqlite3"))
    await other.open()
    await other.close()
    try:
        (tmp_path / "other.sqlite3").replace(path)  # e.g. a restore copied over it
        problem = await s.file_problem()
        assert problem is not None and "replaced" in problem
        assert not await s.check_writable()
    finally:
        await s.close()


async def test_unwritable_directory_is_a_store_error(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "missing-dir" / "gate.sqlite3"))
    with pytest.raises(StoreError, match="cannot open"):
        await s.open()


async def test_in_memory_store() -> None:
    s = SQLiteStore(":memory:", clock=lambda: T0)
    await s.open()
    try:
        await s.put_entitlement(ent())
        assert await s.get_entitlement("cus_1") == ent()
        assert await s.check_writable()
    finally:
        await s.close()


# --- sessions


async def test_sessions_round_trip_touch_revoke_and_prune(store: Backend) -> None:
    await store.create_session(session_row("h1"))
    await store.create_session(session_row("h2", last_seen=T0 + timedelta(minutes=1)))
    await store.create_session(session_row("h3", customer_id="cus_2"))
    with pytest.raises(StoreError):  # an id is never reused
        await store.create_session(session_row("h1"))
    row = await store.get_session("h1")
    assert row is not None and row.email == "a@example.com" and row.active(T0)
    assert not row.active(T0 + timedelta(days=30))  # its lifetime is over
    # last_seen only moves forward
    await store.touch_session("h1", T0 + timedelta(minutes=5))
    await store.touch_session("h1", T0 + timedelta(minutes=2))
    row = await store.get_session("h1")
    assert row is not None and row.last_seen == T0 + timedelta(minutes=5)
    assert [r.id_hash for r in await store.active_sessions("cus_1", T0)] == ["h1", "h2"]

    revoked = await store.revoke_session("h1", T0 + timedelta(hours=1))
    assert revoked is not None and revoked.customer_id == "cus_1"
    assert await store.revoke_session("h1", T0 + timedelta(hours=2)) is None  # once
    row = await store.get_session("h1")
    assert row is not None and row.revoked_at == T0 + timedelta(hours=1) and not row.active(T0)
    await store.touch_session("h1", T0 + timedelta(hours=3))  # a revoked session is not touched
    row = await store.get_session("h1")
    assert row is not None and row.last_seen == T0 + timedelta(minutes=5)

    assert await store.revoke_sessions_of("cus_1", T0) == ["h2"]
    assert await store.active_sessions("cus_1", T0) == []
    assert [r.id_hash for r in await store.active_sessions("cus_2", T0)] == ["h3"]
    # Past their lifetime, sessions (revoked or not) are pruned.
    assert await store.prune(T0 + timedelta(days=31)) >= 3
    assert await store.get_session("h1") is None and await store.get_session("h3") is None
