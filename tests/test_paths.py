"""Paths: normalization, public-path bypass attempts, and hostile ``next`` values."""

import pytest

from gateway.paths import MAX_NEXT_LENGTH, PublicPaths, normalize_path, safe_next

PUBLIC = PublicPaths(["/static/*", "/favicon.ico", "/robots.txt"])

# --------------------------------------------------------------------------- normalize_path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/app", "/app"),
        ("/app/", "/app/"),
        ("/app?x=1&y=/../z", "/app"),
        ("/a//b///c", "/a/b/c"),
        ("//", "/"),
        ("/a/./b", "/a/b"),
        ("/a/.", "/a/"),
        ("/a/b/..", "/a/"),
        ("/a/../b", "/b"),
        ("/../../etc/passwd", "/etc/passwd"),  # never above the root
        ("/a/..", "/"),
        ("/.hidden/.x", "/.hidden/.x"),
        ("/a%20b", "/a b"),
        ("/caf%C3%A9", "/café"),
        ("/café", "/café"),
        ("/%41%42", "/AB"),
        ("/100%25", "/100%"),
        ("/%zz", "/%zz"),  # not an escape: left alone
        ("/a%2fb", "/a/b"),
        ("/a%5Cb", "/a/b"),
        ("/a\\b", "/a/b"),
        ("\\a", "/a"),
        ("/%252e%252e/x", "/x"),
        ("/a;b=1/c", "/a;b=1/c"),
        ("/x%3Fy", "/x?y"),
        ("/a+b", "/a+b"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "*",
        "http://example.com/x",
        "app",
        "/a\x00b",
        "/a%00b",
        "/a%0ab",
        "/a%0D%0Ab",
        "/a\tb",
        "/a%7f",
        "/a%c2%85",  # C1 control (NEL)
        "/a%ff",  # invalid UTF-8
        "/a%c3",  # truncated UTF-8
        "/a\udcff",  # undecodable byte as aiohttp hands it over (surrogateescape)
        "/a#b",
        "/a%23b",
        "/a/..;/b",
        "/a/.;x/b",
        "/a/%2e%2e;/b",
        "/a/．．/b",  # full-width full stops  # noqa: RUF001
        "/a/b／c",  # full-width solidus  # noqa: RUF001
        "/%" + "25" * 9 + "2e",  # still encoded after many rounds
    ],
)
def test_normalize_rejects(raw: str) -> None:
    assert normalize_path(raw) is None


def test_normalize_fast_path_returns_the_input() -> None:
    raw = "/api/v1/search"
    assert normalize_path(raw) is raw


# --------------------------------------------------------------------------- public paths

BYPASS_ATTEMPTS = [
    ("/static/../api", "/api"),
    ("/static/%2e%2e/api", "/api"),
    ("/static/%2E%2E%2Fapi", "/api"),
    ("/static%2f..%2fapi", "/api"),
    ("/static%2F..%2Fapi", "/api"),
    ("//static/../api", "/api"),
    ("/static/..%5capi", "/api"),
    ("/static/..\\api", "/api"),
    ("/static\\..\\api", "/api"),
    ("/static/.%2e/api", "/api"),
    ("/static/%2e./api", "/api"),
    ("/static/%252e%252e/api", "/api"),
    ("/static/%252e%252e%252fapi", "/api"),
    ("/static%252f..%252fapi", "/api"),
    ("/static/%25252e%25252e/api", "/api"),
    ("/static/./../api", "/api"),
    ("/static/x/../../api", "/api"),
    ("/static/..", "/"),
    ("/static/../static-private/x", "/static-private/x"),
    ("/static/../favicon.ico/../api", "/api"),
    ("/favicon.ico/../api", "/api"),
    ("/static/../api?/static/x", "/api"),
    ("/static/..//api", "/api"),
]


@pytest.mark.parametrize(("raw", "expected"), BYPASS_ATTEMPTS)
def test_public_bypass_attempts(raw: str, expected: str) -> None:
    path = normalize_path(raw)
    assert path == expected
    assert not PUBLIC.matches(path)
    assert not PUBLIC.matches(path, raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/static/..;/api",
        "/static/%2e%2e;/api",
        "/static/..%3b/api",
        "/static/..%00/api",
        "/static%00/../api",
        "/static/．．/api",  # noqa: RUF001
        "/static/..%EF%BC%8Fapi",  # full-width solidus, encoded
        "/static/../api#",
    ],
)
def test_public_bypass_attempts_rejected_outright(raw: str) -> None:
    assert normalize_path(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        "/api/..%2fstatic/x",  # upstreams that keep %2F route this under /api
        "/api/../static/x",  # upstreams that do not resolve dot segments
        "/api%2f..%2fstatic/x",
        "//static/x",
        "/./static/x",
        "/static//x",
        "/static/./x",
        "/static%2fx",
        "/static%5cx",
        "/static/%252e",
        "\\static\\x",
    ],
)
def test_ambiguous_raw_paths_are_not_public(raw: str) -> None:
    """Normalized, these are under /static; their raw form is read differently elsewhere."""
    path = normalize_path(raw)
    assert path is not None and path.startswith("/static/")
    assert PUBLIC.matches(path)  # the normalized path alone says public...
    assert not PUBLIC.matches(path, raw)  # ...but with the raw path, it is gated


@pytest.mark.parametrize(
    ("raw", "public"),
    [
        ("/static/app.js", True),
        ("/static/css/site.css?v=3", True),
        ("/static/My%20Font.woff2", True),
        ("/static/caf%C3%A9.png", True),
        ("/static/", True),
        ("/static/.well-known", True),
        ("/static", False),  # "/static/*" is /static/ and below only
        ("/staticx", False),
        ("/static-private/x", False),
        ("/STATIC/x", False),
        ("/favicon.ico", True),
        ("/favicon.ico?v=2", True),
        ("/favicon.ico/", False),
        ("/favicon.icox", False),
        ("/robots.txt", True),
        ("/", False),
        ("/api/x", False),
    ],
)
def test_public_paths(raw: str, public: bool) -> None:
    path = normalize_path(raw)
    assert path is not None
    assert PUBLIC.matches(path) is public
    assert PUBLIC.matches(path, raw) is public


def test_public_paths_patterns() -> None:
    assert PublicPaths(["/*"]).matches("/anything")
    assert PublicPaths(["/docs*"]).matches("/docs-old/x")
    assert PublicPaths([" /favicon.ico ", ""]).matches("/favicon.ico")
    assert PublicPaths(["/a/./b"]).matches("/a/b")
    assert not PublicPaths([])
    assert not PublicPaths([]).matches("/")
    assert PublicPaths(["/x"])
    assert "/static/*" in repr(PUBLIC)


@pytest.mark.parametrize("pattern", ["static/*", "*", "/a*b", "/*/x", "/a%00", "http://x/"])
def test_public_paths_bad_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="public path"):
        PublicPaths([pattern])


# --------------------------------------------------------------------------- safe_next

HOSTILE_NEXT = [
    "//x",
    "///x",
    "////x",
    "/\\x",
    "\\x",
    "\\\\x",
    "\\/x",
    "https://x",
    "HTTPS://x",
    "http:x",
    "https:/x",
    "//x@y",
    "/\\x@y",
    "x",
    "x/y",
    "?next=//x",
    "#//x",
    "%2F%2Fx",
    "%2f%2fx",
    "/%2F/x",
    "/%2f%2fx",
    "/%5Cx",
    "/%5cx",
    "/%252F%252Fx",
    "/%25252F%25252Fx",
    "/%255Cx",
    "\t//x",
    "/\t/x",
    "/\n/x",
    "/\r/x",
    "/\r\n/x",
    "/x\n",
    "/%09/x",
    "/%0a/x",
    "/%0D%0ASet-Cookie:x=1",
    "/%00",
    "/\x00",
    "/\x7f",
    " //x",
    "/ /x",
    "/\u3000/x",  # ideographic space
    "javascript:alert(1)",
    "JavaScript:alert(1)",
    "/javascript:alert(1)",
    "/%6Aavascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "/.//x",  # a dot segment: /.//x resolves to the path //x
    "/..//x",
    "/./x",
    "/a/../x",
    "/%2e%2e//x",
    "/%2e/%2fx",
    "／／x",  # full-width solidus  # noqa: RUF001
    "/／x",  # raw non-ASCII is never produced by us  # noqa: RUF001
    "/%EF%BC%8Fx",  # the same, encoded: folds to //x
    "/%EF%BC%BCx",  # full-width reverse solidus, encoded
    "/%" + "25" * 9 + "2F",  # still encoded after many rounds
    "/" + "a" * MAX_NEXT_LENGTH,  # too long
    "",
    None,
]

GOOD_NEXT = [
    "/",
    "/app",
    "/app?x=1#f",
    "/a/b%20c",
    "/a/b/",
    "/.well-known/x",
    "/search?q=https://example.com/x",  # a URL in the query is not a redirect
    "/p?next=%2F%2Fx",  # and neither is an encoded one
    "/caf%C3%A9",
    "/a%25b",  # a literal % sign
    "/" + "a" * (MAX_NEXT_LENGTH - 1),  # exactly the limit
]


def test_enough_hostile_next_values() -> None:
    assert len(HOSTILE_NEXT) >= 25


@pytest.mark.parametrize("value", HOSTILE_NEXT)
def test_safe_next_hostile(value: str | None) -> None:
    assert safe_next(value) == "/"
    assert safe_next(value, default="/home") == "/home"


@pytest.mark.parametrize("value", GOOD_NEXT)
def test_safe_next_good(value: str) -> None:
    assert safe_next(value) == value
