"""gateway: a Stripe subscription gate in front of an unmodified web app.

The flow of one request, one module per step::

    request ─▶ forwarded    trusted-proxy handling: real client IP / scheme / host
            ─▶ app          /_gate/* → pages, webhooks, health  |  everything else → gate
            ─▶ gate         check(): a remembered verdict (l1.Verdicts, per Cookie header or
                              trusted identity-header value) answers a known payer; else
                              identity → entitlement → decision, as a value (model.Pass/Denial)
                 identity     who: an API key (apikeys: checked, then cached per worker;
                              it alone decides), else a trusted identity header
                              (identity_header), else the gate session cookie (sessions), with
                              its session cache entry
                 entitlement  what they paid for: L1 memory (l1) → grants → store (SQLite/PG)
                              → Stripe (entitlement/: lookup, sync, emails, grants, leases);
                              a team member's is their team's (teams: memberships in memory)
                 decision     pure verdict: Allow(features) / Denial (303, 401, 402, 429, 503)
            ─▶ usage        a metered path (usage: USAGE_RULES) takes a unit from the
                              worker's reservation of the customer's quota, else 429
            ─▶ allowed: proxy_http   streaming HTTP (proxy_headers decides which headers
                                     cross, and counts the app's X-Gate-Usage; proxy_ws for
                                     WebSockets) ──▶ upstream app
               denied:  responses    renders the Denial (and every other error) for the
                                     surface: proxied page/JSON, forward auth, WebSocket

``rules`` turns Stripe subscriptions into access (pure). ``stripe_api`` is the Stripe interface and
its errors, ``stripe_client`` the only module that calls Stripe (its SDK, with one rate limiter and
the ``stripe_breaker`` circuit breaker inside its one ``_call``), ``stripe_webhooks`` checks
Stripe's webhook signatures; ``store`` is the only one that speaks SQL; ``services.open_services``
wires them all, once, for the server, the CLI and the tests; ``entitlement`` is the one owner of
customers, entitlements and grants (every change drops L1 and the remembered verdicts in one place
and is announced on ``changes``: ``watch`` re-checks the user's open WebSockets and streams,
``replicas`` tells the other replicas through PostgreSQL); ``webhooks`` verifies and dedupes
Stripe's events and hands them to ``Entitlements.apply_event`` (which owns the policy for an
event's payload while Stripe is down); ``signin`` sends the email sign-in links; ``usage`` also
keeps the outbox of Stripe meter events (one per customer, meter and report window, sent by one
worker) and ``teams`` the seats and invitations. ``forward_auth`` asks the same ``gate.check`` for
nginx / Caddy / Traefik; ``pages`` (checkout, sign-in, account; account facts in ``accounts``) are
the gate's own routes. Errors derive from ``errors.GatewayError``; one ``model.Clock`` is shared.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
