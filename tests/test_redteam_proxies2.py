"""Red team (trust-4): the shipped nginx auth cache without ``proxy_cache_bypass``, and the
gate's passthrough answers handing Traefik the app's ``Cookie`` and ``Authorization``.

Every test runs a real gate, the demo upstream, the Stripe double and the real proxy with its
shipped config (:mod:`tests.shipped`), and speaks raw HTTP where a client library would tidy
the request (repeated headers, bytes that are not UTF-8).

nginx: the cache is looked up for every request (key: the session cookie as nginx reads it, the
identity header and ``Authorization``); a payer mints answers under every odd spelling we could
think of, and nobody without the session or key gets an allow from the cache; but a key in the
URL was let through by a payer's cached allow (fixed: nginx asks about ``gk_`` in the URL).
Traefik: the app gets neither the gate's cookie nor an API key, and its own cookies and
``Authorization`` unchanged; it got both from bytes that are not UTF-8 (aiohttp drops their
escapes when it writes) and a key after ``Bearer`` + tab (fixed in ``proxy_headers``). nginx and
Caddy: the gate read its cookie / a key after a Unicode space those configs do not strip (fixed:
the gate trims spaces and tabs only)."""

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway.apikeys.keys import ApiKeys
from gateway.settings import SESSION_COOKIE
from tests.probes import probe_upstream_app
from tests.shipped import (
    FORWARD_AUTH_PROXIES,
    GATE_COOKIE_CASES,
    cookie_of,
    paying_user,
    running_shipped_caddy,
    running_shipped_nginx,
    running_shipped_traefik,
    stack_behind,
)
from tests.stack import Stack, running_stack

pytestmark = pytest.mark.timeout(300)

L1_TTL = 2
Header = tuple[str, str | bytes]


async def raw_exchange(
    base: str, target: str, headers: Sequence[Header], host: str | None = None
) -> tuple[int, bytes, bytes]:
    """One ``GET target`` to ``base`` over a new connection with exactly ``headers`` (in order,
    repeated names kept, ``bytes`` values sent as they are; ``Host``: ``host``, else the
    address of ``base``); the status, the raw head and the raw body."""
    url = URL(base)
    assert url.host is not None and url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        lines = [
            f"GET {target} HTTP/1.1".encode(),
            f"Host: {host or f'{url.host}:{url.port}'}".encode(),
        ]
        for name, value in headers:
            raw = value if isinstance(value, bytes) else value.encode()
            lines.append(name.encode() + b": " + raw)
        lines += [b"Connection: close", b"", b""]
        writer.write(b"\r\n".join(lines))
        await writer.drain()
        async with asyncio.timeout(30):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


async def raw_get(base: str, target: str, headers: Sequence[Header]) -> tuple[int, bytes]:
    """:func:`raw_exchange` of ``headers`` and ``Accept: application/json`` (an API client:
    a denial is JSON, never a redirect); its status and body."""
    status, _, body = await raw_exchange(base, target, [*headers, ("Accept", "application/json")])
    return status, body


def keys_of(stack: Stack) -> ApiKeys:
    keys = stack.services.apikeys
    assert keys is not None
    return keys


async def payer_with_key(stack: Stack, email: str) -> tuple[str, str]:
    """A new paying user's session cookie value and an API key of theirs."""
    async with stack.session() as payer:
        customer_id = await paying_user(stack, payer, email)
        session = cookie_of(stack, payer)
    key, _ = await keys_of(stack).create(customer_id, "rt")
    return session, key


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[tuple[Stack, str]]:
    async with stack_behind(tmp_path, running_shipped_nginx, {"L1_TTL": f"{L1_TTL}s"}) as both:
        yield both


@pytest.fixture
async def traefik(tmp_path: Path) -> AsyncIterator[tuple[Stack, str]]:
    async with stack_behind(tmp_path, running_shipped_traefik) as both:
        yield both


# --------------------------------------------------------------------------- nginx auth cache


async def test_nginx_cache_never_answers_who_holds_neither_session_nor_key(
    nginx: tuple[Stack, str],
) -> None:
    """A payer (session ``s``, API key ``k``) sends every spelling that might make nginx store
    their allow under a key someone else sends (an empty cookie as nginx reads it: ``=,``; a
    comma or padding inside the value; quotes; repeated Cookie or Authorization headers; the
    key's scheme in another case; an identity header with the key separator in it); after each
    (twice: cached by then, if at all) nobody holding neither gets a 200."""
    stack, base = nginx
    s, k = await payer_with_key(stack, "rt-nginx@example.com")
    payload_ts, _, sig = s.rpartition(".")
    c = SESSION_COOKIE
    minting: list[list[Header]] = [
        [("Cookie", f"{c}={s}")],
        [("Cookie", f"{c}=,"), ("Authorization", f"Bearer {k}")],
        [("Cookie", f"{c}=,; {c}={s}")],
        [("Cookie", f"{c}=,{s}")],
        [("Cookie", f"{c}={s},x")],
        [("Cookie", f"{c}={s}=")],
        [("Cookie", f"{c}={s}==; a=1")],
        [("Cookie", f'{c}="{s}"')],
        [("Cookie", f"{c}={s} ")],
        [("Cookie", f"{c}={payload_ts}.,{sig}")],
        [("Cookie", f"{c}={payload_ts}.{sig[:4]},{sig[4:]}")],
        [("Cookie", f"{c}={s}"), ("Cookie", "a=1")],
        [("Cookie", "a=1"), ("Cookie", f"{c}={s}")],
        [("Cookie", f"{c}="), ("Cookie", f"{c}={s}")],
        [("Cookie", f"{c}={s}"), ("Authorization", "x")],
        [("Cookie", f"{c}=,"), ("Authorization", f"Bearer {k}"), ("Authorization", "x")],
        [("Cookie", f"{c}=,"), ("Authorization", "x"), ("Authorization", f"Bearer {k}")],
        [("Cookie", f"{c}=,"), ("Authorization", f"bearer {k}")],
        [("Cookie", f"{c}=,"), ("Authorization", f"Bearer  {k}")],
        [("Cookie", f"{c}=x"), ("Authorization", f"BEARER {k}")],
        [("Authorization", f"Bearer {k}")],
        [("Authorization", f"Bearer {k}"), ("X-Forwarded-Email", ";")],
        [("Cookie", f"{c}={s}"), ("X-Forwarded-Email", f";;Bearer {k}")],
    ]
    borrowers: list[list[Header]] = [
        [],
        [("Cookie", f"{c}=")],
        [("Cookie", f"{c}=,")],
        [("Cookie", f'{c}=""')],
        [("Cookie", f"{c}=x")],
        [("Cookie", f"{c}={payload_ts}.")],
        [("Cookie", f"{c}={payload_ts}.{sig[:4]}")],
        [("Cookie", f"{c}={s[:-1]}")],
        [("Authorization", "x")],
        [("Cookie", f"{c}=,"), ("Authorization", "x")],
        [("Cookie", f"{c}=x"), ("Authorization", "x")],
        [("Authorization", "Bearer")],
        [("Authorization", f"Bearer {k[:-1]}")],
        [("X-Forwarded-Email", ";")],
        [("X-Forwarded-Email", f";Bearer {k}")],
        [("X-Forwarded-Email", "rt-nginx@example.com")],
    ]
    allowed = 0
    for mint in minting:
        for _ in range(2):
            status, _ = await raw_get(base, "/api/echo", mint)
        allowed += status == 200
        for borrower in borrowers:
            status, body = await raw_get(base, "/api/echo", borrower)
            assert status != 200, (mint, borrower, body[:200])
    assert allowed >= 10, "the payer's own requests pass (the test mints allows at all)"


async def test_nginx_cached_cookie_allow_does_not_let_a_key_in_the_url_through(
    nginx: tuple[Stack, str],
) -> None:
    """The gate refuses a request whose URL carries an API key (it ends up in logs: 400
    ``api_key_in_url``) for a signed-in payer too; nginx's cache, keyed without the URL, must
    not answer it with the payer's cached allow."""
    stack, base = nginx
    s, k = await payer_with_key(stack, "rt-url@example.com")
    cookie: list[Header] = [("Cookie", f"{SESSION_COOKIE}={s}")]
    for _ in range(2):
        status, _ = await raw_get(base, "/api/echo", cookie)
        assert status == 200  # cached now
    status, body = await raw_get(base, f"/api/echo?key={k}", cookie)
    assert status == 400, body[:300]
    assert b"api_key_in_url" in body


# --------------------------------------------------------------------------- Traefik credentials


def app_saw(body: bytes) -> list[tuple[str, str]]:
    """The headers the demo upstream's ``/api/echo`` says it got (name, value)."""
    return [(name, value) for name, value in json.loads(body)["headers"]]


def cookie_names(seen: list[tuple[str, str]]) -> list[str]:
    """Every cookie name in the app's ``Cookie`` headers, trimmed as lenient parsers do."""
    return [
        pair.split("=", 1)[0].strip()
        for name, value in seen
        if name.lower() == "cookie"
        for pair in value.replace(",", ";").split(";")
    ]


async def test_traefik_app_never_gets_the_gate_cookie_or_a_key_from_bytes_not_utf8(
    traefik: tuple[Stack, str],
) -> None:
    """The gate reads the client's headers as UTF-8 (bytes that are not: kept as escapes) and
    writes its answer as UTF-8, which drops those escapes. So ``gate_sess\\xffion=S`` is no
    cookie of the gate's when it strips, and ``gate_session=S`` in the answer Traefik copies
    onto the app's request; ``Bearer gk\\xff_…`` likewise becomes the API key."""
    stack, base = traefik
    s, k = await payer_with_key(stack, "rt-bytes@example.com")
    sent: list[list[Header]] = [
        [("Cookie", f"{SESSION_COOKIE}={s}; gate_sess\xffion={s}; theme=dark".encode("latin-1"))],
        [
            ("Cookie", f"{SESSION_COOKIE}={s}; theme=dark"),
            ("Authorization", b"Bearer gk\xff_" + k[3:].encode()),
        ],
    ]
    for headers in sent:
        status, body = await raw_get(base, "/api/echo", headers)
        assert status == 200, body[:300]
        seen = app_saw(body)
        assert SESSION_COOKIE not in cookie_names(seen), seen
        assert not any(s in value or k in value for _, value in seen), seen
        assert "theme" in cookie_names(seen)


async def test_traefik_app_never_gets_a_key_in_odd_spacing(traefik: tuple[Stack, str]) -> None:
    """``Authorization: Bearer<TAB>gk_…`` is no API key to the gate (it decides by the cookie
    beside it), but it is one to nginx's and Caddy's stripping (``bearer\\s+gk_``) and to an
    app's log: through Traefik the gate must not hand it to the app either."""
    stack, base = traefik
    s, k = await payer_with_key(stack, "rt-tab@example.com")
    for spelling in (f"Bearer\t{k}", f"bearer \t{k}", f"BEARER\t\t{k}"):
        headers: list[Header] = [("Cookie", f"{SESSION_COOKIE}={s}"), ("Authorization", spelling)]
        status, body = await raw_get(base, "/api/echo", headers)
        assert status == 200, body[:300]
        seen = app_saw(body)
        assert not any(k in value for _, value in seen), (spelling, seen)


async def test_gate_proxy_never_sends_the_gate_cookie_or_a_key_from_bytes_not_utf8(
    tmp_path: Path,
) -> None:
    """The gate's own reverse proxy writes the app's request with the same writer (UTF-8,
    escapes of other bytes dropped): the same two spellings, straight to the gate."""
    async with running_stack(tmp_path) as stack:
        s, k = await payer_with_key(stack, "rt-own@example.com")
        sent: list[list[Header]] = [
            [("Cookie", f"{SESSION_COOKIE}={s}; gate_sess\xffion={s}; a=1".encode("latin-1"))],
            [
                ("Cookie", f"{SESSION_COOKIE}={s}; a=1"),
                ("Authorization", b"Bearer gk\xff_" + k[3:].encode()),
            ],
            [("Cookie", f"{SESSION_COOKIE}={s}; a=1"), ("Authorization", f"Bearer\t{k}")],
        ]
        for headers in sent:
            status, body = await raw_get(stack.base, "/api/echo", headers)
            assert status == 200, body[:300]
            seen = app_saw(body)
            assert SESSION_COOKIE not in cookie_names(seen), seen
            assert not any(s in value or k in value for _, value in seen), seen


def values_of(seen: list[tuple[str, str]], name: str) -> list[str]:
    return [value for n, value in seen if n.lower() == name]


async def test_traefik_app_gets_its_own_credentials_unchanged(traefik: tuple[Stack, str]) -> None:
    """Every spelling of the gate's cookie a browser (or a client) may send goes, the app's own
    cookies and ``Authorization`` arrive as sent: repeated headers, a non-ASCII (UTF-8) value,
    another bearer token, two ``Authorization`` headers of the app's, an API key beside them
    refused rather than passed."""
    stack, base = traefik
    s, k = await payer_with_key(stack, "rt-own-creds@example.com")
    gate = f"{SESSION_COOKIE}={s}"
    Case = tuple[list[Header], list[str], list[str]]
    browser: list[Case] = [
        ([("Cookie", sent.format(s=s))], [want] if want else [], [])
        for sent, want in GATE_COOKIE_CASES
    ]
    cases: list[Case] = [
        *browser,
        ([("Cookie", gate), ("Cookie", "a=1; b=2")], ["a=1; b=2"], []),
        # (a=1 first, then the gate's: the gate reads the first Cookie header only, so that is
        # a 401, not a pass — RFC 6265 clients send one.) The echo shows its bytes as Latin-1:
        (
            [("Cookie", f"{gate}; n=Jos\u00e9".encode())],
            ["n=Jos\u00e9".encode().decode("latin-1")],
            [],
        ),
        ([("Cookie", gate), ("Authorization", "Basic dXNlcjpwdw==")], [], ["Basic dXNlcjpwdw=="]),
        ([("Cookie", gate), ("Authorization", "Bearer app-token")], [], ["Bearer app-token"]),
        (
            [("Cookie", gate), ("Authorization", "Basic a"), ("Authorization", "Bearer b")],
            [],
            ["Basic a", "Bearer b"],
        ),
        ([("Cookie", "theme=dark"), ("Authorization", f"Bearer {k}")], ["theme=dark"], []),
        (
            [("Cookie", f"theme=dark; {gate}"), ("Authorization", f"bearer  {k}")],
            ["theme=dark"],
            [],
        ),
    ]
    for headers, cookies, authorization in cases:
        status, body = await raw_get(base, "/api/echo", headers)
        assert status == 200, (headers, body[:300])
        seen = app_saw(body)
        assert values_of(seen, "cookie") == cookies, headers
        assert values_of(seen, "authorization") == authorization, headers
        assert not any(s in value or k in value for _, value in seen), headers
    # A key beside another Authorization is refused (the gate's rule), never half passed.
    two = [("Authorization", "Basic a"), ("Authorization", f"Bearer {k}")]
    status, body = await raw_get(base, "/api/echo", two)
    assert status == 401 and b"invalid_api_key" in body, body[:300]


async def test_traefik_public_path_and_gate_paths_never_hand_over_the_gate_cookie(
    tmp_path: Path,
) -> None:
    """A public path is answered without deciding who asks, and the bare gate prefix goes to
    the app: the credentials the answer hands back are stripped there too."""
    env = {"PUBLIC_PATHS": "/api/echo/public/*"}
    async with stack_behind(tmp_path, running_shipped_traefik, env) as (stack, base):
        s, k = await payer_with_key(stack, "rt-public@example.com")
        headers: list[Header] = [
            ("Cookie", f"a=1; {SESSION_COOKIE}={s}"),
            ("Authorization", f"Bearer\t{k}"),
        ]
        for path in ("/api/echo/public/x", "/api/echo/public/../public/y"):
            status, body = await raw_get(base, path, headers)
            assert status == 200, body[:300]
            seen = app_saw(body)
            assert values_of(seen, "cookie") == ["a=1"], seen
            assert not any(s in value or k in value for _, value in seen), seen
        status, body = await raw_get(base, "/api/echo/public/x", [("Cookie", "a=1")])
        assert status == 200 and values_of(app_saw(body), "cookie") == ["a=1"]


async def test_caddy_ignores_the_credentials_in_the_gates_answer(tmp_path: Path) -> None:
    """Caddy copies only its ``copy_headers`` from the answer and strips the gate's cookie and
    a key itself: the app gets one ``Cookie`` (stripped) and the app's ``Authorization``, as
    before the gate's answer carried them."""
    async with stack_behind(tmp_path, running_shipped_caddy) as (stack, base):
        s, k = await payer_with_key(stack, "rt-caddy@example.com")
        gate = f"{SESSION_COOKIE}={s}"
        for headers, cookies, authorization in [
            ([("Cookie", f"a=1; {gate}"), ("Authorization", "Basic x")], ["a=1"], ["Basic x"]),
            ([("Cookie", f"{gate}; b=2"), ("Authorization", f"Bearer\t{k}")], ["b=2"], []),
            ([("Cookie", "c=3"), ("Authorization", f"Bearer {k}")], ["c=3"], []),
        ]:
            status, body = await raw_get(base, "/api/echo", headers)
            assert status == 200, body[:300]
            seen = app_saw(body)
            assert values_of(seen, "cookie") == cookies, seen
            assert values_of(seen, "authorization") == authorization, seen
            assert not any(s in value or k in value for _, value in seen), seen


async def answer_headers(base: str, headers: Sequence[Header]) -> tuple[int, bytes]:
    """The raw head of the gate's passthrough forward-auth answer to ``headers``."""
    status, head, _ = await raw_exchange(
        base, "/_gate/auth?mode=passthrough", headers, host="app.example.com"
    )
    return status, head


@pytest.mark.parametrize("billing", ["on", "off"])
async def test_passthrough_answer_strips_on_gate_paths_and_with_billing_off(
    tmp_path: Path, billing: str
) -> None:
    """The 200s that decide nothing (a gate path asked about by a config that routes one to
    the app; billing off) hand back the credentials stripped too, whatever their bytes."""
    async with running_stack(tmp_path, {"BILLING_MODE": billing}) as stack:
        forged = "gate_session=eyJzIjoiZm9yZ2VkIn0.x.y"
        for uri in ("/_gate/x", "/api/x"):
            if billing == "on" and uri == "/api/x":
                continue  # decided: anonymous, a denial
            status, head = await answer_headers(
                stack.base,
                [
                    ("X-Forwarded-Uri", uri),
                    ("Cookie", f"a=1; {forged}; gate_sess\xffion=z; b=2".encode("latin-1")),
                    ("Authorization", "Bearer\tgk_test_" + "a" * 36),
                ],
            )
            assert status == 200, head
            assert b"gate_session" not in head and b"gk_" not in head, head
            assert b"\r\nCookie: a=1; b=2\r\n" in head, head


@pytest.mark.parametrize("proxy", ["nginx", "caddy"])
async def test_the_gate_reads_no_cookie_the_proxies_do_not_strip(
    tmp_path: Path, proxy: str
) -> None:
    """The shipped nginx and Caddy configs strip the gate's cookie with spaces and tabs around
    its name (``\\s`` of PCRE and RE2: ASCII). The gate must not read its cookie from a name
    it trims more than that (``str.strip`` trims Unicode spaces: NBSP, EM SPACE, IDEOGRAPHIC
    SPACE, NEL), or the app gets a cookie the gate signs a user in with, which an app reading
    UTF-8 with Python's ``\\s`` parses as ``gate_session``."""
    async with stack_behind(tmp_path, FORWARD_AUTH_PROXIES[proxy]) as (stack, base):
        async with stack.session() as payer:
            await paying_user(stack, payer, "rt-nbsp@example.com")
            s = cookie_of(stack, payer)
        for space in ("\u00a0", "\u2003", "\u3000", "\u0085"):
            for cookie in (f"a=1; {space}{SESSION_COOKIE}={s}", f"{SESSION_COOKIE}{space}={s}"):
                status, body = await raw_get(base, "/api/echo", [("Cookie", cookie.encode())])
                if status == 200:
                    seen = app_saw(body)
                    assert not any(s in value for _, value in seen), (repr(space), seen)
                else:
                    assert status == 401, body[:300]


@pytest.mark.parametrize("proxy", ["nginx", "caddy"])
async def test_the_gate_takes_no_key_the_proxies_do_not_strip(tmp_path: Path, proxy: str) -> None:
    """nginx and Caddy strip ``(?i)bearer\\s+gk_`` (ASCII whitespace) from the app's request;
    the gate must not accept a key after a Unicode space (``Bearer \\u00a0gk_…``: Python's
    ``strip`` trims it), or the app gets a key the gate lets in with."""
    async with stack_behind(tmp_path, FORWARD_AUTH_PROXIES[proxy]) as (stack, base):
        async with stack.session() as payer:
            customer_id = await paying_user(stack, payer, "rt-keyspace@example.com")
        k, _ = await keys_of(stack).create(customer_id, "rt")
        for space in ("\u00a0", "\u2003", "\u3000"):
            header = f"Bearer {space}{k}".encode()
            status, body = await raw_get(base, "/api/echo", [("Authorization", header)])
            if status == 200:
                seen = app_saw(body)
                assert not any(k in value for _, value in seen), (repr(space), seen)
            else:
                assert status == 401, body[:300]


async def _ws_headers(request: web.Request) -> web.WebSocketResponse:
    """A WebSocket that sends the handshake's headers (as the echo shows them) and closes."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_json([[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers])
    await ws.close()
    return ws


async def test_traefik_websocket_handshake_gets_the_apps_credentials_only(tmp_path: Path) -> None:
    """Streamlit's whole UI is one WebSocket: its handshake through Traefik carries the app's
    cookies and Authorization as sent, never the gate's cookie or a key."""
    upstream = probe_upstream_app()
    upstream.router.add_get("/ws/headers", _ws_headers)
    async with running_stack(tmp_path, upstream_app=upstream) as stack:
        gate_port, app_port = stack.gate_server.port, stack.upstream.port
        assert gate_port is not None and app_port is not None
        async with running_shipped_traefik(gate_port, app_port) as base:
            s, k = await payer_with_key(stack, "rt-ws@example.com")
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as plain:
                for headers, authorization in [
                    ({"Authorization": "Basic x"}, ["Basic x"]),
                    ({"Authorization": f"Bearer\t{k}"}, []),
                ]:
                    cookie = f"a=1; {SESSION_COOKIE}={s}; b=2"
                    async with plain.ws_connect(
                        f"{base}/ws/headers", headers={"Cookie": cookie, **headers}
                    ) as ws:
                        seen = [(n, v) for n, v in await ws.receive_json(timeout=30)]
                    assert values_of(seen, "cookie") == ["a=1; b=2"], seen
                    assert values_of(seen, "authorization") == authorization, seen
                    assert not any(s in value or k in value for _, value in seen), seen


async def test_nginx_sign_out_ends_every_spelling_of_the_session_in_the_cache(
    nginx: tuple[Stack, str],
) -> None:
    """The gate accepts its cookie's value with ``=`` padding, quoted, or with a space after
    it, and nginx keys each spelling apart: a payer who keeps allows cached under several
    spellings loses them all when the session is revoked (within the bound; the deadline
    here only stops a broken test)."""
    stack, base = nginx
    async with stack.session() as payer:
        customer_id = await paying_user(stack, payer, "rt-signout@example.com")
        s = cookie_of(stack, payer)
    c = SESSION_COOKIE
    spellings = [f"{c}={s}", f"{c}={s}=", f"{c}={s}==", f'{c}="{s}"', f"{c}={s} ; a=1"]
    for cookie in spellings:
        for _ in range(2):
            status, body = await raw_get(base, "/api/echo", [("Cookie", cookie)])
            assert status == 200, (cookie, body[:200])
    assert await stack.services.sessions.revoke_all(customer_id) >= 1
    deadline = asyncio.get_running_loop().time() + L1_TTL + 30
    pending = list(spellings)
    while pending:
        assert asyncio.get_running_loop().time() < deadline, f"still allowed: {pending}"
        for cookie in list(pending):
            status, _ = await raw_get(base, "/api/echo", [("Cookie", cookie)])
            if status != 200:
                assert status == 401
                pending.remove(cookie)
        await asyncio.sleep(0.1)
    for cookie in spellings:  # and none comes back
        status, _ = await raw_get(base, "/api/echo", [("Cookie", cookie)])
        assert status == 401, cookie


@pytest.mark.parametrize("proxy", ["nginx", "caddy", "traefik"])
async def test_gate_prefix_dot_segments_never_reach_the_app_unasked(
    tmp_path: Path, proxy: str
) -> None:
    """Each config routes ``/_gate/`` to the gate without asking it (its own pages); a path
    that only starts there (dot segments, encoded ones, a ``;`` segment) must still be decided:
    an anonymous client never gets the app's answer."""
    async with stack_behind(tmp_path, FORWARD_AUTH_PROXIES[proxy]) as (_, base):
        for path in (
            "/_gate/../api/echo",
            "/_gate/%2e%2e/api/echo",
            "/_gate%2f..%2fapi/echo",
            "/_gate/.%2E/api/echo",
            "/_gate//../api/echo",
            "/_gate/..%5capi/echo",
            "/_gate/auth/../../api/echo",
            "/_gate/x/..;/../api/echo",
        ):
            status, body = await raw_get(base, path, [])
            assert status in (401, 404), (path, status, body[:200])
            assert b'"headers"' not in body, path
