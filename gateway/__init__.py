"""gateway: a Stripe subscription gate in front of an unmodified web app.

The flow of one request, one module per step::

    request ─▶ forwarded    trusted-proxy handling: real client IP / scheme / host
            ─▶ app          /_gate/* → pages, webhooks, health  |  everything else → gate
            ─▶ gate         check(): identity → entitlement → decision, as a value
                 identity     who: a trusted identity header (identity_header), else the
                              signed gate session cookie
                 entitlement  what they paid for: L1 memory → store (aiosqlite) → Stripe
                 decision     pure verdict: allow / 303 subscribe / 401 / 402 / 503
            ─▶ allowed: proxy_http   streaming HTTP (proxy_headers decides which headers
                                     cross; proxy_ws for WebSockets) ──▶ upstream app
               denied:  responses    renders the Denial (and every other error) for the
                                     surface: proxied page/JSON, forward auth, WebSocket

``rules`` turns Stripe subscriptions into access (pure), ``stripe_api`` is the only module that
calls Stripe, ``store`` the only one that speaks SQL, ``webhooks`` keeps the cache true.
``forward_auth`` asks the same ``gate.check`` for nginx / Caddy / Traefik; ``pages`` (checkout,
sign-in, account; account facts in ``accounts``) are the gate's own routes.
"""

__version__ = "0.1.0"
