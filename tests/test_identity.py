"""Identity: the session cookie codec, identify()'s truth table, and email sign-in links."""

import random
import string
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from http.cookies import Morsel
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from itsdangerous import URLSafeTimedSerializer

from gateway import identity as identity_module
from gateway.identity import (
    SESSION_SALT,
    LoginLinks,
    SessionCodec,
    clear_session,
    identify,
    normalize_email,
    set_session,
)
from gateway.mailer import LogMailer
from gateway.model import Identity
from gateway.settings import SESSION_COOKIE
from gateway.store import SQLiteStore
from tests.conftest import make_settings

SECRET = "s" * 40
SETTINGS = make_settings(
    session_secret=SECRET, cookie_secure="true", identity_header="X-Forwarded-Email"
)


class Clock:
    """A settable clock: Unix seconds for the codec, aware datetimes for LoginLinks."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def dt(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- SessionCodec


def test_round_trip() -> None:
    codec = SessionCodec(SETTINGS)
    value = codec.dumps("cus_123", "alice@example.com")
    assert codec.loads(value) == Identity("alice@example.com", "cus_123", "cookie")
    # Also from a fresh codec (no cache), and without an email.
    assert SessionCodec(SETTINGS).loads(value) == Identity("alice@example.com", "cus_123", "cookie")
    assert codec.loads(codec.dumps("cus_9", None)) == Identity(None, "cus_9", "cookie")


def test_tampered_values_are_rejected() -> None:
    codec = SessionCodec(SETTINGS)
    value = codec.dumps("cus_123", "alice@example.com")
    payload, stamp, signature = value.rsplit(".", 2)
    forged = URLSafeTimedSerializer("x" * 40, salt=SESSION_SALT).dumps({"c": "cus_evil", "e": None})
    candidates = [
        value[:-1] + ("A" if value[-1] != "A" else "B"),  # signature changed
        f"{payload}x.{stamp}.{signature}",  # payload changed
        f"{forged.rsplit('.', 2)[0]}.{stamp}.{signature}",  # someone else's payload
        f"{payload}.{stamp}A.{signature}",  # timestamp changed
        value + ".",
    ]
    for candidate in candidates:
        assert SessionCodec(SETTINGS).loads(candidate) is None, candidate
        assert codec.loads(candidate) is None, candidate


def test_expired_cookie_is_rejected() -> None:
    lifetime = SETTINGS.session_lifetime
    past = Clock(time.time() - lifetime - 10)
    old = SessionCodec(SETTINGS, clock=past).dumps("cus_123", "alice@example.com")
    assert SessionCodec(SETTINGS).loads(old) is None
    # Just inside the lifetime it is still valid.
    recent = Clock(time.time() - lifetime + 60)
    value = SessionCodec(SETTINGS, clock=recent).dumps("cus_123", None)
    assert SessionCodec(SETTINGS).loads(value) is not None


def test_cached_cookie_still_expires() -> None:
    clock = Clock()
    codec = SessionCodec(SETTINGS, clock=clock)
    value = codec.dumps("cus_123", None)
    assert codec.loads(value) is not None  # verified and cached
    clock.advance(SETTINGS.session_lifetime - 5)
    assert codec.loads(value) is not None  # served from the cache
    clock.advance(10)
    assert codec.loads(value) is None  # past its lifetime, cache or not
    assert codec.loads(value) is None


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity_module, "SESSION_CACHE_SIZE", 3)
    codec = SessionCodec(SETTINGS)
    values = [codec.dumps(f"cus_{i}", None) for i in range(10)]
    for value in values:
        assert codec.loads(value) is not None
    assert len(codec._cache) == 3
    # Evicted entries are simply verified again.
    assert codec.loads(values[0]) == Identity(None, "cus_0", "cookie")


def test_foreign_secret_and_salt_are_rejected() -> None:
    other = SessionCodec(make_settings(session_secret="o" * 40))
    assert SessionCodec(SETTINGS).loads(other.dumps("cus_123", None)) is None
    other_salt = URLSafeTimedSerializer(SECRET, salt="csrf").dumps({"c": "cus_1", "e": None})
    assert SessionCodec(SETTINGS).loads(other_salt) is None


def test_valid_signature_with_unexpected_payload_is_rejected() -> None:
    serializer = URLSafeTimedSerializer(SECRET, salt=SESSION_SALT)
    codec = SessionCodec(SETTINGS)
    for payload in ([1, 2], "cus_1", {"c": ""}, {"c": 5}, {"c": "cus_1", "e": 3}, None):
        assert codec.loads(serializer.dumps(payload)) is None, payload


def test_garbage_never_raises() -> None:
    codec = SessionCodec(SETTINGS)
    samples = ["", ".", "..", "a.b.c", "\u2603.\u2603", "x" * 10_000, "=" * 50, ".eJw.x.y"]
    rng = random.Random(1234)
    alphabet = string.printable + "\u00e9\u2603\x00"
    samples += ["".join(rng.choices(alphabet, k=rng.randint(1, 120))) for _ in range(500)]
    for sample in samples:
        assert codec.loads(sample) is None


def test_without_a_secret_a_random_key_is_used() -> None:
    a, b = SessionCodec(make_settings()), SessionCodec(make_settings())
    value = a.dumps("cus_1", None)
    assert a.loads(value) == Identity(None, "cus_1", "cookie")
    assert b.loads(value) is None


# --- cookie flags


def session_morsel(response: web.StreamResponse) -> Morsel[str]:
    return response.cookies[SESSION_COOKIE]


def test_cookie_kwargs() -> None:
    assert SessionCodec(SETTINGS).cookie_kwargs() == {
        "httponly": True,
        "samesite": "Lax",
        "secure": True,
        "max_age": 30 * 86400,
        "path": "/",
    }
    insecure = make_settings(session_secret=SECRET, cookie_secure="false", session_lifetime=3600)
    kwargs = SessionCodec(insecure).cookie_kwargs()
    assert kwargs["secure"] is False and kwargs["max_age"] == 3600


def test_set_session_sets_a_hardened_cookie() -> None:
    codec = SessionCodec(SETTINGS)
    response = web.Response()
    set_session(response, codec, "cus_123", "alice@example.com")
    morsel = session_morsel(response)
    assert codec.loads(morsel.value) == Identity("alice@example.com", "cus_123", "cookie")
    assert morsel["httponly"] is True
    assert morsel["secure"] is True
    assert morsel["samesite"] == "Lax"
    assert morsel["path"] == "/"
    assert str(morsel["max-age"]) == str(30 * 86400)


async def test_cookie_on_the_wire(aiohttp_client: Any) -> None:
    codec = SessionCodec(SETTINGS)

    async def sign_in(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        set_session(response, codec, "cus_1", "a@example.com")
        return response

    async def sign_out(request: web.Request) -> web.Response:
        response = web.Response(text="bye")
        clear_session(response, SETTINGS)
        return response

    app = web.Application()
    app.router.add_post("/in", sign_in)
    app.router.add_post("/out", sign_out)
    client = await aiohttp_client(app)
    resp = await client.post("/in")
    [header] = resp.headers.getall("Set-Cookie")
    name_value, *attributes = (part.strip() for part in header.split(";"))
    assert name_value.startswith(f"{SESSION_COOKIE}=")
    assert {a.lower() for a in attributes} >= {
        "httponly",
        "secure",
        "samesite=lax",
        "path=/",
        f"max-age={30 * 86400}",
    }
    value = name_value.split("=", 1)[1]
    assert codec.loads(value) == Identity("a@example.com", "cus_1", "cookie")
    resp = await client.post("/out")
    [header] = resp.headers.getall("Set-Cookie")
    assert header.startswith(f'{SESSION_COOKIE}="";') or header.startswith(f"{SESSION_COOKIE}=;")
    assert "max-age=0" in header.lower()


def test_set_session_without_secure_for_plain_http_localhost() -> None:
    settings = make_settings(session_secret=SECRET, public_url="http://localhost:8080")
    response = web.Response()
    set_session(response, SessionCodec(settings), "cus_1", None)
    assert not session_morsel(response)["secure"]


def test_clear_session_expires_the_cookie() -> None:
    response = web.Response()
    clear_session(response, SETTINGS)
    morsel = session_morsel(response)
    assert morsel.value == ""
    assert str(morsel["max-age"]) == "0"
    assert morsel["path"] == "/"
    assert morsel["httponly"] is True and morsel["secure"] is True


# --- identify


def request_with(header: str | None = None, cookie: str | None = None) -> web.Request:
    headers = {}
    if header is not None:
        headers["X-Forwarded-Email"] = header
    if cookie is not None:
        headers["Cookie"] = f"{SESSION_COOKIE}={cookie}"
    return make_mocked_request("GET", "/", headers=headers)


def test_identify_nothing_is_anonymous() -> None:
    codec = SessionCodec(SETTINGS)
    assert identify(request_with(), codec, SETTINGS, peer_trusted=True) is None
    assert identify(request_with(cookie="garbage"), codec, SETTINGS, peer_trusted=True) is None


def test_identify_cookie() -> None:
    codec = SessionCodec(SETTINGS)
    cookie = codec.dumps("cus_1", "a@example.com")
    for trusted in (True, False):
        found = identify(request_with(cookie=cookie), codec, SETTINGS, peer_trusted=trusted)
        assert found == Identity("a@example.com", "cus_1", "cookie")


def test_identify_header_from_a_trusted_peer() -> None:
    codec = SessionCodec(SETTINGS)
    found = identify(request_with(header="  Bob@Example.COM "), codec, SETTINGS, True)
    assert found == Identity("bob@example.com", None, "header")


def test_identify_header_from_an_untrusted_peer_is_ignored() -> None:
    codec = SessionCodec(SETTINGS)
    assert identify(request_with(header="bob@example.com"), codec, SETTINGS, False) is None


def test_identify_header_ignored_when_not_configured() -> None:
    settings = make_settings(session_secret=SECRET)
    codec = SessionCodec(settings)
    assert identify(request_with(header="bob@example.com"), codec, settings, True) is None


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
def test_header_beats_cookie_only_when_trusted_and_valid(
    trusted: bool, header: str, expected: Identity
) -> None:
    codec = SessionCodec(SETTINGS)
    cookie = codec.dumps("cus_1", "a@example.com")
    found = identify(request_with(header=header, cookie=cookie), codec, SETTINGS, trusted)
    assert found == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a@example.com", "a@example.com"),
        (" A.B+tag@Sub.Example.ORG\t", "a.b+tag@sub.example.org"),
        ("a@localhost", None),
        ("@example.com", None),
        ("a@@example.com", None),
        ("a b@example.com", None),
        ("a@example.com\r\nBcc: x@y.z", None),
        ("<a@example.com>", None),
        ("a\x00b@example.com", None),
        ("a@" + "x" * 250 + ".com", None),
        ("", None),
    ],
)
def test_normalize_email(raw: str, expected: str | None) -> None:
    assert normalize_email(raw) == expected


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


def links(store: SQLiteStore, clock: Clock, limit: int = 5) -> tuple[LoginLinks, LogMailer]:
    mailer = LogMailer()
    settings = make_settings(login_rate_limit=limit, login_token_ttl=900.0)
    return LoginLinks(settings, store, mailer, clock=clock.dt), mailer


async def test_link_is_sent_and_works_once(store: SQLiteStore) -> None:
    login, mailer = links(store, Clock())
    await login.request("Alice@Example.com", "10.0.0.1", LINK_BASE)
    [(email, link)] = mailer.sent
    assert email == "alice@example.com"
    assert link.startswith(f"{LINK_BASE}?token=")
    token = token_of(link)
    assert len(token) >= 43
    assert await login.verify(token) == "alice@example.com"
    assert await login.verify(token) is None  # single use


async def test_link_base_with_a_query_keeps_it(store: SQLiteStore) -> None:
    login, mailer = links(store, Clock())
    await login.request("a@example.com", "10.0.0.1", f"{LINK_BASE}?next=%2Fapp")
    query = parse_qs(urlsplit(mailer.sent[0][1]).query)
    assert query["next"] == ["/app"]
    assert await login.verify(query["token"][0]) == "a@example.com"


async def test_link_expires(store: SQLiteStore) -> None:
    clock = Clock()
    login, mailer = links(store, clock)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    clock.advance(900 + 1)
    assert await login.verify(token_of(mailer.sent[0][1])) is None


async def test_link_still_valid_before_expiry(store: SQLiteStore) -> None:
    clock = Clock()
    login, mailer = links(store, clock)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    clock.advance(900 - 5)
    assert await login.verify(token_of(mailer.sent[0][1])) == "a@example.com"


async def test_unknown_and_garbage_tokens(store: SQLiteStore) -> None:
    login, _ = links(store, Clock())
    for token in ("", "x" * 43, "a" * 1000, "../../etc", "tok en", "\u2603"):
        assert await login.verify(token) is None


async def test_each_link_is_independent(store: SQLiteStore) -> None:
    login, mailer = links(store, Clock())
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    first, second = (token_of(link) for _, link in mailer.sent)
    assert first != second
    assert await login.verify(second) == "a@example.com"
    assert await login.verify(first) == "a@example.com"


async def test_unknown_email_still_gets_a_link(store: SQLiteStore) -> None:
    # The store knows no customers at all: the link is sent anyway, so the page that asked
    # cannot tell customers from strangers. What the email maps to is decided after verify.
    login, mailer = links(store, Clock())
    await login.request("stranger@example.net", "10.0.0.1", LINK_BASE)
    assert [email for email, _ in mailer.sent] == ["stranger@example.net"]


async def test_malformed_email_sends_nothing_and_does_not_raise(store: SQLiteStore) -> None:
    login, mailer = links(store, Clock())
    await login.request("not-an-email", "10.0.0.1", LINK_BASE)
    await login.request("a@example.com\r\nBcc: victim@example.com", "10.0.0.1", LINK_BASE)
    assert mailer.sent == []


async def test_rate_limit_per_email(store: SQLiteStore) -> None:
    clock = Clock()
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
    clock = Clock()
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
    login, mailer = links(store, Clock(), limit=1)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    assert len(mailer.sent) == 1


async def test_only_the_token_hash_is_stored(store: SQLiteStore, tmp_path: Path) -> None:
    login, mailer = links(store, Clock())
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    token = token_of(mailer.sent[0][1]).encode()
    for path in tmp_path.iterdir():
        assert token not in path.read_bytes(), path.name


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("a=1; b=2", None),
        ("gate_session=abc", "abc"),
        ("a=1; gate_session=abc.def-_; b=2", "abc.def-_"),
        ('a=1;gate_session="quoted"', "quoted"),
        ("xgate_session=evil; a=1", None),
        ("gate_session_other=evil", None),
        ("gate_session=", None),
    ],
)
def test_session_cookie_from_raw_header(header: str | None, expected: str | None) -> None:
    from gateway.identity import session_cookie

    assert session_cookie(header) == expected
