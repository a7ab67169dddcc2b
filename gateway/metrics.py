"""Prometheus metrics: ``GET {GATE_PREFIX}/metrics`` in the text exposition format (0.0.4),
rendered by ``prometheus_client``.

Two kinds of series:

- **counted on the request path** (requests by decision, forward-auth answers, webhook
  answers): the dict-like :class:`CounterFamily` views :data:`DECISIONS`, :data:`FORWARD_AUTH`
  and :data:`WEBHOOK_RESPONSES` (in memory with one process, rendered at the scrape; with
  workers also ``prometheus_client`` counters in the shared files);
- **read from objects that already count** (``Entitlements.stats``, the circuit breaker,
  ``StripeClientAPI.calls`` and ``.failures``): with one process they are read when the page is
  scraped; with workers they are *published* into ``prometheus_client`` series (see below).

**Workers.** With ``WORKERS=N`` the server runs ``prometheus_client`` in its multi-process mode:
before forking it points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (removed at exit),
every worker writes its series to its own memory-mapped file there, and a scrape — whichever
worker SO_REUSEPORT hands it to — reads all the files, so one scrape reports the whole gate.
Counters are summed over workers (also over workers that exited: their counts stay); the
breaker state is the worst of the live workers. The scraping worker publishes its own counts
right before reading; the others publish every :data:`PUBLISH_INTERVAL` seconds (and when they
stop), so their share of the "read from objects" series can lag by that much.
``prometheus_client`` picks its mode when it is imported, so this module imports it on first
use (:func:`_lib`), never at import time: the server sets the directory first.

Access: only clients in ``METRICS_ALLOW`` (default loopback). The client is the *resolved* one
(``X-Forwarded-For`` from a trusted proxy), so a public client reaching the gate through a local
proxy is refused even though its TCP peer is loopback. Everyone else gets 403.

Exposed (all prefixed ``gate_`` except the standard process gauge):

- ``gate_info`` (gauge, 1): labels ``version``, ``billing`` (on/off);
- ``process_start_time_seconds`` (gauge; with workers, the supervisor's start);
- ``gate_requests_total`` (counter) by ``decision``: allow or a denial's kind (redirect,
  unauthorized, payment_required, feature_required, unavailable, bad_request, api_key,
  rate_limited; public paths count as allow), each listed at 0 from the start;
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

import asyncio
import contextlib
import functools
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, get_args

from aiohttp import web

from gateway import __version__
from gateway.forwarded import TrustedNetworks, client_info
from gateway.model import DenialKind
from gateway.services import SERVICES, Services
from gateway.settings import Settings

if TYPE_CHECKING:
    import prometheus_client
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = [
    "CONTENT_TYPE",
    "DECISIONS",
    "FORWARD_AUTH",
    "MULTIPROC_ENV",
    "PUBLISH_INTERVAL",
    "START_TIME",
    "WEBHOOK_RESPONSES",
    "CounterFamily",
    "mark_worker_dead",
    "metrics_handler",
    "multiprocess_dir",
    "publish",
    "publisher_ctx",
    "render",
    "use_multiprocess_dir",
]

#: The variable ``prometheus_client`` reads (when imported) to switch to multi-process mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds between two publications of a worker's in-process counts (multi-process mode).
PUBLISH_INTERVAL = 1.0
#: Import time; a forked worker inherits its parent's, so with workers it is the supervisor's.
START_TIME = time.time()
#: What ``prometheus_client.generate_latest`` writes (its constant's name changed over versions).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


@functools.cache
def _lib() -> ModuleType:
    """``prometheus_client``, imported on first use (it fixes its mode when imported)."""
    import prometheus_client
    import prometheus_client.metrics_core
    import prometheus_client.multiprocess

    # ``*_created`` series double the page and mean nothing here (the process start says it).
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    return prometheus_client


def multiprocess_dir() -> str | None:
    """The multi-process directory in effect (None: one process, in-memory series)."""
    _lib()
    return os.environ.get(MULTIPROC_ENV) or None


def use_multiprocess_dir(path: str) -> None:
    """Switch to multi-process mode with ``path`` (called by the server before it forks).

    Raises ``RuntimeError`` if ``prometheus_client`` was already imported in this process: it
    would have picked its mode already, and the workers' counts would silently stay apart."""
    if "prometheus_client" in sys.modules and os.environ.get(MULTIPROC_ENV) != path:
        raise RuntimeError("prometheus_client was imported before the metrics directory was set")
    os.environ[MULTIPROC_ENV] = path


def mark_worker_dead(pid: int, path: str) -> None:
    """Drop the live-only series (the breaker state) of a worker that exited."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


K = TypeVar("K", bound=Hashable)


@dataclass(eq=False)
class CounterFamily(Generic[K]):
    """One labelled counter, bumped and read like a dict of this process's counts.

    ``FAMILY.inc(key)`` (or ``FAMILY[key] += 1``) adds one; ``FAMILY[key]`` is the count this
    process added. With one process the counts live in a plain dict and the scrape renders
    them (:class:`_FamilyCollector`): a bump on the request path is one dict update. In
    multi-process mode each bump also goes to a ``prometheus_client`` counter child bound once
    per key (a lock and an ``mmap`` write), so that a scrape answered by any worker reads every
    worker's count at once. (Going through ``prometheus_client`` with one process too cost
    ~2 µs a request, about 1% of the proxied hot path, for nothing the dict does not give.)
    """

    name: str
    help: str
    labelnames: tuple[str, ...]
    #: A key's label values (in the order of ``labelnames``).
    labels: Callable[[K], tuple[str, ...]]
    #: Keys listed (at 0) from the start.
    initial: tuple[K, ...] = ()
    _counts: dict[K, float] = field(default_factory=dict, init=False, repr=False)
    _children: "dict[K, prometheus_client.Counter]" = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        _FAMILIES.append(self)

    @functools.cached_property
    def _shared(self) -> bool:
        """Whether the counts also go to the multi-process files (looked up on first use:
        ``prometheus_client`` fixes its mode when it is first imported)."""
        return multiprocess_dir() is not None

    @functools.cached_property
    def _metric(self) -> "prometheus_client.Counter":
        counter: prometheus_client.Counter = _lib().Counter(
            self.name, self.help, self.labelnames, registry=None
        )
        for key in self.initial:  # listed from the start, at 0
            self._children[key] = counter.labels(*self.labels(key))
        return counter

    def inc(self, key: K, amount: float = 1.0) -> None:
        """Add ``amount`` to ``key``'s count."""
        counts = self._counts
        counts[key] = counts.get(key, 0.0) + amount
        if self._shared:
            child = self._children.get(key)
            if child is None:
                child = self._metric.labels(*self.labels(key))
                self._children[key] = child
            child.inc(amount)

    def list_initial(self) -> None:
        """With workers: put the initial keys (at 0) into this worker's multi-process file
        now, so that a scrape lists them before the first bump, as with one process."""
        if self._shared:
            _ = self._metric

    def samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        """``(label values, count)`` of this process: the initial keys first (0 if unbumped),
        then the others in the order they were first bumped."""
        for key in self.initial:
            yield self.labels(key), self._counts.get(key, 0.0)
        for key, value in self._counts.items():
            if key not in self.initial:
                yield self.labels(key), value

    def __getitem__(self, key: K) -> float:
        return self._counts.get(key, 0.0)

    def __setitem__(self, key: K, value: float) -> None:
        # ``FAMILY[key] += n`` reads, then stores the sum: count the difference.
        delta = value - self[key]
        if delta < 0:
            raise ValueError(f"{self.name} is a counter: it only goes up")
        self.inc(key, delta)


#: Every :class:`CounterFamily`, in definition order (what a one-process scrape renders).
_FAMILIES: list["CounterFamily[Any]"] = []


class _FamilyCollector:
    """One process: the request-path counters, read from their dicts at scrape time."""

    def collect(self) -> Iterator["Metric"]:
        core = _lib().metrics_core
        for family in _FAMILIES:
            samples = list(family.samples())
            if not samples:  # nothing counted, nothing listed from the start: no bare HELP
                continue
            metric = core.CounterMetricFamily(family.name, family.help, labels=family.labelnames)
            for labels, value in samples:
                metric.add_metric(list(labels), value)
            yield metric


#: ``gate_requests_total`` by decision: ``allow`` or the kind of :class:`~gateway.model.Denial`;
#: bumped by :func:`gateway.gate.check`.
DECISIONS: CounterFamily[str] = CounterFamily(
    "gate_requests",
    "Requests checked by the gate, by decision.",
    ("decision",),
    lambda kind: (kind,),
    ("allow", *get_args(DenialKind)),
)
#: ``gate_forward_auth_responses_total`` by (mode, status); bumped by :mod:`gateway.forward_auth`.
FORWARD_AUTH: CounterFamily[tuple[str, int]] = CounterFamily(
    "gate_forward_auth_responses",
    "Forward-auth answers by mode (default, nginx) and HTTP status.",
    ("mode", "status"),
    lambda key: (key[0], str(key[1])),
)
#: ``gate_webhook_responses_total`` by HTTP status; bumped by :func:`gateway.billing.webhook`.
WEBHOOK_RESPONSES: CounterFamily[int] = CounterFamily(
    "gate_webhook_responses",
    "Stripe webhook deliveries by the HTTP status answered.",
    ("status",),
    lambda status: (str(status),),
)


# ---- series read from the services' own counters


@dataclass(frozen=True)
class _Sample:
    name: str  # without ``_total``
    kind: str  # counter | gauge
    help: str
    labelnames: tuple[str, ...]
    labels: tuple[str, ...]
    value: float


#: The Stripe client's counters (absent on a double that does not keep them): (attribute,
#: metric, help, label).
_STRIPE_COUNTERS = (
    ("calls", "gate_stripe_api_calls", "Stripe API requests by operation.", "operation"),
    ("failures", "gate_stripe_api_failures", "Failed Stripe API requests by error.", "error"),
)


def _service_samples(svc: Services) -> Iterator[_Sample]:
    ents = svc.entitlements
    for stat, value in ents.stats.as_dict().items():
        help_text = f"Entitlement cache: {stat.replace('_', ' ')}."
        yield _Sample(f"gate_entitlement_{stat}", "counter", help_text, (), (), value)
    breaker = ents.breaker
    state = _BREAKER_STATES.get(breaker.state, 2)
    help_state = "Stripe circuit breaker: 0 closed, 1 half_open, 2 open."
    yield _Sample("gate_stripe_breaker_state", "gauge", help_state, (), (), state)
    opened_help = "Times the Stripe breaker opened."
    yield _Sample("gate_stripe_breaker_opened", "counter", opened_help, (), (), breaker.opened)
    for attr, name, help_text, label in _STRIPE_COUNTERS:
        counts = getattr(svc.stripe, attr, None)
        if isinstance(counts, Counter):
            for key, n in sorted(counts.items()):
                yield _Sample(name, "counter", help_text, (label,), (str(key),), n)
    usage = getattr(svc, "usage", None)  # meter events by outcome (sent, refused, …)
    if usage is not None:
        help_usage = "Usage meter events (one per customer, meter and window) by outcome."
        for outcome, n in sorted(usage.reporter.outcomes.items()):
            yield _Sample("gate_usage_reports", "counter", help_usage, ("outcome",), (outcome,), n)


class _ServiceCollector:
    """One process: the services' counters, read at scrape time."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def collect(self) -> Iterator["Metric"]:
        core = _lib().metrics_core
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for s in _service_samples(self.svc):
            family = families.get(s.name)
            if family is None:
                make = core.CounterMetricFamily if s.kind == "counter" else core.GaugeMetricFamily
                family = make(s.name, s.help, labels=s.labelnames)
                families[s.name] = family
            family.add_metric(list(s.labels), s.value)
        yield from families.values()


class _InfoCollector:
    """Facts of the scraping process: version, billing mode, start time."""

    def __init__(self, billing: str) -> None:
        self.billing = billing

    def collect(self) -> Iterator["Metric"]:
        core = _lib().metrics_core
        info = core.GaugeMetricFamily(
            "gate_info", "Gate version and billing mode.", labels=("version", "billing")
        )
        info.add_metric([__version__, self.billing], 1)
        yield info
        yield core.GaugeMetricFamily(
            "process_start_time_seconds", "Start time of the process (Unix seconds).", START_TIME
        )


#: Multi-process mode: the file-backed series the services' counts are published to, and the
#: last value published per series (counters are published as increments).
_published: dict[tuple[str, tuple[str, ...]], float] = {}
_published_series: dict[str, "prometheus_client.Counter | prometheus_client.Gauge"] = {}


def publish(svc: Services) -> None:
    """Copy this process's service counters into its multi-process files."""
    lib = _lib()
    for s in _service_samples(svc):
        series = _published_series.get(s.name)
        if series is None:
            if s.kind == "counter":
                series = lib.Counter(s.name, s.help, s.labelnames, registry=None)
            else:
                series = lib.Gauge(
                    s.name, s.help, s.labelnames, registry=None, multiprocess_mode="livemax"
                )
            _published_series[s.name] = series
        child = series.labels(*s.labels) if s.labelnames else series
        if isinstance(child, lib.Gauge):
            child.set(s.value)
            continue
        key = (s.name, s.labels)
        last = _published.get(key, 0.0)
        # Services rebuilt in this process start again from 0: count on from there.
        delta = s.value - last if s.value >= last else s.value
        if delta:
            child.inc(delta)
        _published[key] = s.value


async def publisher_ctx(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context for a worker: list the request counters' initial keys at 0,
    publish the services' counts every :data:`PUBLISH_INTERVAL` seconds, and once more on the
    way out."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL)
            svc = app.get(SERVICES)
            if svc is not None:
                publish(svc)

    for family in _FAMILIES:
        family.list_initial()
    task = asyncio.create_task(loop(), name="metrics-publisher")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    svc = app.get(SERVICES)
    if svc is not None:
        publish(svc)


def render(settings: Settings, svc: Services | None) -> str:
    """The metrics page (``svc`` is None when billing is off)."""
    lib = _lib()
    registry = lib.CollectorRegistry(auto_describe=False)
    billing = "on" if svc is not None else "off"
    registry.register(_InfoCollector(billing))
    path = multiprocess_dir()
    if path is not None:
        if svc is not None:
            publish(svc)
        lib.multiprocess.MultiProcessCollector(registry, path=path)
    else:
        registry.register(_FamilyCollector())
        if svc is not None:
            registry.register(_ServiceCollector(svc))
    text: str = lib.generate_latest(registry).decode()
    return text


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
