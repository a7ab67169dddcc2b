"""gateway.identity: identify()'s truth table (trusted header vs session cookie, on a real
session store) and the email sanity check."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.identity import Sessions, identify
from gateway.model import Identity
from gateway.settings import SESSION_COOKIE, Settings
from gateway.store import SQLiteStore
from tests.conftest import make_settings

SECRET = "s" * 40
SETTINGS = make_settings(
    session_secret=SECRET, cookie_secure="true", identity_header="X-Forwarded-Email"
)


# --- identify


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[Sessions]:
    store = SQLiteStore(str(tmp_path / "gate.sqlite3"))
    await store.open()
    try:
        yield Sessions(SETTINGS, store)
    finally:
        await store.close()


def request_with(header: str | None = None, cookie: str | None = None) -> web.Request:
    headers = {}
    if header is not None:
        headers["X-Forwarded-Email"] = header
    if cookie is not None:
        headers["Cookie"] = f"{SESSION_COOKIE}={cookie}"
    return make_mocked_request("GET", "/", headers=headers)


async def who(
    request: web.Request, sessions: Sessions, settings: Settings, peer_trusted: bool
) -> Identity | None:
    """identify()'s identity; a cookie identity comes with the live session cache entry it
    was read from (the gate's remembered verdict rests on it), a header identity without."""
    found = await identify(request.headers, sessions, settings, peer_trusted)
    if found.identity is not None and found.identity.source == "cookie":
        assert found.session is not None and found.session.live
        assert found.session.identity == found.identity
    else:
        assert found.session is None
    return found.identity


async def test_identify_nothing_is_anonymous(sessions: Sessions) -> None:
    assert await who(request_with(), sessions, SETTINGS, peer_trusted=True) is None
    found = await who(request_with(cookie="garbage"), sessions, SETTINGS, peer_trusted=True)
    assert found is None


async def test_identify_cookie(sessions: Sessions) -> None:
    cookie = await sessions.create("cus_1", "a@example.com")
    for trusted in (True, False):
        found = await who(request_with(cookie=cookie), sessions, SETTINGS, trusted)
        assert found == Identity("a@example.com", "cus_1", "cookie")


async def test_identify_revoked_cookie_is_anonymous(sessions: Sessions) -> None:
    cookie = await sessions.create("cus_1", "a@example.com")
    assert await sessions.revoke(cookie)
    assert await who(request_with(cookie=cookie), sessions, SETTINGS, True) is None


async def test_identify_header_from_a_trusted_peer(sessions: Sessions) -> None:
    found = await who(request_with(header="  Bob@Example.COM "), sessions, SETTINGS, True)
    assert found == Identity("bob@example.com", None, "header")


async def test_identify_header_from_an_untrusted_peer_is_ignored(sessions: Sessions) -> None:
    found = await who(request_with(header="bob@example.com"), sessions, SETTINGS, False)
    assert found is None


async def test_identify_header_ignored_when_not_configured(tmp_path: Path) -> None:
    settings = make_settings(session_secret=SECRET)
    store = SQLiteStore(str(tmp_path / "other.sqlite3"))
    await store.open()
    try:
        found = await who(
            request_with(header="bob@example.com"), Sessions(settings, store), settings, True
        )
    finally:
        await store.close()
    assert found is None


@pytest.mark.parametrize(
    ("trusted", "header", "expected"),
    [
        (True, "bob@example.com", Identity("bob@example.com", None, "header")),
        (False, "bob@example.com", Identity("a@example.com", "cus_1", "cookie")),
        (True, "not an email", Identity("a@example.com", "cus_1", "cookie")),
        (True, "a@b.c, evil@example.com", Identity("a@example.com", "cus_1", "cookie")),
        (True, "", Identity("a@example.com", "cus_1", "cookie")),
    ],
)
async def test_header_beats_cookie_only_when_trusted_and_valid(
    sessions: Sessions, trusted: bool, header: str, expected: Identity
) -> None:
    cookie = await sessions.create("cus_1", "a@example.com")
    found = await who(request_with(header=header, cookie=cookie), sessions, SETTINGS, trusted)
    assert found == expected
