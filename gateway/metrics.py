"""Prometheus metrics: ``GET {GATE_PREFIX}/metrics`` in the text exposition format (0.0.4).

No client library: the counters the request path bumps are plain dict entries (a dict increment,
no locks: the gate is one event loop per process), and everything else is read from objects
that already count (``Entitlements.stats``, the circuit breaker, ``StripeClientAPI.calls`` and
``.failures``) when the page is scraped.

Counters are **per process**: with ``WORKERS=N`` each scrape reaches one worker (SO_REUSEPORT
picks it), so scrape each worker's port or read the series as a sample;
``process_start_time_seconds`` tells the series of different processes apart.

Access: only clients in ``METRICS_ALLOW`` (default loopback). The client is the *resolved* one
(``X-Forwarded-For`` from a trusted proxy), so a public client reaching the gate through a local
proxy is refused even though its TCP peer is loopback. Everyone else gets 403.

Exposed (all prefixed ``gate_`` except the standard process gauge):

- ``gate_info`` (gauge, 1): labels ``version``, ``billing`` (on/off);
- ``process_start_time_seconds`` (gauge);
- ``gate_requests_total`` (counter) by ``decision``: allow, redirect, unauthorized,
  payment_required, unavailable, bad_request (public paths count as allow);
- ``gate_forward_auth_responses_total`` (counter) by ``mode`` (default/nginx) and ``status``;
- ``gate_entitlement_<stat>_total`` (counters): l1_hits, l1_misses, store_hits, stripe_calls,
  stale_served, errors, coalesced, breaker_skips (``Entitlements.stats``);
- ``gate_stripe_breaker_state`` (gauge): 0 closed, 1 half_open, 2 open;
  ``gate_stripe_breaker_opened_total`` (counter);
- ``gate_stripe_api_calls_total`` (counter) by ``operation``;
  ``gate_stripe_api_failures_total`` (counter) by ``error`` (StripeUnavailable/StripeRejected);
- ``gate_webhook_responses_total`` (counter) by ``status`` (HTTP status answered to Stripe).

Not exposed (yet): upstream 502/504 counts (``proxy_http`` keeps no counters; its
``upstream_error`` log lines are the source) and webhook events by type (``webhooks`` keeps no
counters; its one ``webhook`` log line per event carries type and outcome).
"""

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping

from aiohttp import web

from gateway import __version__
from gateway.forwarded import TrustedNetworks, client_info
from gateway.services import SERVICES, Services
from gateway.settings import Settings

__all__ = [
    "DECISIONS",
    "FORWARD_AUTH",
    "WEBHOOK_RESPONSES",
    "escape_label",
    "metrics_handler",
    "render",
]

#: ``gate_requests_total`` by decision kind; bumped by :func:`gateway.gate.check`.
DECISIONS: dict[str, int] = dict.fromkeys(
    ("allow", "redirect", "unauthorized", "payment_required", "unavailable", "bad_request"), 0
)
#: ``gate_forward_auth_responses_total`` by (mode, status); bumped by :mod:`gateway.forward_auth`.
FORWARD_AUTH: Counter[tuple[str, int]] = Counter()
#: ``gate_webhook_responses_total`` by HTTP status; bumped by :func:`gateway.billing.webhook`.
WEBHOOK_RESPONSES: Counter[int] = Counter()

START_TIME = time.time()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def escape_label(value: str) -> str:
    """A label value for the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


class _Page:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, str], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(settings: Settings, svc: Services | None) -> str:
    """The metrics page (``svc`` is None when billing is off)."""
    page = _Page()
    billing = "on" if svc is not None else "off"
    page.family(
        "gate_info",
        "gauge",
        "Gate version and billing mode.",
        [({"version": __version__, "billing": billing}, 1)],
    )
    page.family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process (Unix seconds).",
        [({}, START_TIME)],
    )
    page.family(
        "gate_requests_total",
        "counter",
        "Requests checked by the gate, by decision.",
        [({"decision": kind}, n) for kind, n in DECISIONS.items()],
    )
    page.family(
        "gate_forward_auth_responses_total",
        "counter",
        "Forward-auth answers by mode (default, nginx) and HTTP status.",
        [
            ({"mode": mode, "status": str(status)}, n)
            for (mode, status), n in sorted(FORWARD_AUTH.items())
        ],
    )
    page.family(
        "gate_webhook_responses_total",
        "counter",
        "Stripe webhook deliveries by the HTTP status answered.",
        [({"status": str(status)}, n) for status, n in sorted(WEBHOOK_RESPONSES.items())],
    )
    if svc is not None:
        _billing_metrics(page, svc)
    return page.text()


def _billing_metrics(page: _Page, svc: Services) -> None:
    ents = svc.entitlements
    for stat, value in ents.stats.as_dict().items():
        page.family(
            f"gate_entitlement_{stat}_total",
            "counter",
            f"Entitlement cache: {stat.replace('_', ' ')}.",
            [({}, value)],
        )
    breaker = ents.breaker
    page.family(
        "gate_stripe_breaker_state",
        "gauge",
        "Stripe circuit breaker: 0 closed, 1 half_open, 2 open.",
        [({}, _BREAKER_STATES.get(breaker.state, 2))],
    )
    page.family(
        "gate_stripe_breaker_opened_total",
        "counter",
        "Times the Stripe breaker opened.",
        [({}, breaker.opened)],
    )
    calls = getattr(svc.stripe, "calls", None)
    if isinstance(calls, Counter):
        page.family(
            "gate_stripe_api_calls_total",
            "counter",
            "Stripe API requests by operation.",
            [({"operation": str(op)}, n) for op, n in sorted(calls.items())],
        )
    failures = getattr(svc.stripe, "failures", None)
    if isinstance(failures, Counter):
        page.family(
            "gate_stripe_api_failures_total",
            "counter",
            "Failed Stripe API requests by error.",
            [({"error": str(err)}, n) for err, n in sorted(failures.items())],
        )


def metrics_handler(settings: Settings) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET {GATE_PREFIX}/metrics``, restricted to ``METRICS_ALLOW``."""
    allowed = TrustedNetworks(settings.metrics_allow)
    trusted = TrustedNetworks(settings.trusted_proxies)

    async def metrics(request: web.Request) -> web.Response:
        client = client_info(request, trusted)
        if client.ip not in allowed:
            return web.json_response(
                {"error": "forbidden", "message": "metrics are not served to this address"},
                status=403,
            )
        svc = request.app.get(SERVICES)
        body = render(settings, svc).encode()
        return web.Response(
            body=body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"}
        )

    return metrics
