"""Stripe's webhook signatures: :func:`verify_webhook` turns a delivery's raw body and
``Stripe-Signature`` header into a checked event (a plain dict), trying each secret of a rotation
with the SDK's own verifier (``stripe.Webhook.construct_event``, 300 s tolerance), or raises one
of the :class:`WebhookError` kinds. Besides :mod:`gateway.stripe_client` (the API calls) and
:mod:`gateway.stripe_api` (their error classes), the one module that imports the Stripe SDK."""

from typing import Any

import stripe

from gateway.errors import GatewayError

__all__ = ["WebhookError", "WebhookMalformed", "WebhookSignatureInvalid", "verify_webhook"]


class WebhookError(GatewayError):
    """A webhook delivery that is not a verified Stripe event."""


class WebhookSignatureInvalid(WebhookError):
    """No secret's signature matches (or the signature header is missing or too old)."""


class WebhookMalformed(WebhookError):
    """Well signed, but not a Stripe event: bad UTF-8 or JSON, a thin event, or one without
    id / type / created / data.object. ``str()`` names what was wrong."""


def verify_webhook(
    raw: bytes, signature_header: str | None, secrets: tuple[str, ...]
) -> dict[str, Any]:
    """The verified event as a plain dict (checked to have ``id``, ``type``, ``created`` and
    ``data.object``), trying each secret of a rotation in turn.

    Raises :class:`WebhookSignatureInvalid` or :class:`WebhookMalformed`.
    """
    for secret in secrets:
        try:
            event = stripe.Webhook.construct_event(raw, signature_header, secret)
            return _checked_event(event)
        except stripe.SignatureVerificationError:
            continue  # maybe signed with the other secret of a rotation
        except (ValueError, AttributeError) as exc:
            # After a good signature: not UTF-8 or not JSON (ValueError), a thin v2 event
            # (ValueError), or JSON that is not an object (the library calls ``.get`` on it).
            raise WebhookMalformed(type(exc).__name__) from exc
        except RecursionError as exc:
            # JSON nested thousands deep: json and the SDK's object conversion recurse.
            # Stripe's events are a few levels deep; this is not one.
            raise WebhookMalformed("nested too deeply") from exc
    raise WebhookSignatureInvalid("no webhook secret's signature matches")


def _checked_event(event: Any) -> dict[str, Any]:
    if not isinstance(event, stripe.StripeObject):
        raise WebhookMalformed("not an object")
    values = event.to_dict()
    data = values.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not (
        isinstance(values.get("id"), str)
        and isinstance(values.get("type"), str)
        and isinstance(values.get("created"), int)
        and isinstance(obj, dict)
    ):
        raise WebhookMalformed("missing id, type, created or data.object")
    return values
