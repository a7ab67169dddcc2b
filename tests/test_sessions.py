"""gateway.sessions: the session cookie codec (on an injected clock), the cookie's flags on the
wire, and finding the cookie in a raw Cookie header."""

import random
import string
import time
from http.cookies import Morsel
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from itsdangerous import URLSafeTimedSerializer

from gateway.changes import Change, Changes
from gateway.model import Identity, ManualClock, utcnow
from gateway.sessions import (
    SESSION_SALT,
    SessionCodec,
    Sessions,
    clear_session,
    device_summary,
    session_cookie,
    session_handle,
    set_session,
)
from gateway.settings import SESSION_COOKIE
from gateway.store import Backend
from tests.conftest import make_settings

SECRET = "s" * 40
SETTINGS = make_settings(
    session_secret=SECRET, cookie_secure="true", identity_header="X-Forwarded-Email"
)


# --- SessionCodec: a signed session id


def test_round_trip() -> None:
    codec = SessionCodec(SETTINGS)
    value = codec.dumps("sid-123")
    assert codec.loads(value) == "sid-123"
    # Also from a fresh codec (another worker with the same secret).
    assert SessionCodec(SETTINGS).loads(value) == "sid-123"
    # The cookie names the session only: no customer id, no email in it.
    assert "cus_" not in value and "@" not in value


def test_tampered_values_are_rejected() -> None:
    codec = SessionCodec(SETTINGS)
    value = codec.dumps("sid-123")
    payload, stamp, signature = value.rsplit(".", 2)
    forged = URLSafeTimedSerializer("x" * 40, salt=SESSION_SALT).dumps({"s": "sid-evil"})
    candidates = [
        # signature changed (its first character: the last one carries unused padding bits,
        # so changing it can leave the decoded signature as it was)
        f"{payload}.{stamp}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}",
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
    past = ManualClock(time.time() - lifetime - 10)
    old = SessionCodec(SETTINGS, clock=past).dumps("sid-1")
    assert SessionCodec(SETTINGS).loads(old) is None
    # Just inside the lifetime it is still valid.
    recent = ManualClock(time.time() - lifetime + 60)
    value = SessionCodec(SETTINGS, clock=recent).dumps("sid-1")
    assert SessionCodec(SETTINGS).loads(value) == "sid-1"


def test_old_stateless_cookies_are_rejected() -> None:
    """Cookies of the format before server-side sessions (customer id and email, signed with
    the same secret and salt) no longer sign anyone in: their holders sign in again."""
    serializer = URLSafeTimedSerializer(SECRET, salt=SESSION_SALT)
    old = serializer.dumps({"c": "cus_123", "e": "alice@example.com"})
    assert SessionCodec(SETTINGS).loads(old) is None


def test_foreign_secret_and_salt_are_rejected() -> None:
    other = SessionCodec(make_settings(session_secret="o" * 40))
    assert SessionCodec(SETTINGS).loads(other.dumps("sid-1")) is None
    other_salt = URLSafeTimedSerializer(SECRET, salt="csrf").dumps({"s": "sid-1"})
    assert SessionCodec(SETTINGS).loads(other_salt) is None


def test_valid_signature_with_unexpected_payload_is_rejected() -> None:
    serializer = URLSafeTimedSerializer(SECRET, salt=SESSION_SALT)
    codec = SessionCodec(SETTINGS)
    for payload in ([1, 2], "sid", {"s": ""}, {"s": 5}, {"c": "cus_1"}, None, {"s": None}):
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
    value = a.dumps("sid-1")
    assert a.loads(value) == "sid-1"
    assert b.loads(value) is None


# --- Sessions: server-side, cached for at most L1_TTL on the injected clock


TTL_SETTINGS = make_settings(session_secret=SECRET, l1_ttl=5.0, session_lifetime=3600.0)


async def test_session_ids_are_random_and_only_their_hash_is_stored(store: Backend) -> None:
    sessions = Sessions(TTL_SETTINGS, store)
    values = {await sessions.create("cus_1", "A@Example.com") for _ in range(20)}
    assert len(values) == 20
    for value in values:
        session_id = sessions.codec.loads(value)
        assert session_id is not None and len(session_id) >= 22  # >= 128 bits, base64
        row = await store.get_session(session_handle(session_id))
        assert row is not None and row.customer_id == "cus_1" and row.email == "a@example.com"
        assert await store.get_session(session_id) is None  # the raw id is not a key
    rows = await store.active_sessions("cus_1", utcnow())
    assert {r.id_hash for r in rows} == {sessions.handle_of(v) for v in values}


async def test_revoked_session_is_refused_at_once_on_this_worker(store: Backend) -> None:
    clock = ManualClock()
    changes = Changes()
    heard: list[Change] = []
    changes.listen(heard.append)
    sessions = Sessions(TTL_SETTINGS, store, clock, changes)
    value = await sessions.create("cus_1", None)
    entry = sessions.entry(value)
    assert entry is not None and entry.live
    assert await sessions.resolve(value) == Identity(None, "cus_1", "cookie")
    assert await sessions.revoke(value)
    assert not entry.live  # verdicts derived from it die with it
    assert await sessions.resolve(value) is None
    assert heard == [Change("session", sessions.handle_of(value) or "", "cus_1")]
    assert not await sessions.revoke(value)  # already revoked: nothing announced
    assert len(heard) == 1


async def test_other_workers_stop_within_l1_ttl(store: Backend) -> None:
    clock = ManualClock()
    here = Sessions(TTL_SETTINGS, store, clock)
    there = Sessions(TTL_SETTINGS, store, clock)  # another worker: its own cache
    value = await here.create("cus_1", None)
    assert await there.resolve(value) is not None
    reads = there.reads
    await here.revoke(value)
    clock.advance(TTL_SETTINGS.l1_ttl - 0.1)
    assert await there.resolve(value) is not None  # still believed, from its cache...
    assert there.reads == reads  # ...without store I/O
    clock.advance(0.2)
    assert await there.resolve(value) is None  # L1_TTL later: the revoked row is read
    assert there.reads == reads + 1


async def test_last_seen_is_written_at_most_once_per_l1_ttl(store: Backend) -> None:
    clock = ManualClock()
    creator = Sessions(TTL_SETTINGS, store, clock)
    value = await creator.create("cus_1", None)
    sessions = Sessions(TTL_SETTINGS, store, clock)
    for _ in range(50):  # many requests within one L1_TTL
        assert await sessions.resolve(value) is not None
        clock.advance(0.05)
    assert sessions.touches == 0  # created 2.5 s ago: still fresh
    clock.advance(TTL_SETTINGS.l1_ttl)
    for _ in range(50):
        assert await sessions.resolve(value) is not None
    assert sessions.touches == 1
    row = await store.get_session(sessions.handle_of(value) or "")
    assert row is not None and row.last_seen.timestamp() == pytest.approx(clock.time(), abs=1)


async def test_session_cache_is_bounded(store: Backend) -> None:
    clock = ManualClock()
    sessions = Sessions(TTL_SETTINGS, store, clock, max_entries=3)
    values = [await sessions.create(f"cus_{i}", None) for i in range(10)]
    assert len(sessions) == 3
    first = sessions.entry(values[-1])
    assert first is not None
    # Evicted entries are simply read again.
    assert await sessions.resolve(values[0]) == Identity(None, "cus_0", "cookie")
    assert len(sessions) == 3


async def test_session_ends_with_its_lifetime(store: Backend) -> None:
    clock = ManualClock()
    sessions = Sessions(TTL_SETTINGS, store, clock)
    value = await sessions.create("cus_1", None)
    clock.advance(TTL_SETTINGS.session_lifetime - 1)
    assert await sessions.resolve(value) is not None
    clock.advance(2)
    assert await sessions.resolve(value) is None


async def test_revoke_all_ends_only_that_customers_sessions(store: Backend) -> None:
    clock = ManualClock()
    sessions = Sessions(TTL_SETTINGS, store, clock)
    mine = [await sessions.create("cus_1", None) for _ in range(3)]
    theirs = await sessions.create("cus_2", None)
    assert await sessions.revoke_all("cus_1") == 3
    for value in mine:
        assert await sessions.resolve(value) is None
    assert await sessions.resolve(theirs) == Identity(None, "cus_2", "cookie")
    assert await sessions.revoke_all("cus_1") == 0


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
            "Chrome on Linux",
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0 Safari/537.36 Edg/120.0",
            "Edge on Windows",
        ),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) Version/17.0 Safari/605.1.15",
            "Safari on macOS",
        ),
        ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Safari/604.1", "Safari on iOS"),
        (
            "Mozilla/5.0 (Android 14; Mobile; rv:120.0) Gecko/120.0 Firefox/120.0",
            "Firefox on Android",
        ),
        (  # headless Chromium (the browser tests): still Chrome, not "Safari"
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "HeadlessChrome/156.0.0.0 Safari/537.36",
            "Chrome on Linux",
        ),
        ("curl/8.5.0", "curl"),
        ("", "Unknown device"),
    ],
)
def test_device_summary(agent: str, expected: str) -> None:
    assert device_summary(agent) == expected


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


async def test_set_session_sets_a_hardened_cookie(store: Backend) -> None:
    sessions = Sessions(SETTINGS, store)
    response = web.Response()
    request = make_mocked_request("GET", "/", headers={"User-Agent": "Firefox/120 (X11; Linux)"})
    await set_session(response, sessions, request, "cus_123", "alice@example.com")
    morsel = session_morsel(response)
    found = await Sessions(SETTINGS, store).resolve(morsel.value)  # a fresh cache: the store
    assert found == Identity("alice@example.com", "cus_123", "cookie")
    [row] = await store.active_sessions("cus_123", utcnow())
    assert row.device == "Firefox on Linux"
    assert morsel["httponly"] is True
    assert morsel["secure"] is True
    assert morsel["samesite"] == "Lax"
    assert morsel["path"] == "/"
    assert str(morsel["max-age"]) == str(30 * 86400)


async def test_cookie_on_the_wire(aiohttp_client: Any, store: Backend) -> None:
    sessions = Sessions(SETTINGS, store)

    async def sign_in(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        await set_session(response, sessions, request, "cus_1", "a@example.com")
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
    assert await sessions.resolve(value) == Identity("a@example.com", "cus_1", "cookie")
    resp = await client.post("/out")
    [header] = resp.headers.getall("Set-Cookie")
    assert header.startswith(f'{SESSION_COOKIE}="";') or header.startswith(f"{SESSION_COOKIE}=;")
    assert "max-age=0" in header.lower()


async def test_set_session_without_secure_for_plain_http_localhost(store: Backend) -> None:
    settings = make_settings(session_secret=SECRET, public_url="http://localhost:8080")
    response = web.Response()
    request = make_mocked_request("GET", "/")
    await set_session(response, Sessions(settings, store), request, "cus_1", None)
    assert not session_morsel(response)["secure"]


def test_clear_session_expires_the_cookie() -> None:
    response = web.Response()
    clear_session(response, SETTINGS)
    morsel = session_morsel(response)
    assert morsel.value == ""
    assert str(morsel["max-age"]) == "0"
    assert morsel["path"] == "/"
    assert morsel["httponly"] is True and morsel["secure"] is True


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
    assert session_cookie(header) == expected
