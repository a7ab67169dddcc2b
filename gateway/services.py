"""The gate's long-lived services, built once per process in a cleanup context.

Everything with I/O (the store, the Stripe client, the entitlement cache, the mailer) is created
inside the running event loop and closed on shutdown, in reverse order. They share one
:class:`~gateway.model.Clock` and one Stripe client
(:class:`~gateway.stripe_client.StripeClientAPI`: rate limit and circuit breaker inside, for every
call).

On PostgreSQL the process is also one replica of several (:mod:`gateway.replicas`): a
:class:`~gateway.replicas.ReplicaBus` sends its changes to the others and announces theirs, and
the entitlement cache takes a cross-replica lease before a cold Stripe read.
"""

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.apikeys.keys import ApiKeys
from gateway.changes import Changes
from gateway.entitlement import Entitlements
from gateway.feature_catalog import FeatureCatalog
from gateway.forwarded import TrustedNetworks
from gateway.l1 import Verdicts
from gateway.mailer import Mailer, make_mailer
from gateway.model import SYSTEM_CLOCK, Clock
from gateway.paths import PublicPaths
from gateway.plans import PlanCatalog
from gateway.replicas import ReplicaBus, StoreLeases
from gateway.sessions import Sessions
from gateway.settings import Settings
from gateway.signin import LoginLinks
from gateway.store import Backend, PostgresStore, open_store
from gateway.store.bus import PgChannel, PgLeases
from gateway.store.usage import UsageSQL
from gateway.stripe_api import StripeAPI
from gateway.stripe_client import StripeClientAPI
from gateway.teams.service import Teams
from gateway.usage.service import Usage

__all__ = [
    "CLOCK",
    "SERVICES",
    "SETTINGS",
    "STRIPE_FACTORY",
    "Services",
    "StripeFactory",
    "open_services",
    "services_ctx",
]

#: Builds the process's Stripe client from the settings, on the services' clock (the tests point
#: it at the Stripe double, or hand a double of the interface).
StripeFactory = Callable[[Settings, Clock], Awaitable[StripeAPI]]


@dataclass
class Services:
    settings: Settings
    store: Backend
    stripe: StripeAPI
    entitlements: Entitlements
    #: The gate's remembered allowed verdicts (they rest on the entitlements' L1 entries).
    verdicts: Verdicts
    #: Server-side sessions and their in-process cache (:mod:`gateway.sessions`).
    sessions: Sessions
    mailer: Mailer
    login: LoginLinks
    plans: PlanCatalog
    public_paths: PublicPaths
    trusted: TrustedNetworks
    #: Which sold plans include a feature (the upgrade page).
    feature_catalog: FeatureCatalog | None = None
    #: The one clock of every service above.
    clock: Clock = SYSTEM_CLOCK
    #: In-process announcements of state changes (:mod:`gateway.changes`).
    changes: Changes = field(default_factory=Changes)
    #: The replica bus (PostgreSQL only; None on SQLite: one host).
    replicas: ReplicaBus | None = None
    #: Teams and seats (:mod:`gateway.teams`; None without ``SEAT_PRICE_IDS``).
    teams: Teams | None = None
    #: API keys and their in-process cache (:mod:`gateway.apikeys`).
    apikeys: ApiKeys | None = None
    #: Usage quotas and meters (:mod:`gateway.usage`); None without USAGE_RULES/USAGE_METERS.
    usage: Usage | None = None


SETTINGS = web.AppKey("gate_settings", Settings)
SERVICES = web.AppKey("gate_services", Services)
STRIPE_FACTORY: web.AppKey[StripeFactory] = web.AppKey("gate_stripe_factory")
#: The clock of the services (unset: the system's; tests put a ManualClock here).
CLOCK = web.AppKey("gate_clock", Clock)


async def _default_stripe(settings: Settings, clock: Clock) -> StripeAPI:
    return await StripeClientAPI.create(settings, clock=clock)


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    clock: Clock = SYSTEM_CLOCK,
    stripe: StripeFactory | None = None,
    replicas: bool = True,
    startup_check: bool = False,
    usage_loops: bool = True,
) -> AsyncIterator[Services]:
    """The one wiring of the gate's services, for the server, the CLI and the tests.

    Opens the store, the Stripe client (``stripe`` builds it, default the real one; with billing
    off ``StripeClientAPI.off``), and everything on them, all on ``clock``; on PostgreSQL
    (and ``replicas``) the replica bus too, started before the services are handed out and
    drained of this process's changes when they are closed — so a change the CLI makes reaches
    the running replicas as one made inside a replica does. With usage meters, their flush
    and reporter run while the services are open (``usage_loops``; the CLI reads without
    them), and the last flush runs when they close. ``startup_check`` logs a price that
    Stripe does not know (the server's startup; bounded in time, never fatal). Closed in
    reverse order."""
    store = open_store(settings, clock=clock.now)
    await store.open()
    try:
        factory = stripe or _default_stripe
        if settings.billing_enabled:
            stripe_api = await factory(settings, clock)
        else:
            stripe_api = StripeClientAPI.off(clock=clock)
        try:
            changes = Changes()
            bus = leases = None
            if replicas and isinstance(store, PostgresStore):
                bus = ReplicaBus(PgChannel(store), changes)
                leases = StoreLeases(PgLeases(store), bus.replica_id)
            entitlements = Entitlements(settings, store, stripe_api, clock, changes, leases)
            mailer = make_mailer(settings)
            plans = PlanCatalog(settings, stripe_api, clock)
            services = Services(
                settings=settings,
                store=store,
                stripe=stripe_api,
                entitlements=entitlements,
                verdicts=entitlements.verdicts,
                sessions=Sessions(settings, store, clock, changes),
                mailer=mailer,
                login=LoginLinks(settings, store, mailer, clock),
                plans=plans,
                public_paths=PublicPaths(settings.public_paths),
                feature_catalog=FeatureCatalog(settings, plans, entitlements.products),
                trusted=TrustedNetworks(settings.trusted_proxies),
                clock=clock,
                changes=changes,
                replicas=bus,
                apikeys=ApiKeys(settings, store, clock, changes, entitlements.verdicts),
            )
            if settings.seat_price_ids:
                services.teams = Teams(
                    settings,
                    store,
                    stripe_api,
                    entitlements,
                    services.sessions,
                    mailer,
                    changes,
                    clock,
                )
                await services.teams.start()
            if startup_check:
                await plans.startup_check()
            if bus is not None:
                await bus.start()
            if settings.usage and settings.billing_enabled:
                services.usage = Usage(settings, UsageSQL(store), stripe_api, clock)
                if usage_loops:
                    await services.usage.start()
            try:
                yield services
            finally:
                if services.usage is not None:
                    await services.usage.close()  # the last flush: nothing counted is lost
                if bus is not None:
                    await bus.close()
                if services.teams is not None:
                    await services.teams.close()
                await entitlements.close()
        finally:
            await stripe_api.close()
    finally:
        await store.close()


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: build the services (billing on), close them on shutdown."""
    factory = app.get(STRIPE_FACTORY, _default_stripe)
    clock = app.get(CLOCK, SYSTEM_CLOCK)
    async with open_services(
        app[SETTINGS], clock=clock, stripe=factory, startup_check=True
    ) as services:
        app[SERVICES] = services
        yield
