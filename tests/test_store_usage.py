"""The usage tables' SQL on both backends: reservations never exceed the quota (several holders
at once), a dead holder's reservation comes back, flushes move units into ``used`` and the
outbox, one sender claims a row, and an app's report id counts once."""

import asyncio

from gateway.model import ManualClock
from gateway.store import Backend
from gateway.store.usage import Delta, PeriodKey, UsageSQL, window_identifier
from gateway.usage.counters import MAX_BLOCK, Counters

T = 1_800_000_000.0
KEY = PeriodKey("cus_1", "analysis", T - 1000, T + 1000)


async def test_concurrent_reservations_never_pass_the_quota(store: Backend) -> None:
    sql = UsageSQL(store)

    async def take(holder: str) -> int:
        got = 0
        while True:
            granted, _ = await sql.reserve(holder, KEY, 50, 7, T, 30)
            if not granted:
                return got
            got += granted

    got = await asyncio.gather(*(take(f"h{i}") for i in range(5)))
    assert sum(got) == 50
    _, row = await sql.reserve("late", KEY, 50, 1, T, 30)
    assert (row.used, row.reserved, row.quota) == (0, 50, 50)


async def test_a_dead_holders_reservation_comes_back_after_it_expires(store: Backend) -> None:
    sql = UsageSQL(store)
    assert (await sql.reserve("dead", KEY, 10, 10, T, 30))[0] == 10
    assert (await sql.reserve("alive", KEY, 10, 1, T + 29, 30))[0] == 0
    granted, row = await sql.reserve("alive", KEY, 10, 4, T + 31, 30)
    assert granted == 4 and row.reserved == 4


async def test_a_flush_moves_units_to_used_and_the_outbox(store: Backend) -> None:
    sql = UsageSQL(store)
    await sql.reserve("h", KEY, 10, 5, T, 30)
    rows = await sql.flush("h", [Delta(KEY, spent=3, from_reserved=3, give_back=2)], T, 30, 60, {})
    assert (rows[KEY].used, rows[KEY].reserved) == (3, 0)
    windows = await sql.claim_windows("s1", T + 100, T + 100, 60, 10)
    assert [(w.value, w.identifier) for w in windows] == [
        (3, window_identifier("cus_1", "analysis", T - T % 60))
    ]
    # Claimed: another sender gets nothing, and a flush meanwhile goes to the next window.
    assert await sql.claim_windows("s2", T + 100, T + 100, 60, 10) == []
    await sql.flush("h", [Delta(KEY, spent=1)], T + 1, 30, 60, {})
    await sql.finish_window("s1", windows[0].identifier, T + 100, sent=True)
    later = await sql.claim_windows("s2", T + 200, T + 200, 60, 10)
    assert [w.value for w in later] == [1] and later[0].window_start == T - T % 60 + 60
    assert await sql.pending_windows() == 1
    totals = await sql.window_totals(T - 1000, T + 1000)
    assert totals == {("cus_1", "analysis"): (4, 3)}


async def test_a_report_id_counts_once(store: Backend) -> None:
    sql = UsageSQL(store)
    row = await sql.report("r1", KEY, 5, T, 60)
    assert row is not None and row.used == 5
    assert await sql.report("r1", KEY, 5, T, 60) is None
    assert [r.used for r in await sql.periods_of("cus_1", T)] == [5]


async def test_a_busy_counter_reserves_its_next_block_before_it_runs_out(store: Backend) -> None:
    """Far from the quota, the next block is reserved in the background once half of the last
    one is spent: the requests of a busy customer never wait on the store (the bench's metered
    target), and what is held still never passes the quota."""
    sql = UsageSQL(store)
    counters = Counters(sql, ManualClock(T), 1.0, 60.0)
    c = counters.counter(KEY, 100_000, False)
    assert (await counters.admit(c)).allowed  # the first block: a tenth of what is left
    first = c.block
    assert first == MAX_BLOCK and c.held == first - 1
    for _ in range(first // 2 + 1):
        assert counters.admit_now(c) is not None  # from memory, never None: held never empty
    await counters.settle()
    assert c.held > first // 2 and c.block == MAX_BLOCK
    _, row = await sql.reserve("other", KEY, 100_000, 0, T, 30)
    assert row.reserved == 2 * first
    assert row.used + row.reserved <= 100_000
    # Near the quota nothing is reserved ahead (a process must not sit on what others need).
    near = counters.counter(PeriodKey("cus_2", "analysis", T - 1000, T + 1000), 50, False)
    assert (await counters.admit(near)).allowed and near.block == 5
    for _ in range(4):
        assert counters.admit_now(near) is not None
    await counters.settle()
    assert near.held == 0 and counters.admit_now(near) is None
