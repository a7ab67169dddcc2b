"""gateway.sessions: the session cookie codec (on an injected clock), the cookie's flags on the
wire, and finding the cookie in a raw Cookie header."""

import random
import string
import time
from http.cookies import Morsel
from typing import Any

import pytest
from aiohttp import web
from itsdangerous import URLSafeTimedSerializer

from gateway import sessions as sessions_module
from gateway.model import Identity, ManualClock
from gateway.sessions import SESSION_SALT, SessionCodec, clear_session, session_cookie, set_session
from gateway.settings import SESSION_COOKIE
from tests.conftest import make_settings

SECRET = "s" * 40
SETTINGS = make_settings(
    session_secret=SECRET, cookie_secure="true", identity_header="X-Forwarded-Email"
)


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
    past = ManualClock(time.time() - lifetime - 10)
    old = SessionCodec(SETTINGS, clock=past).dumps("cus_123", "alice@example.com")
    assert SessionCodec(SETTINGS).loads(old) is None
    # Just inside the lifetime it is still valid.
    recent = ManualClock(time.time() - lifetime + 60)
    value = SessionCodec(SETTINGS, clock=recent).dumps("cus_123", None)
    assert SessionCodec(SETTINGS).loads(value) is not None


def test_cached_cookie_still_expires() -> None:
    clock = ManualClock()
    codec = SessionCodec(SETTINGS, clock=clock)
    value = codec.dumps("cus_123", None)
    assert codec.loads(value) is not None  # verified and cached
    clock.advance(SETTINGS.session_lifetime - 5)
    assert codec.loads(value) is not None  # served from the cache
    clock.advance(10)
    assert codec.loads(value) is None  # past its lifetime, cache or not
    assert codec.loads(value) is None


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions_module, "SESSION_CACHE_SIZE", 3)
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
