"""The gate's long-lived services, built once per process in a cleanup context.

Everything with I/O (the store, the Stripe client, the entitlement cache, the mailer) is created
inside the running event loop and closed on shutdown, in reverse order.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.entitlement import Entitlements
from gateway.forwarded import TrustedNetworks
from gateway.identity import LoginLinks, SessionCodec
from gateway.mailer import Mailer, make_mailer
from gateway.paths import PublicPaths
from gateway.plans import PlanCatalog
from gateway.settings import Settings
from gateway.store import SQLiteStore
from gateway.stripe_api import StripeAPI, StripeClientAPI
from gateway.verdicts import AllowedSessions

StripeFactory = Callable[[Settings], Awaitable[StripeAPI]]


@dataclass
class Services:
    settings: Settings
    store: SQLiteStore
    stripe: StripeAPI
    entitlements: Entitlements
    codec: SessionCodec
    mailer: Mailer
    login: LoginLinks
    plans: PlanCatalog
    public_paths: PublicPaths
    trusted: TrustedNetworks
    #: The gate's allowed verdicts per Cookie header (:mod:`gateway.verdicts`).
    allowed: AllowedSessions = field(init=False)

    def __post_init__(self) -> None:
        self.allowed = AllowedSessions(self.entitlements.stats)


SETTINGS = web.AppKey("gate_settings", Settings)
SERVICES = web.AppKey("gate_services", Services)
STRIPE_FACTORY: web.AppKey[StripeFactory] = web.AppKey("gate_stripe_factory")


async def _default_stripe(settings: Settings) -> StripeAPI:
    return await StripeClientAPI.create(settings)


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: build the services (billing on), close them on shutdown."""
    settings = app[SETTINGS]
    factory = app.get(STRIPE_FACTORY, _default_stripe)
    store = SQLiteStore(settings.database_path)
    await store.open()
    try:
        stripe = await factory(settings)
        try:
            entitlements = Entitlements(settings, store, stripe)
            mailer = make_mailer(settings)
            app[SERVICES] = Services(
                settings=settings,
                store=store,
                stripe=stripe,
                entitlements=entitlements,
                codec=SessionCodec(settings),
                mailer=mailer,
                login=LoginLinks(settings, store, mailer),
                plans=PlanCatalog(settings, stripe),
                public_paths=PublicPaths(settings.public_paths),
                trusted=TrustedNetworks(settings.trusted_proxies),
            )
            try:
                yield
            finally:
                await entitlements.close()
        finally:
            await stripe.close()
    finally:
        await store.close()
