"""A local Stripe test double: an aiohttp app speaking Stripe's wire format.

The real ``stripe`` library talks to it through ``base_addresses``::

    double = StripeDouble(webhook_urls=["http://127.0.0.1:8080/_gate/webhooks/stripe"])
    # serve double.app (aiohttp_server, web.AppRunner...), then:
    http = stripe.AIOHTTPClient(timeout=10.0)
    client = stripe.StripeClient("sk_test_double", http_client=http,
                                 base_addresses={"api": "http://127.0.0.1:PORT"},
                                 max_network_retries=0)

It covers the subset of Stripe the gate uses (customers, prices, products, subscriptions,
Checkout and Billing Portal sessions, events, invoices, entitlements, coupons and promotion
codes, billing meters and meter events), hosted Checkout / Portal pages with real HTML forms,
signed webhooks and fault injection. A request flows through:

- ``guard``: faults, the API key, idempotency (the ``/v1`` middleware);
- ``params_check``: stripe-python's typed parameters (an unknown one is Stripe's 400);
- ``form``: Stripe's form parameters (``a[b]=``, ``a[0][b]=``, ``expand[]=``) and its errors;
- ``api`` (``/v1``), ``pages`` (hosted Checkout and portal), ``controls`` (``/_double``),
  each a ``handlers.DoubleHandlers`` listing its routes;
- ``double`` (:class:`StripeDouble`) over ``sessions`` (Checkout and portal sessions) over
  ``subscriptions`` (what Stripe does to customers and subscriptions) over ``state`` (tables,
  clock, lookups, events); beside them ``promotions``, ``entitlements``, ``meters`` (meters,
  meter events, summaries), ``invoicing`` (tiered usage on renewal invoices) and ``webhooks``;
- ``objects`` and ``lists``: Stripe-shaped objects (same keys as Stripe's own examples).

Events: API calls and hosted pages emit the events Stripe would. Hosted pages, ``emit``,
``set_status`` and ``advance_time`` deliver webhooks before they return; API calls answer first
and deliver in the background, as Stripe does (``await double.wait_deliveries()`` to wait).
The setup helpers ``create_customer`` / ``create_subscription`` seed state silently (no events).
Webhook signatures use real time (the receiver checks a 300 s tolerance against its own clock);
event ``created`` and every object timestamp use the double's clock (``now()``).
"""

from gateway.demo.stripe_double.double import StripeDouble
from gateway.demo.stripe_double.guard import Faults
from gateway.demo.stripe_double.state import (
    DEFAULT_API_KEY,
    DEFAULT_PRICES,
    DEFAULT_WEBHOOK_SECRET,
)

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_PRICES",
    "DEFAULT_WEBHOOK_SECRET",
    "Faults",
    "StripeDouble",
]
