"""gateway: a Stripe subscription gate in front of an unmodified web app.

The flow of one request, one module per step::

    request ─▶ forwarded    trusted-proxy handling: real client IP / scheme / host
            ─▶ app          /_gate/* → pages, webhooks, health  |  everything else → gate
            ─▶ identity     who: the gate session cookie (sessions) or a trusted identity header
            ─▶ entitlement  what they paid for: L1 memory (l1) → store (aiosqlite) → Stripe
            ─▶ decision     pure verdict: allow / 303 subscribe / 401 / 402 / 503
            ─▶ proxy_http   streaming HTTP (and proxy_ws for WebSockets) ──▶ upstream app

``rules`` turns Stripe subscriptions into access (pure). ``stripe_api`` is the only module that
touches Stripe (its SDK, webhook signatures, and ``GuardedStripe``: one rate limiter and circuit
breaker for every call); ``store`` is the only one that speaks SQL; ``entitlement`` is the one
owner of customers, entitlements and grants (every change drops L1 and the remembered verdicts
in one place); ``webhooks`` verifies Stripe's events and hands them to it; ``signin`` sends the
email sign-in links. Errors derive from ``errors.GatewayError``; one ``model.Clock`` is shared.
"""

__version__ = "0.1.0"
