"""Settings: one table drives validation, ``gateway --help``, ``.env.example`` and the README.

Every setting is read from the environment (optionally loaded from a ``.env`` file by the CLI),
validated once at startup into the frozen :class:`Settings` dataclass. A bad value raises
:class:`SettingsError`, whose message is one line naming the variable, the value and what is
allowed; the CLI prints it and exits with status 2.
"""

import difflib
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from gateway.apikeys.config import check_header, parse_rate
from gateway.dburl import DatabaseURLError, hide_password, parse_database_url
from gateway.errors import GatewayError
from gateway.features import FeatureRules, parse_price_features
from gateway.metered import parse_metered_prices
from gateway.paths import PublicPaths
from gateway.usage.config import UsageConfig, parse_usage

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The gate's own session cookie. Reserved: it is never forwarded upstream.
SESSION_COOKIE = "gate_session"

LIVE_KEY_PREFIXES = ("sk_live_", "rk_live_")
SECRET_KEY_PREFIXES = ("sk_live_", "rk_live_", "sk_test_", "rk_test_")


class SettingsError(GatewayError, ValueError):
    """A setting has a bad value. ``str(err)`` is the one-line message for the operator."""


@dataclass(frozen=True)
class Setting:
    name: str
    # str | url | dburl | int | duration | bool | choice | list | cidrs | hosts | prefix | secret
    kind: str
    default: str
    help: str
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    group: str = "General"


# The table. Order is the order of the docs and of .env.example.
TABLE: tuple[Setting, ...] = (
    # --- server
    Setting(
        "UPSTREAM_URL",
        "url",
        "",
        "Base URL of the app behind the gate (http/https). Unset: `gateway` runs the local demo.",
        group="Server",
    ),
    Setting(
        "HOST",
        "str",
        "127.0.0.1",
        "Interface to listen on (0.0.0.0 in containers).",
        group="Server",
    ),
    Setting(
        "PORT",
        "int",
        "8080",
        "TCP port to listen on (0: a free port, logged as `port_chosen`).",
        minimum=0,
        group="Server",
    ),
    Setting(
        "WORKERS",
        "int",
        "1",
        "Worker processes sharing the port (SO_REUSEPORT).",
        minimum=1,
        group="Server",
    ),
    Setting(
        "PUBLIC_URL",
        "url",
        "",
        "External base URL of the gate: every absolute URL it hands out (sign-in links, Stripe "
        "return URLs, redirects) starts with it. Required when billing is on (outside the demo) "
        "unless ALLOWED_HOSTS is set.",
        group="Server",
    ),
    # --- host allow-list
    Setting(
        "ALLOWED_HOSTS",
        "hosts",
        "",
        "Comma-separated hosts the gate answers for (several domains); *.example.com "
        "matches its subdomains. A host without a port allows the scheme's default port only "
        "(80, 443); host:8443 names that port, host:* any port (development). Other Hosts get "
        "400, and absolute URLs use the request's validated host and port. Unset: URLs come "
        "from PUBLIC_URL.",
        group="Server",
    ),
    Setting(
        "TRUSTED_PROXIES",
        "cidrs",
        "127.0.0.1/32,::1/128",
        "CIDRs of proxies whose X-Forwarded-* and identity headers are believed. Never 0.0.0.0/0.",
        group="Server",
    ),
    Setting(
        "PRESERVE_HOST",
        "bool",
        "false",
        "Send the client's Host header upstream instead of "
        "the upstream's own (for apps that check Origin against Host, e.g. Streamlit "
        "behind a public domain).",
        group="Server",
    ),
    Setting(
        "CONNECT_TIMEOUT", "duration", "5s", "Upstream connect timeout.", minimum=1, group="Server"
    ),
    Setting(
        "READ_TIMEOUT",
        "duration",
        "300s",
        "Upstream idle read timeout (between bytes; streams stay open as long as data flows).",
        minimum=1,
        group="Server",
    ),
    Setting(
        "SHUTDOWN_TIMEOUT",
        "duration",
        "30s",
        "Grace period for in-flight requests on SIGTERM.",
        minimum=0,
        group="Server",
    ),
    Setting(
        "LOG_LEVEL",
        "choice",
        "info",
        "Log level.",
        choices=("debug", "info", "warning", "error"),
        group="Server",
    ),
    Setting(
        "LOG_FORMAT",
        "choice",
        "text",
        "Log format: key=value text or JSON lines.",
        choices=("text", "json"),
        group="Server",
    ),
    Setting(
        "ACCESS_LOG",
        "bool",
        "true",
        "One log line per request (method, path, status, duration, request id, client IP). "
        "Turn off when a proxy in front already logs requests.",
        group="Server",
    ),
    Setting(
        "APP_NAME", "str", "PatentLLM", "Name of the app shown on the gate's pages.", group="Server"
    ),
    # --- limits (bounded connections; see gateway/limits.py for the math)
    Setting(
        "HEADER_TIMEOUT",
        "duration",
        "20s",
        "A client must send a complete request head within this long: from connecting, and "
        "from the first byte of each further request on a keep-alive connection.",
        minimum=1,
        group="Limits",
    ),
    Setting(
        "KEEPALIVE_TIMEOUT",
        "duration",
        "75s",
        "Idle keep-alive connections (no request in progress) are closed after this long.",
        minimum=1,
        group="Limits",
    ),
    Setting(
        "MAX_CONNECTIONS",
        "int",
        "0",
        "Client connections per worker. 0: derived from the open-file limit, "
        "(RLIMIT_NOFILE - 224) / 2, at most 4096. At the cap the longest-idle connection is "
        "closed; if every connection is busy, new ones get a fast 503 (GATE_PREFIX/healthz "
        "and readyz are still answered).",
        minimum=0,
        group="Limits",
    ),
    Setting(
        "MAX_WEBSOCKETS",
        "int",
        "0",
        "Open WebSockets per worker (each holds two descriptors). 0: half of MAX_CONNECTIONS.",
        minimum=0,
        group="Limits",
    ),
    Setting(
        "MAX_WEBSOCKETS_PER_USER",
        "int",
        "16",
        "Open WebSockets per user (or per client IP when anonymous) and worker; "
        "beyond it the handshake gets a 503.",
        minimum=1,
        group="Limits",
    ),
    Setting(
        "UPSTREAM_MAX_CONNECTIONS",
        "int",
        "0",
        "Connections to the upstream app per worker (every proxied request, stream and "
        "WebSocket holds one). 0: MAX_CONNECTIONS, so everything admitted gets one. When all "
        "are in use, the next request or handshake gets a fast 503.",
        minimum=0,
        group="Limits",
    ),
    Setting(
        "MAX_CONNECTIONS_PER_IP",
        "int",
        "0",
        "Client connections per client IP (IPv6: per /64) and worker. 0: a quarter of "
        "MAX_CONNECTIONS. Beyond it the IP's longest-idle connection is closed, or a new one "
        "gets a fast 503 (GATE_PREFIX/healthz and readyz are still answered). From "
        "TRUSTED_PROXIES the IP is the forwarded client's, known once the head is read: there "
        "it caps requests in progress (none naming no client or a trusted one).",
        minimum=0,
        group="Limits",
    ),
    Setting(
        "BODY_TIMEOUT",
        "duration",
        "60s",
        "A request body still arriving is cut (408 if no answer has started, then the "
        "connection is closed) when a whole BODY_TIMEOUT brings less than BODY_MIN_RATE "
        "bytes per second, or nothing. Time in which the gate is not reading (a slow "
        "upstream) does not count. A limit on stalls, not on an upload's total time.",
        minimum=1,
        group="Limits",
    ),
    Setting(
        "BODY_MIN_RATE",
        "int",
        "100",
        "Bytes per second a request body must average over each BODY_TIMEOUT (see there). "
        "0: any progress will do.",
        minimum=0,
        group="Limits",
    ),
    # --- limits end
    # --- websocket re-check
    Setting(
        "WS_RECHECK_INTERVAL",
        "duration",
        "30s",
        "Open WebSockets and streamed responses of signed-in users are re-checked this often "
        "(and at once when this worker learns of a change); a denied one is closed "
        "(4401/4402) or cut. 0: only on changes.",
        minimum=0,
        group="Limits",
    ),
    # --- websocket re-check end
    # --- billing
    Setting(
        "BILLING_MODE",
        "choice",
        "auto",
        "auto: on only with a live key; on: enforce with "
        "any key (test keys too); off: everything passes.",
        choices=("auto", "on", "off"),
        group="Billing",
    ),
    Setting(
        "STRIPE_SECRET_KEY",
        "secret",
        "",
        "Stripe secret or restricted key (sk_/rk_, live or test).",
        group="Billing",
    ),
    Setting(
        "STRIPE_API_BASE",
        "url",
        "",
        "Override of Stripe's API address (test doubles). Unset: https://api.stripe.com.",
        group="Billing",
    ),
    Setting(
        "STRIPE_WEBHOOK_SECRET",
        "secret",
        "",
        "Webhook signing secret(s) whsec_…, "
        "comma-separated during rotation. Required with a live key.",
        group="Billing",
    ),
    Setting(
        "STRIPE_PRICE_IDS",
        "list",
        "",
        "Comma-separated Price (or legacy Plan) ids that grant access; the landing page sells "
        "each of them, in this order, grouped by product. Required when billing is on.",
        group="Billing",
    ),
    Setting(
        "ALLOW_ANY_PRICE",
        "bool",
        "false",
        "Grant access for a subscription to any price, not only STRIPE_PRICE_IDS.",
        group="Billing",
    ),
    Setting(
        "PAST_DUE_GRACE",
        "duration",
        "0s",
        "How long a past_due subscription keeps access after its period ended.",
        minimum=0,
        group="Billing",
    ),
    Setting(
        "PAUSED_ACCESS",
        "bool",
        "false",
        "Grant access while payment collection is paused (pause_collection set).",
        group="Billing",
    ),
    # --- checkout options
    Setting(
        "TRIAL_DAYS",
        "int",
        "0",
        "Free trial days for new subscribers (Checkout `subscription_data.trial_period_days`; "
        "0: no trial), once per customer and per email: who has had any subscription gets "
        "Checkout without one. The landing page shows a trial badge to who may have it.",
        minimum=0,
        group="Billing",
    ),
    Setting(
        "TRIAL_WITHOUT_CARD",
        "bool",
        "false",
        "Start trials without asking for a card (Checkout `payment_method_collection="
        "if_required`; a Checkout without a trial, for who had one, asks for the card as usual). "
        "A trial that ends with no card on file is canceled by Stripe "
        "(`trial_settings.end_behavior.missing_payment_method=cancel`): access ends at the "
        "trial's end.",
        group="Billing",
    ),
    Setting(
        "ALLOW_PROMOTION_CODES",
        "bool",
        "false",
        "Let customers enter a promotion code on Stripe Checkout (`allow_promotion_codes`).",
        group="Billing",
    ),
    Setting(
        "AUTOMATIC_TAX",
        "bool",
        "false",
        "Let Stripe Tax compute taxes on Checkout (`automatic_tax[enabled]`; needs Stripe Tax "
        "set up in the Stripe account).",
        group="Billing",
    ),
    # --- checkout options end
    Setting(
        "ON_STRIPE_ERROR",
        "choice",
        "deny",
        "Unknown user while Stripe is unreachable: deny (503) or allow (fail open).",
        choices=("deny", "allow"),
        group="Billing",
    ),
    Setting(
        "STRIPE_TIMEOUT",
        "duration",
        "10s",
        "Timeout of one Stripe API call.",
        minimum=1,
        group="Billing",
    ),
    Setting(
        "STRIPE_MAX_RETRIES",
        "int",
        "2",
        "Retries of a failed Stripe call (stripe-python's own backoff).",
        minimum=0,
        group="Billing",
    ),
    Setting(
        "STRIPE_RATE_LIMIT",
        "int",
        "0",
        "Max Stripe calls per second from this process; 0: 80 for live keys, 20 for test keys.",
        minimum=0,
        group="Billing",
    ),
    # --- cache
    Setting(
        "DATABASE_PATH",
        "str",
        "gateway.sqlite3",
        "SQLite file for customers, entitlements, webhook events and sign-in tokens.",
        group="Cache",
    ),
    Setting(
        "DATABASE_URL",
        "dburl",
        "",
        "The store: sqlite:///absolute/path or postgresql://user:password@host:5432/db "
        "(several replicas share one PostgreSQL). Unset: the SQLite file DATABASE_PATH.",
        group="Cache",
    ),
    Setting(
        "CACHE_TTL",
        "duration",
        "1h",
        "Lifetime of a paying user's cached entitlement (never past the period end).",
        minimum=1,
        group="Cache",
    ),
    Setting(
        "NEGATIVE_CACHE_TTL",
        "duration",
        "60s",
        "Lifetime of a non-paying user's cached entitlement.",
        minimum=1,
        group="Cache",
    ),
    Setting(
        "L1_TTL",
        "duration",
        "5s",
        "Lifetime of the in-process cache in front of SQLite.",
        minimum=0,
        group="Cache",
    ),
    Setting(
        "L1_MAX_ENTRIES",
        "int",
        "10000",
        "Size bound of the in-process cache.",
        minimum=1,
        group="Cache",
    ),
    Setting(
        "STALE_IF_ERROR",
        "duration",
        "24h",
        "How long a cached state may be used past its lifetime while Stripe fails.",
        minimum=0,
        group="Cache",
    ),
    # --- identity
    Setting(
        "SESSION_SECRET",
        "secret",
        "",
        "Key that signs the gate's session cookie (32+ "
        "characters). Required when billing is on, except in the demo.",
        group="Identity",
    ),
    Setting(
        "SESSION_LIFETIME",
        "duration",
        "30d",
        "Lifetime of the gate's session cookie.",
        minimum=60,
        group="Identity",
    ),
    Setting(
        "COOKIE_SECURE",
        "choice",
        "auto",
        "Secure cookie flag. auto: on unless PUBLIC_URL is plain http on localhost.",
        choices=("auto", "true", "false"),
        group="Identity",
    ),
    Setting(
        "IDENTITY_HEADER",
        "str",
        "",
        "Header set by a trusted auth proxy carrying the "
        "user's email, e.g. X-Forwarded-Email. Only read from TRUSTED_PROXIES.",
        group="Identity",
    ),
    Setting(
        "LOGIN_TOKEN_TTL",
        "duration",
        "15m",
        "Lifetime of an email sign-in link.",
        minimum=60,
        group="Identity",
    ),
    Setting(
        "LOGIN_RATE_LIMIT",
        "int",
        "5",
        "Sign-in requests per minute per client IP (an IPv6 client: per /64). Requests "
        "from other IPs never count against an address.",
        minimum=1,
        group="Identity",
    ),
    Setting(
        "LOGIN_LINK_COOLDOWN",
        "duration",
        "1m",
        "After a link is mailed to an address, requests for it mail nothing for this long "
        "(the link sent keeps working). Shorter than LOGIN_TOKEN_TTL.",
        minimum=0,
        group="Identity",
    ),
    Setting(
        "LOGIN_LINKS_PER_ADDRESS",
        "int",
        "3",
        "Sign-in links an address may hold at once (unused, unexpired; each works once, none "
        "replaces another). At the bound requests mail nothing, so an address gets at most "
        "this many mails per LOGIN_TOKEN_TTL.",
        minimum=1,
        group="Identity",
    ),
    # --- global cap on sign-in emails
    Setting(
        "LOGIN_EMAILS_PER_MINUTE",
        "int",
        "30",
        "Sign-in emails the gate sends per minute in total, whoever asks (a brake on "
        "rotating addresses or X-Forwarded-For). Its second half is kept for client networks "
        "(an IPv4 /24, an IPv6 /64) that have had no link in the last minute.",
        minimum=1,
        group="Identity",
    ),
    # --- teams and seats
    Setting(
        "SEAT_PRICE_IDS",
        "list",
        "",
        "Prices of STRIPE_PRICE_IDS sold per seat: the landing page asks how many seats, the "
        "customer who pays is a team's owner and invites its members from the account page.",
        group="Teams",
    ),
    Setting(
        "MAX_SEATS",
        "int",
        "100",
        "Most seats one Checkout (adjustable quantity) or seat change may buy.",
        minimum=1,
        group="Teams",
    ),
    Setting(
        "PRORATION_BEHAVIOR",
        "choice",
        "create_prorations",
        "Stripe's proration_behavior for a seat change on the account page.",
        choices=("create_prorations", "always_invoice", "none"),
        group="Teams",
    ),
    Setting(
        "INVITE_TTL",
        "duration",
        "7d",
        "Lifetime of a team invitation link (single use).",
        minimum=60,
        group="Teams",
    ),
    Setting(
        "SMTP_HOST",
        "str",
        "",
        "SMTP server for sign-in links. Unset: links are logged (development).",
        group="Identity",
    ),
    Setting("SMTP_PORT", "int", "587", "SMTP port.", minimum=1, group="Identity"),
    Setting("SMTP_USERNAME", "str", "", "SMTP user name.", group="Identity"),
    Setting("SMTP_PASSWORD", "secret", "", "SMTP password.", group="Identity"),
    Setting("SMTP_FROM", "str", "", "From address of sign-in emails.", group="Identity"),
    Setting("SMTP_STARTTLS", "bool", "true", "Use STARTTLS.", group="Identity"),
    # --- API keys
    Setting(
        "API_KEY_HEADER",
        "str",
        "Authorization",
        "Request header carrying an API key (Authorization: `Bearer gk_…`; other Authorization "
        "values are the app's). An app that uses Authorization itself: X-Api-Key.",
        group="API keys",
    ),
    Setting(
        "PASS_API_KEY",
        "bool",
        "false",
        "Pass the API key's header on to the app (default: removed; the app gets X-Gate-Key, "
        "the key's id).",
        group="API keys",
    ),
    Setting(
        "MAX_API_KEYS_PER_CUSTOMER",
        "int",
        "10",
        "Working API keys a customer may hold at once.",
        minimum=0,
        group="API keys",
    ),
    Setting(
        "API_KEY_RATE",
        "str",
        "",
        "Requests per API key, like 10/s, 600/m or 1000/h, per worker process (WORKERS=4 "
        "lets a key through 4 times as fast); beyond it 429 with Retry-After. Empty: no limit.",
        group="API keys",
    ),
    Setting(
        "API_KEY_BURST",
        "int",
        "20",
        "Requests an API key may make at once above API_KEY_RATE (the bucket's size).",
        minimum=1,
        group="API keys",
    ),
    # --- routing
    Setting(
        "GATE_PREFIX",
        "prefix",
        "/_gate",
        "Path prefix of the gate's own pages and APIs.",
        group="Routing",
    ),
    Setting(
        "INJECT_BADGE",
        "bool",
        "false",
        "Insert a small 'Subscription · N days left · Manage billing' widget into the app's "
        "HTML pages (one <script> tag; uncompressed pages up to 2 MiB).",
        group="Routing",
    ),
    Setting(
        "PUBLIC_PATHS",
        "list",
        "/favicon.ico,/robots.txt",
        "Comma-separated paths that bypass the gate; a trailing * matches a prefix (/static/*).",
        group="Routing",
    ),
    # --- features per path and per price
    Setting(
        "FEATURE_RULES",
        "list",
        "",
        "Comma-separated PATTERN=FEATURE items (patterns as in PUBLIC_PATHS, first match wins, "
        "but matched case-insensitively and with or without a trailing slash): a matching path "
        "needs that Stripe Entitlements feature (lookup key), e.g. /api/analysis/*=analysis. "
        "Others need any access.",
        group="Routing",
    ),
    Setting(
        "PRICE_FEATURES",
        "list",
        "",
        "Comma-separated PRICE_ID=FEATURE items (several features joined by a vertical bar): "
        "features a price carries, added to those of its product in Stripe Entitlements (for "
        "accounts without Entitlements).",
        group="Routing",
    ),
    Setting(
        "CHECKOUT_METERED_PRICES",
        "list",
        "",
        "Comma-separated PRICE_ID=METERED_PRICE_ID items (several joined by a vertical bar): "
        "Checkout of PRICE_ID also subscribes to these metered prices (usage-based overage on a "
        "Stripe Meter), as line items without a quantity.",
        group="Routing",
    ),
    # --- usage quotas and Stripe Meters
    Setting(
        "USAGE_RULES",
        "list",
        "",
        "Comma-separated [METHOD ]PATTERN=METER items (patterns as in FEATURE_RULES): each "
        "allowed request matching one counts 1 unit on METER (a Stripe meter's event_name), "
        "e.g. POST /api/analyze*=analysis.",
        group="Usage",
    ),
    Setting(
        "USAGE_METERS",
        "list",
        "",
        "Comma-separated meter names the app may report (X-Gate-Usage response header, "
        "POST GATE_PREFIX/usage) besides those of USAGE_RULES.",
        group="Usage",
    ),
    Setting(
        "PRICE_QUOTAS",
        "list",
        "",
        "Comma-separated PRICE_ID=METER:N items (several meters joined by a vertical bar): units "
        "included per billing period; past them a request is refused (429), or billed as "
        "overage when the subscription has a metered price on that meter.",
        group="Usage",
    ),
    Setting(
        "FREE_QUOTAS",
        "list",
        "",
        "METER:N items joined by a vertical bar: units per calendar month (UTC) for signed-in "
        "customers without a subscription on the metered paths. Unset: none.",
        group="Usage",
    ),
    Setting(
        "USAGE_REPORT_FROM",
        "cidrs",
        "127.0.0.1/32,::1/128",
        "CIDRs (the app's network) allowed to POST GATE_PREFIX/usage.",
        group="Usage",
    ),
    Setting(
        "USAGE_REPORT_SECRET",
        "secret",
        "",
        "Bearer secret of POST GATE_PREFIX/usage (at least 16 characters). Unset: the "
        "endpoint refuses every report.",
        group="Usage",
    ),
    Setting(
        "USAGE_FLUSH_INTERVAL",
        "duration",
        "1s",
        "How often counted units are made durable in the store (a crash loses at most this "
        "window; SIGTERM loses nothing).",
        group="Usage",
    ),
    Setting(
        "METER_REPORT_INTERVAL",
        "duration",
        "60s",
        "Report window: one Stripe meter event per customer and meter per window, with the "
        "window's sum.",
        group="Usage",
    ),
    # --- operations
    Setting(
        "METRICS_ALLOW",
        "cidrs",
        "127.0.0.1/32,::1/128",
        "CIDRs allowed to scrape "
        "GATE_PREFIX/metrics (Prometheus); the client IP is resolved through "
        "TRUSTED_PROXIES. Others get 403.",
        group="Operations",
    ),
)

_BY_NAME = {s.name: s for s in TABLE}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def _err(name: str, value: str, allowed: str) -> SettingsError:
    kind = _BY_NAME[name].kind
    shown = "<hidden>" if kind == "secret" else repr(value)
    if kind == "dburl":  # a URL may carry a password: never print it
        shown = hide_password(value)
    return SettingsError(f"{name}={shown} is invalid: {allowed}")


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * _UNITS[m.group(2)]


def _parse_url(name: str, raw: str) -> str:
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _err(name, raw, "expected an absolute http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise _err(name, raw, "expected an absolute http:// or https:// URL") from None
    return raw.rstrip("/")


def _parse_cidrs(name: str, raw: str) -> tuple[IPNetwork, ...]:
    nets: list[IPNetwork] = []
    for item in _split(raw):
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise _err(name, raw, f"{item!r} is not an IP address or CIDR") from None
        if net.prefixlen == 0:
            raise _err(name, raw, "trusting every address (/0) is not allowed")
        nets.append(net)
    return tuple(nets)


# A host name (labels of letters, digits, hyphens), optionally ``*.``-prefixed, or an IP
# literal; then optionally ``:port`` or ``:*``.
_HOST_PATTERN = re.compile(
    r"(?:(?:\*\.)?[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::(?P<port>\*|\d{1,5}))?"
)


def _parse_hosts(name: str, raw: str) -> tuple[str, ...]:
    hosts: list[str] = []
    for item in _split(raw):
        host = item.lower().rstrip(".")
        if host == "*":
            raise _err(name, raw, "'*' would allow every Host; set PUBLIC_URL instead")
        match = _HOST_PATTERN.fullmatch(host)
        if match is None:
            raise _err(
                name,
                raw,
                f"{item!r} is not a host (app.example.com, *.example.com, host:8443 or "
                "host:*; no scheme or path)",
            )
        port = match.group("port")
        if port not in (None, "*") and not 1 <= int(port) <= 65535:
            raise _err(name, raw, f"in {item!r} a port is 1 to 65535")
        hosts.append(host)
    return tuple(hosts)


def _split(raw: str) -> list[str]:
    return [p.strip() for p in raw.split(",") if p.strip()]


def _convert(spec: Setting, raw: str) -> Any:
    name, kind = spec.name, spec.kind
    if kind in ("str", "secret"):
        return raw
    if kind == "url":
        return _parse_url(name, raw)
    if kind == "dburl":
        if not raw.strip():
            return ""
        try:
            parse_database_url(raw)
        except DatabaseURLError as exc:
            raise SettingsError(f"{name}={exc}") from None
        return raw.strip()
    if kind == "int" or kind == "duration":
        try:
            value: float = int(raw) if kind == "int" else parse_duration(raw)
        except ValueError:
            what = "an integer" if kind == "int" else "a duration like 30s, 15m, 1h or 30d"
            raise _err(name, raw, f"expected {what}") from None
        if spec.minimum is not None and value < spec.minimum:
            raise _err(name, raw, f"must be at least {spec.minimum}")
        return value
    if kind == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise _err(name, raw, "expected true or false")
    if kind == "choice":
        low = raw.strip().lower()
        if low not in spec.choices:
            raise _err(name, raw, f"expected one of {', '.join(spec.choices)}")
        return low
    if kind == "list":
        return tuple(_split(raw))
    if kind == "cidrs":
        return _parse_cidrs(name, raw)
    if kind == "hosts":
        return _parse_hosts(name, raw)
    if kind == "prefix":
        value_s = raw.rstrip("/")
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value_s):
            raise _err(name, raw, "expected a path like /_gate")
        return value_s
    raise AssertionError(kind)  # pragma: no cover - table is static


def table_defaults() -> dict[str, Any]:
    """Each setting's default from :data:`TABLE`, parsed, by field name."""
    return {spec.name.lower(): _value(spec, spec.default) for spec in TABLE}


def _value(spec: Setting, raw: str) -> Any:
    value = _convert(spec, raw)
    if spec.name == "STRIPE_WEBHOOK_SECRET":
        # A secret (hidden in messages) that holds a comma-separated list (during rotation).
        return tuple(_split(value))
    return value


# The table is the only place defaults are written: the dataclass takes them from here.
_DEFAULTS = table_defaults()


@dataclass(frozen=True)
class Settings:
    """Validated settings. Durations are in seconds (float).

    Every field but ``demo`` is a row of :data:`TABLE`, and its default is that row's default
    parsed (``Settings()`` is what an empty environment gives, before the consistency checks).
    """

    upstream_url: str = _DEFAULTS["upstream_url"]
    host: str = _DEFAULTS["host"]
    port: int = _DEFAULTS["port"]
    workers: int = _DEFAULTS["workers"]
    public_url: str = _DEFAULTS["public_url"]
    allowed_hosts: tuple[str, ...] = _DEFAULTS["allowed_hosts"]
    trusted_proxies: tuple[IPNetwork, ...] = _DEFAULTS["trusted_proxies"]
    preserve_host: bool = _DEFAULTS["preserve_host"]
    connect_timeout: float = _DEFAULTS["connect_timeout"]
    read_timeout: float = _DEFAULTS["read_timeout"]
    shutdown_timeout: float = _DEFAULTS["shutdown_timeout"]
    log_level: str = _DEFAULTS["log_level"]
    log_format: str = _DEFAULTS["log_format"]
    access_log: bool = _DEFAULTS["access_log"]
    app_name: str = _DEFAULTS["app_name"]
    # --- limits
    header_timeout: float = _DEFAULTS["header_timeout"]
    keepalive_timeout: float = _DEFAULTS["keepalive_timeout"]
    max_connections: int = _DEFAULTS["max_connections"]
    max_websockets: int = _DEFAULTS["max_websockets"]
    max_websockets_per_user: int = _DEFAULTS["max_websockets_per_user"]
    upstream_max_connections: int = _DEFAULTS["upstream_max_connections"]
    max_connections_per_ip: int = _DEFAULTS["max_connections_per_ip"]
    body_timeout: float = _DEFAULTS["body_timeout"]
    body_min_rate: int = _DEFAULTS["body_min_rate"]
    # --- limits end
    ws_recheck_interval: float = _DEFAULTS["ws_recheck_interval"]
    billing_mode: str = _DEFAULTS["billing_mode"]
    stripe_secret_key: str = field(default=_DEFAULTS["stripe_secret_key"], repr=False)
    stripe_api_base: str = _DEFAULTS["stripe_api_base"]
    stripe_webhook_secret: tuple[str, ...] = field(
        default=_DEFAULTS["stripe_webhook_secret"], repr=False
    )
    stripe_price_ids: tuple[str, ...] = _DEFAULTS["stripe_price_ids"]
    allow_any_price: bool = _DEFAULTS["allow_any_price"]
    past_due_grace: float = _DEFAULTS["past_due_grace"]
    paused_access: bool = _DEFAULTS["paused_access"]
    # --- checkout options
    trial_days: int = _DEFAULTS["trial_days"]
    trial_without_card: bool = _DEFAULTS["trial_without_card"]
    allow_promotion_codes: bool = _DEFAULTS["allow_promotion_codes"]
    automatic_tax: bool = _DEFAULTS["automatic_tax"]
    # --- checkout options end
    on_stripe_error: str = _DEFAULTS["on_stripe_error"]
    stripe_timeout: float = _DEFAULTS["stripe_timeout"]
    stripe_max_retries: int = _DEFAULTS["stripe_max_retries"]
    stripe_rate_limit: int = _DEFAULTS["stripe_rate_limit"]
    database_path: str = _DEFAULTS["database_path"]
    #: Raw, with its password: only the store gets it (``repr`` and messages never show it).
    database_url: str = field(default=_DEFAULTS["database_url"], repr=False)
    cache_ttl: float = _DEFAULTS["cache_ttl"]
    negative_cache_ttl: float = _DEFAULTS["negative_cache_ttl"]
    l1_ttl: float = _DEFAULTS["l1_ttl"]
    l1_max_entries: int = _DEFAULTS["l1_max_entries"]
    stale_if_error: float = _DEFAULTS["stale_if_error"]
    session_secret: str = field(default=_DEFAULTS["session_secret"], repr=False)
    session_lifetime: float = _DEFAULTS["session_lifetime"]
    cookie_secure: str = _DEFAULTS["cookie_secure"]
    identity_header: str = _DEFAULTS["identity_header"]
    login_token_ttl: float = _DEFAULTS["login_token_ttl"]
    login_rate_limit: int = _DEFAULTS["login_rate_limit"]
    login_link_cooldown: float = _DEFAULTS["login_link_cooldown"]
    login_links_per_address: int = _DEFAULTS["login_links_per_address"]
    login_emails_per_minute: int = _DEFAULTS["login_emails_per_minute"]
    seat_price_ids: tuple[str, ...] = _DEFAULTS["seat_price_ids"]
    max_seats: int = _DEFAULTS["max_seats"]
    proration_behavior: str = _DEFAULTS["proration_behavior"]
    invite_ttl: float = _DEFAULTS["invite_ttl"]
    smtp_host: str = _DEFAULTS["smtp_host"]
    smtp_port: int = _DEFAULTS["smtp_port"]
    smtp_username: str = _DEFAULTS["smtp_username"]
    smtp_password: str = field(default=_DEFAULTS["smtp_password"], repr=False)
    smtp_from: str = _DEFAULTS["smtp_from"]
    smtp_starttls: bool = _DEFAULTS["smtp_starttls"]
    api_key_header: str = _DEFAULTS["api_key_header"]
    pass_api_key: bool = _DEFAULTS["pass_api_key"]
    max_api_keys_per_customer: int = _DEFAULTS["max_api_keys_per_customer"]
    api_key_rate: str = _DEFAULTS["api_key_rate"]
    api_key_burst: int = _DEFAULTS["api_key_burst"]
    gate_prefix: str = _DEFAULTS["gate_prefix"]
    inject_badge: bool = _DEFAULTS["inject_badge"]
    public_paths: tuple[str, ...] = _DEFAULTS["public_paths"]
    feature_rules: tuple[str, ...] = _DEFAULTS["feature_rules"]  # tiers
    price_features: tuple[str, ...] = _DEFAULTS["price_features"]  # tiers
    checkout_metered_prices: tuple[str, ...] = _DEFAULTS["checkout_metered_prices"]
    usage_rules: tuple[str, ...] = _DEFAULTS["usage_rules"]  # usage
    usage_meters: tuple[str, ...] = _DEFAULTS["usage_meters"]  # usage
    price_quotas: tuple[str, ...] = _DEFAULTS["price_quotas"]  # usage
    free_quotas: tuple[str, ...] = _DEFAULTS["free_quotas"]  # usage
    usage_report_from: tuple[IPNetwork, ...] = _DEFAULTS["usage_report_from"]  # usage
    usage_report_secret: str = field(default=_DEFAULTS["usage_report_secret"], repr=False)
    usage_flush_interval: float = _DEFAULTS["usage_flush_interval"]  # usage
    meter_report_interval: float = _DEFAULTS["meter_report_interval"]  # usage
    metrics_allow: tuple[IPNetwork, ...] = _DEFAULTS["metrics_allow"]
    #: set by the demo runner, never from the environment
    demo: bool = False

    # ---- derived facts (pure, cheap)
    @property
    def live_key(self) -> bool:
        return self.stripe_secret_key.startswith(LIVE_KEY_PREFIXES)

    @property
    def billing_enabled(self) -> bool:
        return billing_state(self)[0]

    @property
    def secure_cookies(self) -> bool:
        if self.cookie_secure != "auto":
            return self.cookie_secure == "true"
        if not self.public_url:
            return not self.demo
        parts = urlsplit(self.public_url)
        local = parts.hostname in ("localhost", "127.0.0.1", "::1")
        return not (parts.scheme == "http" and local)

    @functools.cached_property
    def feature_table(self) -> FeatureRules:
        """``FEATURE_RULES`` parsed (once per settings object; read per gated request)."""
        return FeatureRules(self.feature_rules)

    @functools.cached_property
    def price_feature_map(self) -> Mapping[str, frozenset[str]]:
        """``PRICE_FEATURES`` parsed: {price id: features}."""
        return parse_price_features(self.price_features)

    @functools.cached_property
    def metered_price_map(self) -> Mapping[str, tuple[str, ...]]:
        """``CHECKOUT_METERED_PRICES`` parsed: {price id: metered price ids}."""
        return parse_metered_prices(self.checkout_metered_prices)

    @functools.cached_property
    def usage(self) -> UsageConfig:
        """The usage settings parsed (once per settings object; read per gated request)."""
        return parse_usage(self.usage_rules, self.usage_meters, self.price_quotas, self.free_quotas)

    @property
    def stripe_rate(self) -> int:
        if self.stripe_rate_limit:
            return self.stripe_rate_limit
        return 80 if self.live_key else 20


def billing_state(s: Settings) -> tuple[bool, str]:
    """Whether billing is enforced, and the reason, for the startup log line."""
    if s.billing_mode == "off":
        return False, "BILLING_MODE=off"
    if s.billing_mode == "on":
        return True, "BILLING_MODE=on"
    if not s.stripe_secret_key:
        return False, "BILLING_MODE=auto and no STRIPE_SECRET_KEY"
    if s.live_key:
        return True, "BILLING_MODE=auto and a live key"
    return False, "BILLING_MODE=auto and a test key (set BILLING_MODE=on to enforce)"


def load_settings(env: Mapping[str, str], *, demo: bool = False, **overrides: Any) -> Settings:
    """Validate ``env`` (e.g. ``os.environ``) into :class:`Settings`.

    ``overrides`` are already-typed values (used by the demo runner and tests).
    """
    values = {spec.name.lower(): _value(spec, env[spec.name]) for spec in TABLE if spec.name in env}
    values.update(overrides)
    values["demo"] = demo
    settings = Settings(**values)
    check_consistency(settings)
    return settings


def check_consistency(s: Settings) -> None:
    """Cross-setting rules. Raises :class:`SettingsError`."""
    parsers: tuple[tuple[str, Callable[[Any], object]], ...] = (
        ("PUBLIC_PATHS", PublicPaths),
        ("FEATURE_RULES", FeatureRules),
        ("PRICE_FEATURES", parse_price_features),
        ("CHECKOUT_METERED_PRICES", parse_metered_prices),
        ("API_KEY_RATE", parse_rate),
        ("API_KEY_HEADER", check_header),
    )
    for name, parse in parsers:
        try:
            parse(getattr(s, name.lower()))
        except ValueError as exc:
            raise SettingsError(f"{name} is invalid: {exc}") from None
    _check_usage(s)
    key = s.stripe_secret_key
    if key and not key.startswith(SECRET_KEY_PREFIXES):
        raise _err(
            "STRIPE_SECRET_KEY",
            key,
            "expected a secret key starting with sk_live_, "
            "rk_live_, sk_test_ or rk_test_ (publishable pk_ keys do not work here)",
        )
    if not s.upstream_url and not s.demo:
        raise SettingsError(
            "UPSTREAM_URL is not set: set it to the app's base URL, e.g. "
            "http://127.0.0.1:8501 (or run `gateway demo`)"
        )
    if s.login_link_cooldown >= s.login_token_ttl:
        # Else a link could expire while no new one may be sent: the owner locked out.
        raise SettingsError(
            f"LOGIN_LINK_COOLDOWN={int(s.login_link_cooldown)}s is invalid: it must be shorter "
            f"than LOGIN_TOKEN_TTL ({int(s.login_token_ttl)}s)"
        )
    if s.trial_days > 730:  # Stripe's limit for subscription_data.trial_period_days
        raise _err("TRIAL_DAYS", str(s.trial_days), "expected 0 to 730 days")
    if s.trial_without_card and not s.trial_days:
        # Without a trial, Checkout must collect a card for the first payment anyway.
        raise SettingsError(
            "TRIAL_WITHOUT_CARD=true needs a trial: set TRIAL_DAYS (e.g. 14) or unset it"
        )
    for price in s.seat_price_ids:
        if price not in s.stripe_price_ids:
            raise _err(
                "SEAT_PRICE_IDS",
                ",".join(s.seat_price_ids),
                f"each seat price must also be in STRIPE_PRICE_IDS ({price} is not)",
            )
    if not s.billing_enabled:
        return
    if not key:
        raise SettingsError(
            "STRIPE_SECRET_KEY is not set but BILLING_MODE=on: set a key or "
            "use BILLING_MODE=auto|off"
        )
    if s.live_key and not s.stripe_webhook_secret:
        raise SettingsError(
            "STRIPE_WEBHOOK_SECRET is not set but STRIPE_SECRET_KEY is a live "
            "key: webhooks keep the cache true; set the whsec_… secret"
        )
    for secret in s.stripe_webhook_secret:
        if not secret.startswith("whsec_"):
            raise SettingsError(
                "STRIPE_WEBHOOK_SECRET=<hidden> is invalid: expected whsec_… "
                "values, comma-separated"
            )
    if not s.stripe_price_ids:
        raise SettingsError(
            "STRIPE_PRICE_IDS is not set but billing is on: list the price_… "
            "ids that grant access (the landing page sells each of them)"
        )
    if not s.demo and len(s.session_secret) < 32:
        state = "is invalid" if s.session_secret else "is not set"
        shown = "=<hidden>" if s.session_secret else ""
        raise SettingsError(
            f"SESSION_SECRET{shown} {state}: billing is on, so set a random "
            "string of at least 32 characters (e.g. `openssl rand -hex 32`)"
        )
    if not s.demo and not s.public_url and not s.allowed_hosts:
        # Else every absolute URL (the emailed sign-in link above all) would come from the
        # request's Host: a forged Host would mail the victim a link to the attacker's site.
        raise SettingsError(
            "PUBLIC_URL is not set but billing is on: set it to the gate's external URL, "
            "e.g. https://app.example.com (or list the hosts it serves in ALLOWED_HOSTS)"
        )


def _check_usage(s: Settings) -> None:
    """The usage settings: their items (the message names the setting), the secret's length,
    the intervals."""
    try:
        parse_usage(s.usage_rules, s.usage_meters, s.price_quotas, s.free_quotas)
    except ValueError as exc:
        raise SettingsError(f"{exc}") from None
    if s.usage_report_secret and len(s.usage_report_secret) < 16:
        raise SettingsError(
            "USAGE_REPORT_SECRET=<hidden> is invalid: use at least 16 random characters "
            "(e.g. `openssl rand -hex 16`)"
        )
    if s.usage_flush_interval <= 0:
        raise _err("USAGE_FLUSH_INTERVAL", str(s.usage_flush_interval), "must be more than 0")
    if s.meter_report_interval < 1:
        raise _err("METER_REPORT_INTERVAL", str(s.meter_report_interval), "must be at least 1s")
    if s.usage_flush_interval > s.meter_report_interval:
        raise SettingsError(
            f"USAGE_FLUSH_INTERVAL={s.usage_flush_interval:g}s is invalid: it must not be "
            f"longer than METER_REPORT_INTERVAL ({s.meter_report_interval:g}s)"
        )


# ------------------------------------------------------------------ .env files, unknown names

#: Names an operator's ``.env`` may hold that are not gate settings: the demo's Stripe double
#: port, and the variables ``deploy/docker-compose.yml`` reads from the same file.
OTHER_NAMES = frozenset({"DEMO_STRIPE_PORT", "POSTGRES_PASSWORD", "APP_IMAGE", "REPLICAS_PORT"})

#: Environment variables with these prefixes are taken for attempted settings (the environment
#: holds many other variables; these look like ours). A ``.env`` file is all ours.
SETTING_PREFIXES = ("GATEWAY_", "GATE_", "STRIPE_", "SMTP_", "SESSION_", "LOGIN_", "BILLING_")


def read_env_file(path: str) -> dict[str, str]:
    """The settings of a ``.env`` file (python-dotenv's syntax). A line it cannot parse raises
    :class:`SettingsError` naming the file and the line: a value after it silently left out
    would run the gate with settings the operator did not write."""
    with open(path, encoding="utf-8") as stream:
        for binding in parse_stream(stream):
            if binding.error:
                text = binding.original.string
                # The parser's chunk starts at the blank lines before the statement.
                line = binding.original.line + len(text) - len(text.lstrip("\r\n"))
                raise SettingsError(
                    f"{path} line {line} cannot be parsed: expected NAME=value "
                    "(quote a value that holds spaces, quotes or #)"
                )
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def unknown_settings(file_names: Iterable[str], environ: Iterable[str]) -> list[str]:
    """One line for each name that looks like a setting but is none: every name of the
    ``.env`` file (``file_names``) and the environment's names with a :data:`SETTING_PREFIXES`
    prefix, with the nearest setting's name when one is close ("did you mean …?")."""
    known = set(_BY_NAME) | OTHER_NAMES
    found: dict[str, str] = {}
    for name in file_names:
        if name not in known:
            found.setdefault(name, ".env")
    for name in environ:
        if name not in known and name.upper().startswith(SETTING_PREFIXES):
            found.setdefault(name, "the environment")
    lines = []
    for name, where in sorted(found.items()):
        hint = nearest_setting(name)
        also = f"; did you mean {hint}?" if hint else ""
        lines.append(f"{name} (in {where}) is not a setting and is ignored{also}")
    return lines


#: Names other tools use for what a setting here does (closer in meaning than in spelling).
_ALIASES = {
    "UPSTREAM_TIMEOUT": "READ_TIMEOUT",
    "PROXY_TIMEOUT": "READ_TIMEOUT",
    "STRIPE_API_KEY": "STRIPE_SECRET_KEY",
    "STRIPE_KEY": "STRIPE_SECRET_KEY",
    "STRIPE_SECRET": "STRIPE_SECRET_KEY",
    "SMTP_SERVER": "SMTP_HOST",
    "SMTP_USER": "SMTP_USERNAME",
    "SECRET_KEY": "SESSION_SECRET",
}


def nearest_setting(name: str) -> str | None:
    """The setting whose name is closest to ``name`` (a typo, a plural, a prefix, another
    tool's name for it), if any."""
    upper = name.upper()
    if upper in _BY_NAME:
        return upper
    if upper in _ALIASES:
        return _ALIASES[upper]
    candidates = [upper]
    for prefix in ("GATEWAY_", "GATE_"):
        if upper.startswith(prefix):
            candidates.append(upper.removeprefix(prefix))
    for candidate in candidates:
        if candidate in _BY_NAME:
            return candidate
    best: tuple[float, str] | None = None
    for candidate in candidates:
        for setting in _BY_NAME:
            ratio = difflib.SequenceMatcher(None, candidate, setting).ratio()
            if ratio >= 0.75 and (best is None or ratio > best[0]):
                best = (ratio, setting)
    return best[1] if best else None


def env_example() -> str:
    """The text of ``.env.example``, generated from the table."""
    lines = [
        "# gateway settings. Generated from gateway/settings.py (`gateway settings --env`).",
        "# Copy to .env and uncomment what you set; the environment wins over this file.",
        "# Every setting is optional except where its help says required.",
        "",
    ]
    group = ""
    for s in TABLE:
        if s.group != group:
            group = s.group
            lines += [f"# --- {group}", ""]
        lines.append(f"# {s.help}")
        lines.append(f"# {s.name}={s.default}")
        lines.append("")
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's settings table, generated from the table."""
    rows = ["| Setting | Default | Meaning |", "|---|---|---|"]
    for s in TABLE:
        default = f"`{s.default}`" if s.default else "—"
        extra = f" One of: {', '.join(s.choices)}." if s.choices else ""
        rows.append(f"| `{s.name}` | {default} | {s.help}{extra} |")
    return "\n".join(rows)
