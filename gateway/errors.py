"""The gateway's one exception tree.

Every error the gateway raises on purpose derives from :class:`GatewayError`, so a caller that
must not fail (a request handler, a background task) can catch the gateway's own failures in
one ``except`` and let real bugs (``TypeError``…) surface. The concrete classes live next to
the code that raises them and stay importable from there:

- :class:`gateway.settings.SettingsError` — a bad configuration value (also a ``ValueError``),
  and :class:`gateway.dburl.DatabaseURLError` — a ``DATABASE_URL`` that cannot be used;
- :class:`gateway.store.StoreError` — the store failed;
- :class:`gateway.stripe_api.StripeError` — a Stripe call failed, with
  ``StripeUnavailable`` (transient; ``StripeBreakerOpen`` when the breaker skipped the call)
  and ``StripeRejected`` (Stripe said no);
- :class:`gateway.stripe_webhooks.WebhookError` — a webhook delivery that is not a verified Stripe
  event (``WebhookSignatureInvalid``, ``WebhookMalformed``);
- :class:`gateway.mailer.MailError` — a sign-in email could not be sent.

``str()`` of every one of them is safe to log and to show an operator: no secrets, no payloads.
This module imports nothing from the gateway, so anything may import it.
"""

__all__ = ["GatewayError"]


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose (see the module docstring)."""
