"""gateway: a Stripe subscription gate in front of an unmodified web app.

The flow of one request, one module per step::

    request ─▶ forwarded    trusted-proxy handling: real client IP / scheme / host
            ─▶ app          /_gate/* → pages, webhooks, health  |  everything else → gate
            ─▶ identity     who: signed gate session cookie, or a trusted identity header
            ─▶ entitlement  what they paid for: L1 memory → store (aiosqlite) → Stripe
            ─▶ decision     pure verdict: allow / 303 subscribe / 401 / 402 / 503
            ─▶ proxy_http   streaming HTTP (and proxy_ws for WebSockets) ──▶ upstream app

``rules`` turns Stripe subscriptions into access (pure), ``stripe_api`` is the only module that
calls Stripe, ``store`` the only one that speaks SQL, ``webhooks`` keeps the cache true.
"""

__version__ = "0.1.0"
