"""Trusted proxy handling: who the client really is (IP, scheme, host, request id).

Like uvicorn's ``ProxyHeadersMiddleware``: ``X-Forwarded-For``, ``X-Forwarded-Proto``,
``X-Forwarded-Host`` and ``X-Request-Id`` are believed only when the TCP peer is in
``TRUSTED_PROXIES``. From anyone else they are ignored (and replaced on the way upstream).

:class:`PublicOrigin` is where every absolute URL the gate hands out starts (see the README,
"Public URL and allowed hosts"): ``PUBLIC_URL``, or with ``ALLOWED_HOSTS`` the request's host once
it is on that list — never a ``Host`` / ``X-Forwarded-Host`` taken alone, which an attacker
chooses (a forged Host would otherwise put the attacker's site into the emailed sign-in link).
"""

import ipaddress
import random
import re
from collections.abc import Iterable
from typing import NamedTuple

from aiohttp import hdrs, web
from multidict import MultiMapping

from gateway.settings import IPNetwork, Settings

_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
# Visible ASCII only (it ends up in log lines and upstream headers).
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_CACHE_SIZE = 4096
# A Host header value: a name or IPv4 address, or a bracketed IPv6 address, and a port.
_HOST_HEADER = re.compile(
    r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"\.?|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?"
)
#: The port a URL of each scheme has when it names none.
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: An ``ALLOWED_HOSTS`` pattern's port: ``host:*``.
_ANY_PORT = -1
_getrandbits = random.getrandbits


class ClientInfo(NamedTuple):
    """Facts about the client, after trusted-proxy resolution.

    Immutable; a named tuple rather than a frozen dataclass because one is built for every
    request and a frozen dataclass's ``__init__`` costs several times more."""

    ip: str  # real client IP ("" for a unix-socket peer)
    scheme: str  # http | https
    host: str  # Host as the client sent it ("" when absent)
    peer_trusted: bool  # the TCP peer is in TRUSTED_PROXIES
    forwarded_for: str  # X-Forwarded-For to send upstream
    request_id: str = ""  # X-Request-Id: kept from a trusted peer, else generated


#: Where the app stores the request's :class:`ClientInfo` (read by the access log).
CLIENT_KEY = web.RequestKey("client", ClientInfo)


class _Memoised:
    """A membership test of strings, memoised: ``_lookup`` runs once per distinct value.

    Anything that is not a non-empty string is not a member. The cache is bounded: a scan of
    many peers or Hosts cannot grow it (it is cleared when full).
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[str, bool] = {}

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str) or not value:
            return False
        hit = self._cache.get(value)
        if hit is None:
            hit = self._lookup(value)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[value] = hit
        return hit

    def _lookup(self, value: str) -> bool:
        raise NotImplementedError


class TrustedNetworks(_Memoised):
    """A set of CIDRs with a cached ``ip in networks`` test.

    IPv4-mapped IPv6 peers (``::ffff:10.0.0.1``) match the IPv4 networks; anything that is not
    an IP address (a unix socket peer, ``None``, garbage) is untrusted.
    """

    __slots__ = ("_nets",)

    def __init__(self, nets: Iterable[IPNetwork]) -> None:
        super().__init__()
        self._nets = tuple(nets)

    def _lookup(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
        return any(a in net for a in candidates for net in self._nets if a.version == net.version)

    def __repr__(self) -> str:
        return f"TrustedNetworks({', '.join(map(str, self._nets))})"


def client_info(request: web.BaseRequest, trusted: TrustedNetworks) -> ClientInfo:
    """Resolve the real client of ``request``, believing forwarded headers only from
    trusted peers."""
    peer = request.remote or ""
    headers = request.headers
    host = headers.get(hdrs.HOST, "")
    scheme = request.scheme
    if peer not in trusted:
        return ClientInfo(peer, scheme, host, False, peer, _new_request_id())

    ip = peer
    forwarded_for = peer
    chain = headers.getall(hdrs.X_FORWARDED_FOR, None)
    if chain:
        hops = _hops(chain)
        if hops:
            ip = _rightmost_untrusted(hops, trusted)
            forwarded_for = f"{', '.join(hops)}, {peer}"
    proto = headers.get(hdrs.X_FORWARDED_PROTO)
    if proto:
        scheme = _SCHEMES.get(_first(proto).lower(), scheme)
    fwd_host = headers.get(hdrs.X_FORWARDED_HOST)
    if fwd_host:
        host = _first(fwd_host) or host
    rid = headers.get("X-Request-Id")
    if rid is None or _REQUEST_ID.fullmatch(rid) is None:
        rid = _new_request_id()
    return ClientInfo(ip, scheme, host, True, forwarded_for, rid)


def forwarded_client(headers: MultiMapping[str], trusted: TrustedNetworks) -> str | None:
    """The client IP that a trusted peer's ``X-Forwarded-For`` names (as :func:`client_info`
    resolves it), or None without one. Only for requests whose TCP peer is trusted."""
    chain = headers.getall(hdrs.X_FORWARDED_FOR, None)
    hops = _hops(chain) if chain else None
    return _rightmost_untrusted(hops, trusted) if hops else None


def _hops(chain: list[str]) -> list[str]:
    return [hop for value in chain for h in value.split(",") if (hop := h.strip())]


def _rightmost_untrusted(hops: list[str], trusted: TrustedNetworks) -> str:
    """Each proxy appends the address it saw, so walk from the right; the first hop we do not
    trust is the client. If every hop is trusted, the leftmost is the client."""
    for hop in reversed(hops):
        if hop not in trusted:
            return hop
    return hops[0]


def _first(value: str) -> str:
    return value.split(",", 1)[0].strip()


def _new_request_id() -> str:
    # An id to correlate log lines, not a secret: the PRNG is enough and avoids a syscall.
    return "%032x" % _getrandbits(128)  # noqa: UP031 (faster than an f-string here)


class AllowedHosts:
    """``ALLOWED_HOSTS``: exact names, and ``*.example.com`` for any subdomain of example.com
    (not example.com itself), each with the port it allows: none written, the scheme's default
    port only (80 for http, 443 for https); ``host:8443`` that port; ``host:*`` any port.

    The port matters because the absolute URLs the gate hands out keep it: with ports ignored,
    ``Host: app.example.com:8443`` put ``http://app.example.com:8443/…?token=…`` into the
    mailed sign-in link, for whoever listens on that port.

    :meth:`authority` is memoised per (scheme, Host) and bounded like :class:`_Memoised`."""

    __slots__ = ("_cache", "_exact", "_suffixes")

    def __init__(self, hosts: Iterable[str]) -> None:
        self._cache: dict[tuple[str, str], str | None] = {}
        exact: dict[str, set[int | None]] = {}
        suffixes: list[tuple[str, int | None]] = []
        for entry in hosts:
            name, port = _split_pattern(entry)
            if name.startswith("*."):
                suffixes.append((name[1:], port))  # ".example.com"
            else:
                exact.setdefault(name, set()).add(port)
        self._exact = {name: frozenset(ports) for name, ports in exact.items()}
        self._suffixes = tuple(suffixes)

    def authority(self, host: str, scheme: str) -> str | None:
        """``name[:port]`` (lower case; no port when it is the scheme's default) for a Host
        header value the list allows on ``scheme``, else None (also for a malformed Host or
        a port outside 1 to 65535)."""
        key = (scheme, host)
        if key in self._cache:
            return self._cache[key]
        found = self._lookup(host, scheme)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = found
        return found

    def _lookup(self, host: str, scheme: str) -> str | None:
        match = _HOST_HEADER.fullmatch(host)
        if match is None:
            return None
        name = match.group("name").lower().rstrip(".")
        default = _DEFAULT_PORTS.get(scheme)
        port = default if match.group("port") is None else int(match.group("port"))
        if port is None or not 1 <= port <= 65535:
            return None

        def allows(spec: int | None) -> bool:
            return spec in (_ANY_PORT, port) or (spec is None and port == default)

        listed = any(allows(spec) for spec in self._exact.get(name, ())) or any(
            name.endswith(suffix) and allows(spec) for suffix, spec in self._suffixes
        )
        if not listed:
            return None
        return name if port == default else f"{name}:{port}"


def _split_pattern(entry: str) -> tuple[str, int | None]:
    """An ``ALLOWED_HOSTS`` entry (validated by the settings) as (name, port): port None when
    none is written, :data:`_ANY_PORT` for ``*``."""
    name, sep, port = entry.rpartition(":")
    if not sep or name.endswith(":") or (entry.startswith("[") and not name.endswith("]")):
        return entry, None  # no port (an IPv6 literal's colons are inside its brackets)
    return name, _ANY_PORT if port == "*" else int(port)


class PublicOrigin:
    """``scheme://host`` for the absolute URLs the gate hands out.

    - ``ALLOWED_HOSTS`` set: the request's host and port (``X-Forwarded-Host`` from a trusted
      peer, else ``Host``) and scheme when the list allows that host on that port
      (:class:`AllowedHosts`); else ``PUBLIC_URL`` (may be "").
      Requests for other hosts are refused with 400 before they reach a handler
      (:func:`gateway.app.create_app`), so this fallback only serves the exempt endpoints.
    - else ``PUBLIC_URL``; "" when unset (billing off, where no page builds a URL; the
      consistency check requires one of the two when billing is on).
    """

    __slots__ = ("allowed", "public_url")

    def __init__(self, settings: Settings) -> None:
        self.public_url = settings.public_url
        self.allowed = AllowedHosts(settings.allowed_hosts) if settings.allowed_hosts else None

    def host_allowed(self, client: ClientInfo) -> bool:
        """Whether the gate answers for ``client.host`` on ``client.scheme`` (always, without
        ``ALLOWED_HOSTS``)."""
        return (
            self.allowed is None or self.allowed.authority(client.host, client.scheme) is not None
        )

    def base(self, client: ClientInfo) -> str:
        """The origin to build absolute URLs on, for this request: the listed host with its
        port (none for the scheme's default)."""
        if self.allowed is not None:
            authority = self.allowed.authority(client.host, client.scheme)
            if authority is not None:
                return f"{client.scheme}://{authority}"
        return self.public_url


#: The app's :class:`PublicOrigin` (set by :func:`gateway.app.create_app`).
ORIGIN = web.AppKey("origin", PublicOrigin)
