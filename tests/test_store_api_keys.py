"""The ``api_keys`` table on both backends (SQLite and PostgreSQL): create under the
per-customer limit, lookups by hash and id, the working keys of a customer, revoke now or at
the end of an overlap, touch."""

from datetime import timedelta

import pytest

from gateway.store import Backend
from gateway.store.api_keys import ApiKeyRow, ApiKeyRows, TooManyKeys
from tests.stores import T0


def row(n: int, customer: str = "cus_a", **kw: object) -> ApiKeyRow:
    fields: dict[str, object] = {
        "id": f"key_{n}",
        "key_hash": f"{n:064x}",
        "customer_id": customer,
        "name": f"k{n}",
        "start": "gk_test_abcd",
        "created_at": T0 + timedelta(seconds=n),
        "expires_at": None,
        "last_used": None,
        "revoked_at": None,
        **kw,
    }
    return ApiKeyRow(**fields)  # type: ignore[arg-type]


async def test_create_list_revoke_touch(store: Backend) -> None:
    rows = ApiKeyRows(store)
    await rows.create(row(1), limit=2)
    await rows.create(row(2, expires_at=T0 + timedelta(days=1)), limit=2)
    with pytest.raises(TooManyKeys):
        await rows.create(row(3), limit=2)
    await rows.create(row(4, customer="cus_b"), limit=2)  # another customer's count
    assert [r.id for r in await rows.of_customer("cus_a", T0)] == ["key_2", "key_1"]
    assert [r.id for r in await rows.of_customer("cus_a", T0 + timedelta(days=2))] == ["key_1"]
    got = await rows.by_hash(f"{1:064x}")
    assert got is not None and got.id == "key_1" and got.active(T0)
    # a roll's overlap: works for an hour more, then not
    later = T0 + timedelta(hours=1)
    revoked = await rows.revoke("key_1", later, T0)
    assert revoked is not None and revoked.revoked_at == later
    assert revoked.active(T0) and not revoked.active(later)
    assert await rows.revoke("key_1", T0, T0) is not None  # now: earlier than the overlap
    assert await rows.revoke("key_1", T0, T0) is None  # not working any more
    assert await rows.revoke("key_nope", T0, T0) is None
    await rows.touch("key_2", T0)
    touched = await rows.by_id("key_2")
    assert touched is not None and touched.last_used == T0
