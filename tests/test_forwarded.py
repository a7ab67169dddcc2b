"""Trusted proxy handling: truth tables for every combination of peer and header."""

from ipaddress import ip_network

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.forwarded import ClientInfo, TrustedNetworks, client_info

TRUSTED = TrustedNetworks(
    [ip_network("127.0.0.1/32"), ip_network("10.0.0.0/8"), ip_network("::1/128")]
)


def request(peer: str | None, headers: dict[str, str] | None = None) -> web.Request:
    req = make_mocked_request("GET", "/", headers={"Host": "app.example", **(headers or {})})
    return req.clone(remote=peer) if peer is not None else req


@pytest.mark.parametrize(
    ("ip", "trusted"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("::1", True),
        ("::2", False),
        ("::ffff:10.0.0.7", True),  # IPv4-mapped IPv6 matches the IPv4 network
        ("::ffff:11.0.0.7", False),
        ("", False),  # unix socket peer
        ("not-an-ip", False),
        ("10.0.0.1, 10.0.0.2", False),
    ],
)
def test_trusted_networks(ip: str, trusted: bool) -> None:
    assert (ip in TRUSTED) is trusted
    assert (ip in TRUSTED) is trusted  # cached answer is the same


def test_trusted_networks_none_and_empty_set() -> None:
    assert None not in TRUSTED
    assert "127.0.0.1" not in TrustedNetworks([])


def test_trusted_networks_cache_is_bounded() -> None:
    nets = TrustedNetworks([ip_network("10.0.0.0/8")])
    for i in range(10_000):
        assert f"11.0.{i // 256}.{i % 256}" not in nets
    assert len(nets._cache) <= 4096
    assert "10.9.9.9" in nets


@pytest.mark.parametrize(
    ("peer", "sent", "expected"),
    [
        (
            "203.0.113.9",
            {
                "X-Forwarded-For": "1.2.3.4",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "evil.example",
                "X-Request-Id": "spoofed",
            },
            {
                "ip": "203.0.113.9",
                "scheme": "http",
                "host": "app.example",
                "peer_trusted": False,
                "forwarded_for": "203.0.113.9",  # replaced, not appended
                "request_id": None,  # replaced by a fresh one
            },
        ),
        (
            "127.0.0.1",
            {
                "X-Forwarded-For": "198.51.100.1, 10.0.0.5",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "public.example, inner.example",
                "X-Request-Id": "abc-123",
            },
            {
                "ip": "198.51.100.1",  # rightmost untrusted hop
                "scheme": "https",
                "host": "public.example",
                "peer_trusted": True,
                "forwarded_for": "198.51.100.1, 10.0.0.5, 127.0.0.1",
                "request_id": "abc-123",
            },
        ),
    ],
    ids=["untrusted-peer-ignores-them", "trusted-peer-believes-and-appends"],
)
def test_forwarded_headers_by_peer(
    peer: str, sent: dict[str, str], expected: dict[str, object]
) -> None:
    info = client_info(request(peer, sent), TRUSTED)
    if expected["request_id"] is None:
        assert info.request_id != sent["X-Request-Id"]
        assert len(info.request_id) == 32
        expected = {**expected, "request_id": info.request_id}
    assert {name: getattr(info, name) for name in expected} == expected


def test_trusted_peer_without_headers() -> None:
    info = client_info(request("127.0.0.1"), TRUSTED)
    assert info == ClientInfo(
        "127.0.0.1", "http", "app.example", True, "127.0.0.1", info.request_id
    )


@pytest.mark.parametrize(
    ("chain", "client"),
    [
        ("1.1.1.1", "1.1.1.1"),
        ("1.1.1.1, 2.2.2.2", "2.2.2.2"),  # 2.2.2.2 is untrusted: 1.1.1.1 is its claim
        ("1.1.1.1, 10.0.0.1", "1.1.1.1"),
        ("10.0.0.2, 10.0.0.1", "10.0.0.2"),  # all trusted: the leftmost
        (" 1.1.1.1 ,10.0.0.1 ", "1.1.1.1"),
        (",,", "127.0.0.1"),
    ],
)
def test_rightmost_untrusted_hop(chain: str, client: str) -> None:
    info = client_info(request("127.0.0.1", {"X-Forwarded-For": chain}), TRUSTED)
    assert info.ip == client


def test_multiple_forwarded_for_headers_are_one_list() -> None:
    req = make_mocked_request(
        "GET", "/", headers=[("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "10.0.0.3")]
    ).clone(remote="127.0.0.1")
    info = client_info(req, TRUSTED)
    assert info.ip == "1.1.1.1"
    assert info.forwarded_for == "1.1.1.1, 10.0.0.3, 127.0.0.1"


@pytest.mark.parametrize(
    ("proto", "scheme"),
    [
        ("https", "https"),
        ("HTTPS", "https"),
        ("wss", "https"),
        ("ws", "http"),
        ("https, http", "https"),
        ("gopher", "http"),
    ],
)
def test_forwarded_proto_values(proto: str, scheme: str) -> None:
    info = client_info(request("10.0.0.1", {"X-Forwarded-Proto": proto}), TRUSTED)
    assert info.scheme == scheme


@pytest.mark.parametrize("rid", ["", "x" * 129, "has space", "caf\u00e9", "a\nb"])
def test_bad_request_ids_from_trusted_peers_are_replaced(rid: str) -> None:
    info = client_info(request("127.0.0.1", {"X-Request-Id": rid}), TRUSTED)
    assert info.request_id != rid
    assert len(info.request_id) == 32


def test_ipv6_and_unix_peers() -> None:
    assert client_info(request("::1", {"X-Forwarded-For": "2001:db8::1"}), TRUSTED).ip == (
        "2001:db8::1"
    )
    unix = client_info(request("", {"X-Forwarded-For": "1.2.3.4"}), TRUSTED)
    assert unix.peer_trusted is False
    assert unix.ip == ""
    assert unix.forwarded_for == ""


def test_missing_host() -> None:
    req = make_mocked_request("GET", "/", headers={}).clone(remote="1.2.3.4")
    assert client_info(req, TRUSTED).host == ""
