"""Which request and response headers cross the proxy, and how (pure, per request only lookups).

Hop-by-hop headers (RFC 9110 §7.6.1) are stripped both ways; the client's ``Host`` and
``Expect`` are replaced; ``X-Gate-*``, untrusted identity claims and the gate's own cookie never
reach the app; ``X-Forwarded-*`` and ``X-Request-Id`` come from :class:`ClientInfo` only.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.forwarded import ClientInfo
from gateway.settings import SESSION_COOKIE, Settings

__all__ = [
    "HOP_BY_HOP",
    "MAX_MEMO_COOKIE",
    "PLAN_CACHE_SIZE",
    "HeaderPolicy",
    "app_credentials",
    "as_written",
    "build_request_headers",
    "copy_response_headers",
    "strip_cookie",
]

#: Headers that describe one connection, not the message (RFC 9110 §7.6.1); never forwarded.
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
    }
)
# Host is the upstream's own (unless PRESERVE_HOST). Expect is answered by the gate (aiohttp
# sends the 100 Continue), so it is not repeated upstream. (X-Forwarded-* and X-Request-Id are
# always overwritten from ClientInfo.)
_REPLACED = frozenset({"host", "expect"})
# Client-controlled claims about the client that only a trusted proxy may make.
_TRUSTED_ONLY = frozenset({"forwarded", "x-real-ip"})
_GATE_HEADER_PREFIX = "x-gate-"
# Set by the gate from ClientInfo on every request (their underscore twins are spoofs).
_OVERWRITTEN = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
)
_X_REQUEST_ID = "X-Request-Id"

#: Distinct header-name lists (and stripped Cookie values) remembered by a :class:`HeaderPolicy`;
#: past this many the memo starts over (a client inventing header names can't grow it). Plain
#: dicts rather than ``functools.lru_cache``: per-request hot path (benchmarked), and long
#: Cookie values are deliberately not kept.
PLAN_CACHE_SIZE = 512
#: Cookie headers longer than this are stripped every time rather than remembered.
MAX_MEMO_COOKIE = 4096


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to do with one list of incoming header names (in order, as sent)."""

    remove: tuple[str, ...]  # lower-case names to drop: policy, X-Gate-*
    connection: bool  # a Connection header: drop the headers it names too
    cookie: bool  # a Cookie header: strip the gate's cookie from it
    api_key: bool = False  # the API key's header: drop the key from it


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """Header sets precomputed once from settings (the per-request path only does lookups).

    Requests from one kind of client carry the same header names in the same order, so what
    to remove is worked out once per distinct name list (and peer trust) and remembered, as is
    each distinct ``Cookie`` value with the gate's cookie stripped.
    """

    drop_trusted: frozenset[str]
    drop_untrusted: frozenset[str]
    preserve_host: bool
    #: Names (``-`` spelling) whose ``_`` spellings are dropped from any peer.
    twins: frozenset[str] = frozenset()
    #: ``API_KEY_HEADER`` (lower case; "" with ``PASS_API_KEY``): the key never reaches the
    #: app — a custom header goes whole, ``Authorization`` only when it carries a key.
    api_key_header: str = ""
    _plans: dict[tuple[bool, tuple[str, ...]], _Plan] = field(
        default_factory=dict, compare=False, repr=False
    )
    _cookies: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> "HeaderPolicy":
        trusted = HOP_BY_HOP | _REPLACED
        untrusted = trusted | _TRUSTED_ONLY
        if settings.identity_header:
            untrusted |= {settings.identity_header.lower()}
        # WSGI/CGI/PHP/Rails read ``X_Gate_User`` and ``X-Gate-User`` alike (HTTP_X_GATE_USER),
        # so an underscore spelling of anything the gate drops, replaces or vouches for is a
        # spoof — from any peer: a trusted proxy passes on what the client sent.
        twins = untrusted | _OVERWRITTEN
        api_key = "" if settings.pass_api_key else settings.api_key_header.lower()
        return cls(trusted, untrusted, settings.preserve_host, twins, api_key)

    def plan(self, names: tuple[str, ...], peer_trusted: bool) -> _Plan:
        key = (peer_trusted, names)
        plan = self._plans.get(key)
        if plan is None:
            drop = self.drop_trusted if peer_trusted else self.drop_untrusted
            lower = {name.lower() for name in names}
            remove = sorted(n for n in lower if n in drop or self._spoof(n))
            api_key = bool(self.api_key_header) and self.api_key_header in lower
            plan = _Plan(tuple(remove), "connection" in lower, "cookie" in lower, api_key)
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _spoof(self, name: str) -> bool:
        """``X-Gate-*`` in any spelling, or an ``_`` spelling of a name the gate controls."""
        dashed = name.replace("_", "-")
        if dashed.startswith(_GATE_HEADER_PREFIX):
            return True
        return dashed != name and dashed in self.twins

    def strip_gate_cookie(self, value: str) -> str:
        """``value`` (a Cookie header) without the gate's cookie (remembered); ``value`` itself
        when it has none. Read as it will be written (:func:`as_written`): else
        ``gate_sess\\xffion=…`` would be no cookie of the gate's here and ``gate_session=…`` on
        the wire."""
        if not value.isascii():
            value = as_written(value)
        if SESSION_COOKIE not in value:
            return value
        kept = self._cookies.get(value)
        if kept is None:
            kept = strip_cookie(value, SESSION_COOKIE)
            if len(value) <= MAX_MEMO_COOKIE:
                if len(self._cookies) >= PLAN_CACHE_SIZE:
                    self._cookies.clear()
                self._cookies[value] = kept
        return kept


def build_request_headers(
    request: web.BaseRequest,
    client: ClientInfo,
    policy: HeaderPolicy,
    gate_headers: Mapping[str, str],
) -> CIMultiDict[str]:
    """Incoming headers minus hop-by-hop ones, ``X-Gate-*``, untrusted identity claims and the
    gate's cookie; plus ``X-Forwarded-*``, ``X-Request-Id`` and ``gate_headers``.

    Written for the hot path: the headers are copied in C and the few unwanted ones removed by
    name (names worked out once per distinct list of incoming names, see :class:`HeaderPolicy`),
    rather than every header being inspected in Python.
    """
    incoming = request.headers
    out: CIMultiDict[str] = CIMultiDict(incoming)
    plan = policy.plan(tuple(incoming.keys()), client.peer_trusted)
    if plan.connection:
        _remove(out, incoming.get(hdrs.CONNECTION), frozenset())
    for name in plan.remove:
        out.popall(name, None)
    if plan.cookie:
        _strip_gate_cookie(out, policy)
    if plan.api_key:
        _strip_api_key(out, policy.api_key_header)
    # Always overwritten (or removed): only ClientInfo speaks about the client.
    if client.forwarded_for:
        out[hdrs.X_FORWARDED_FOR] = client.forwarded_for
    else:
        out.popall(hdrs.X_FORWARDED_FOR, None)
    out[hdrs.X_FORWARDED_PROTO] = client.scheme
    if client.host:
        out[hdrs.X_FORWARDED_HOST] = client.host
    else:
        out.popall(hdrs.X_FORWARDED_HOST, None)
    if client.request_id:
        out[_X_REQUEST_ID] = client.request_id
    else:
        out.popall(_X_REQUEST_ID, None)
    if policy.preserve_host:
        host = incoming.get(hdrs.HOST)
        if host:
            out[hdrs.HOST] = host
    if gate_headers:
        out.update(gate_headers)
    return out


def app_credentials(headers: Mapping[str, str], policy: HeaderPolicy) -> CIMultiDict[str]:
    """The request's ``Cookie`` and API-key headers as the app may have them: without the
    gate's cookie, without an API key (the gate's credentials, never the app's; an empty
    ``Cookie`` goes). For a forward-auth proxy that sets them on the app's request from the
    gate's answer (the shipped Traefik config: ``authResponseHeaders`` removes each header it
    lists from the request, then copies the answer's), which cannot edit them itself."""
    names = {hdrs.COOKIE.lower(), hdrs.AUTHORIZATION.lower()}
    if policy.api_key_header:
        names.add(policy.api_key_header)
    out: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in headers.items() if name.lower() in names
    )
    _strip_gate_cookie(out, policy)
    if policy.api_key_header:
        _strip_api_key(out, policy.api_key_header)
    return out


def as_written(value: str) -> str:
    """A header value as aiohttp writes it (UTF-8): the escapes that bytes which were not
    UTF-8 were read as (``surrogateescape``) are dropped on the wire, so they are dropped
    here before anything is stripped from it."""
    return value.encode("utf-8", "ignore").decode("utf-8")


def _strip_gate_cookie(headers: CIMultiDict[str], policy: HeaderPolicy) -> None:
    """Remove the gate's cookie from every Cookie header (one left empty goes); headers
    without it stay as they are, in place."""
    values = headers.getall(hdrs.COOKIE, ())
    if len(values) == 1:  # the usual case
        kept = policy.strip_gate_cookie(values[0])
        if kept is values[0]:
            return
        if kept:
            headers[hdrs.COOKIE] = kept
        else:
            del headers[hdrs.COOKIE]
        return
    joined = "\n".join(values)
    if SESSION_COOKIE not in joined and joined.isascii():
        return
    headers.popall(hdrs.COOKIE)
    for value in values:
        kept = policy.strip_gate_cookie(value)
        if kept:
            headers.add(hdrs.COOKIE, kept)


def _strip_api_key(headers: CIMultiDict[str], name: str) -> None:
    """Remove the API key's header (``Authorization``: only its ``Bearer gk_…`` values, the
    app may use the header itself)."""
    if name != "authorization":
        headers.popall(name, None)
        return
    values = headers.getall(name, [])
    written = [v if v.isascii() else as_written(v) for v in values]
    kept = [v for v in written if not _is_key_bearer(v)]
    if kept != values:
        headers.popall(name)
        for value in kept:
            headers.add(name, value)


#: ``Bearer gk_…`` as nginx's and Caddy's shipped configs strip it (any case, any whitespace).
_KEY_BEARER = re.compile(r"bearer\s+gk_", re.IGNORECASE)


def _is_key_bearer(value: str) -> bool:
    return _KEY_BEARER.match(value) is not None


def strip_cookie(header: str, name: str) -> str:
    """``header`` (a Cookie value) without the ``name`` cookie; other pairs stay byte-exact."""
    kept = [p for p in header.split(";") if p.split("=", 1)[0].strip() != name]
    return ";".join(kept).strip()


#: The app's usage report on a response (:mod:`gateway.usage`): counted, then removed.
APP_USAGE_HEADER = "X-Gate-Usage"


def copy_response_headers(upstream: CIMultiDictProxy[str], out: CIMultiDict[str]) -> None:
    """Upstream response headers minus hop-by-hop ones (multiple Set-Cookie kept). Copied in
    C, then the few hop-by-hop names removed, like the request headers."""
    out.extend(upstream)
    _remove(out, upstream.get(hdrs.CONNECTION), HOP_BY_HOP)
    if APP_USAGE_HEADER in out:  # the app's usage report is the gate's, never the client's
        del out[APP_USAGE_HEADER]


def _remove(headers: CIMultiDict[str], connection: str | None, names: frozenset[str]) -> None:
    """Remove ``names`` and the headers that ``connection`` (the Connection header) names."""
    if connection is not None:
        for token in connection.split(","):
            token = token.strip()
            if token and token in headers:
                del headers[token]
    for name in names:
        if name in headers:
            del headers[name]
