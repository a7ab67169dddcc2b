"""Spoofed identity headers spelled with underscores, against a real WSGI upstream.

WSGI, CGI, PHP and Rails read request headers as ``HTTP_*`` environment variables, with ``-``
mapped to ``_``: ``X_Gate_User`` and ``X-Gate-User`` both become ``HTTP_X_GATE_USER``. So the
gate must drop a header whose name, after mapping ``_`` to ``-``, is one it drops or replaces —
for any peer, trusted or not (a trusted proxy passes on what the client sent).
"""

import json
import threading
from collections.abc import Iterable, Iterator
from ipaddress import ip_network
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from multidict import CIMultiDict

from gateway.proxy_headers import HeaderPolicy, app_credentials
from tests.conftest import GateFactory, gate_settings, make_settings

UNTRUSTED = (ip_network("10.0.0.0/8"),)  # the loopback test client is not a trusted proxy


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _environ_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """Answer with every ``HTTP_*`` variable the WSGI server made of the request's headers."""
    http = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(http).encode()]


@pytest.fixture
def wsgi_upstream() -> Iterator[str]:
    """The standard library's ``wsgiref`` server on 127.0.0.1, in a thread."""
    server: WSGIServer = make_server("127.0.0.1", 0, _environ_app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


SPOOFS = {
    "X_Gate_User": "cus_victim",
    "x_gate_email": "victim@example.com",
    "X-Gate_Status": "active",
    "X_Forwarded_Email": "victim@example.com",  # the IDENTITY_HEADER below
    "X_Forwarded_For": "198.51.100.7",
    "X_Real_IP": "198.51.100.7",
    "X_Request_Id": "spoofed-id",
}


@pytest.mark.parametrize("trusted", [False, True])
async def test_underscore_spellings_never_reach_a_wsgi_app(
    wsgi_upstream: str, gate: GateFactory, trusted: bool
) -> None:
    overrides: dict[str, Any] = {"identity_header": "X-Forwarded-Email"}
    if not trusted:
        overrides["trusted_proxies"] = UNTRUSTED
    client = await gate(gate_settings(wsgi_upstream, **overrides))
    async with client.get("/public/page", headers=SPOOFS) as resp:
        assert resp.status == 200
        environ: dict[str, str] = await resp.json()
    leaked = {k: v for k, v in environ.items() if v in SPOOFS.values() or "victim" in v}
    assert leaked == {}, leaked
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"  # the gate's own, not the spoof
    assert environ["HTTP_X_REQUEST_ID"] != "spoofed-id"


async def test_the_trusted_identity_header_itself_still_reaches_the_app(
    wsgi_upstream: str, gate: GateFactory
) -> None:
    client = await gate(gate_settings(wsgi_upstream, identity_header="X-Forwarded-Email"))
    headers = {"X-Forwarded-Email": "alice@example.com", "X_Forwarded_Email": "eve@example.com"}
    async with client.get("/x", headers=headers) as resp:
        environ: dict[str, str] = await resp.json()
    assert environ["HTTP_X_FORWARDED_EMAIL"] == "alice@example.com"


@pytest.mark.parametrize(
    ("name", "trusted", "dropped"),
    [
        ("X_Gate_User", True, True),
        ("x-gate_plan", False, True),
        ("X_Forwarded_Email", True, True),  # an underscore twin: dropped even from a trusted peer
        ("X-Forwarded-Email", True, False),  # the real one, from a trusted peer: kept
        ("X-Forwarded-Email", False, True),
        ("X_Forwarded_Host", True, True),
        ("Transfer_Encoding", True, True),
        ("My_Header", False, False),  # an app's own underscore header: not ours to drop
    ],
)
def test_header_names_are_compared_after_mapping_underscores(
    name: str, trusted: bool, dropped: bool
) -> None:
    policy = HeaderPolicy.from_settings(make_settings(identity_header="X-Forwarded-Email"))
    plan = policy.plan(("Host", name, "Accept"), trusted)
    assert (name.lower() in plan.remove) is dropped


@pytest.mark.parametrize(
    ("incoming", "env", "expected"),
    [
        # the gate's cookie goes, the app's stay; a Cookie of only the gate's goes entirely
        (
            [("Cookie", "theme=dark; gate_session=s1; lang=en")],
            {},
            [("Cookie", "theme=dark; lang=en")],
        ),
        ([("Cookie", "gate_session=s1")], {}, []),
        ([("Cookie", "a=1"), ("Cookie", "gate_session=s1")], {}, [("Cookie", "a=1")]),
        # an API key goes, the app's own Authorization stays
        ([("Authorization", "Bearer gk_live_x")], {}, []),
        ([("Authorization", "bearer  gk_test_x")], {}, []),
        ([("Authorization", "Basic YTpi")], {}, [("Authorization", "Basic YTpi")]),
        # PASS_API_KEY: the operator hands the key to the app
        (
            [("Authorization", "Bearer gk_live_x")],
            {"PASS_API_KEY": "true"},
            [("Authorization", "Bearer gk_live_x")],
        ),
        # another key header: it never comes back; nothing else is handed back
        ([("X-Api-Key", "gk_live_x"), ("Accept", "*/*")], {"API_KEY_HEADER": "X-Api-Key"}, []),
    ],
)
def test_app_credentials_hand_back_what_the_app_may_see(
    incoming: list[tuple[str, str]], env: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    """What the gate's passthrough answer hands back for Traefik's ``authResponseHeaders``."""
    policy = HeaderPolicy.from_settings(make_settings(env))
    assert list(app_credentials(CIMultiDict(incoming), policy).items()) == expected
