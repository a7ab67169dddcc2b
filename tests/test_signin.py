"""gateway.signin: email sign-in links against the real SQLite store, on an injected clock."""

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.mailer import LogMailer
from gateway.model import ManualClock
from gateway.signin import LoginLinks
from gateway.store import SQLiteStore
from tests.conftest import make_settings

# --- LoginLinks (real SQLiteStore)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    db = SQLiteStore(str(tmp_path / "gate.sqlite3"))
    await db.open()
    try:
        yield db
    finally:
        await db.close()


LINK_BASE = "http://127.0.0.1:8080/_gate/login/verify"


def token_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["token"][0]


def links(store: SQLiteStore, clock: ManualClock, limit: int = 5) -> tuple[LoginLinks, LogMailer]:
    mailer = LogMailer()
    settings = make_settings(login_rate_limit=limit, login_token_ttl=900.0)
    return LoginLinks(settings, store, mailer, clock=clock), mailer


async def test_link_is_sent_and_works_once(store: SQLiteStore) -> None:
    login, mailer = links(store, ManualClock())
    await login.request("Alice@Example.com", "10.0.0.1", LINK_BASE)
    [(email, link)] = mailer.sent
    assert email == "alice@example.com"
    assert link.startswith(f"{LINK_BASE}?token=")
    token = token_of(link)
    assert len(token) >= 43
    assert await login.verify(token) == "alice@example.com"
    assert await login.verify(token) is None  # single use


async def test_link_base_with_a_query_keeps_it(store: SQLiteStore) -> None:
    login, mailer = links(store, ManualClock())
    await login.request("a@example.com", "10.0.0.1", f"{LINK_BASE}?next=%2Fapp")
    query = parse_qs(urlsplit(mailer.sent[0][1]).query)
    assert query["next"] == ["/app"]
    assert await login.verify(query["token"][0]) == "a@example.com"


async def test_link_expires(store: SQLiteStore) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    clock.advance(900 + 1)
    assert await login.verify(token_of(mailer.sent[0][1])) is None


async def test_link_still_valid_before_expiry(store: SQLiteStore) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    clock.advance(900 - 5)
    assert await login.verify(token_of(mailer.sent[0][1])) == "a@example.com"


async def test_unknown_and_garbage_tokens(store: SQLiteStore) -> None:
    login, _ = links(store, ManualClock())
    for token in ("", "x" * 43, "a" * 1000, "../../etc", "tok en", "\u2603"):
        assert await login.verify(token) is None


async def test_each_link_is_independent(store: SQLiteStore) -> None:
    login, mailer = links(store, ManualClock())
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    first, second = (token_of(link) for _, link in mailer.sent)
    assert first != second
    assert await login.verify(second) == "a@example.com"
    assert await login.verify(first) == "a@example.com"


async def test_unknown_email_still_gets_a_link(store: SQLiteStore) -> None:
    # The store knows no customers at all: the link is sent anyway, so the page that asked
    # cannot tell customers from strangers. What the email maps to is decided after verify.
    login, mailer = links(store, ManualClock())
    await login.request("stranger@example.net", "10.0.0.1", LINK_BASE)
    assert [email for email, _ in mailer.sent] == ["stranger@example.net"]


async def test_malformed_email_sends_nothing_and_does_not_raise(store: SQLiteStore) -> None:
    login, mailer = links(store, ManualClock())
    await login.request("not-an-email", "10.0.0.1", LINK_BASE)
    await login.request("a@example.com\r\nBcc: victim@example.com", "10.0.0.1", LINK_BASE)
    assert mailer.sent == []


async def test_rate_limit_per_email(store: SQLiteStore) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock, limit=3)
    for i in range(5):
        await login.request("a@example.com", f"10.0.0.{i}", LINK_BASE)  # a new IP each time
    assert len(mailer.sent) == 3
    await login.request("b@example.com", "10.0.0.9", LINK_BASE)  # other addresses unaffected
    assert len(mailer.sent) == 4
    clock.advance(15 * 60 + 1)  # the window has passed
    await login.request("a@example.com", "10.0.0.7", LINK_BASE)
    assert len(mailer.sent) == 5


async def test_rate_limit_per_ip(store: SQLiteStore) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock, limit=3)
    for i in range(5):
        await login.request(f"u{i}@example.com", "10.9.9.9", LINK_BASE)  # a new email each time
    assert [email for email, _ in mailer.sent] == [f"u{i}@example.com" for i in range(3)]
    await login.request("u9@example.com", "10.9.9.10", LINK_BASE)  # other IPs unaffected
    assert len(mailer.sent) == 4
    clock.advance(15 * 60 + 1)
    await login.request("u5@example.com", "10.9.9.9", LINK_BASE)
    assert len(mailer.sent) == 5


async def test_rate_limited_tokens_are_not_created(store: SQLiteStore) -> None:
    login, mailer = links(store, ManualClock(), limit=1)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    assert len(mailer.sent) == 1


async def test_only_the_token_hash_is_stored(store: SQLiteStore, tmp_path: Path) -> None:
    login, mailer = links(store, ManualClock())
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    token = token_of(mailer.sent[0][1]).encode()
    for path in tmp_path.iterdir():
        assert token not in path.read_bytes(), path.name
