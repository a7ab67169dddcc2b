"""gateway.identity: identify()'s truth table (trusted header vs session cookie) and the email
sanity check."""

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.identity import SessionCodec, identify, normalize_email
from gateway.model import Identity
from gateway.settings import SESSION_COOKIE
from tests.conftest import make_settings

SECRET = "s" * 40
SETTINGS = make_settings(
    session_secret=SECRET, cookie_secure="true", identity_header="X-Forwarded-Email"
)


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
