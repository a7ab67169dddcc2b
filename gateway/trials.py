"""Who may start a free trial: ``TRIAL_DAYS`` once per customer and once per mailbox.

A trial is for someone who has never subscribed. A customer who has had any subscription (any
status, canceled included) gets Checkout without one, and so does every other customer whose
email lands in the same mailbox (:func:`gateway.emails.mailbox_key`: ``alice+1@…``,
``alice+2@…`` and ``alice@…`` are one inbox; Stripe allows several customers per email, and
Checkout makes a new one for each ``customer_email``). The customers counted are the
identity's own; every customer the gate's store has linked to an email with the same mailbox
key; and Stripe's customers for the email as typed and for the mailbox's base address (its
key). :func:`trial_offer` decides from Stripe — each customer's subscriptions, listed with
``status=all`` — through the entitlement cache:

- the landing page asks the cached state (L1, store; Stripe on a miss, as every lookup);
- Checkout (``fresh``) trusts the cache only when it already shows a subscription, else reads
  Stripe afresh, so a trial started a minute ago (its webhook not in yet) is never missed.

When Stripe or the store cannot say, there is no trial (the safe side). An anonymous visitor
is asked to confirm an email first (the sign-in link; :func:`customer_for_new_email` then gives
that email a customer): without a known email, Stripe's page would take any address and every
new customer would get a new trial.
"""

import hashlib
import logging
from dataclasses import dataclass
from typing import Literal

from gateway.emails import mailbox_key, valid_email
from gateway.entitlement import Entitlements
from gateway.logs import log_event
from gateway.model import Identity
from gateway.settings import Settings
from gateway.store import Store, StoreError
from gateway.stripe_api import StripeAPI, StripeError

__all__ = ["TrialOffer", "TrialReason", "customer_for_new_email", "trial_offer"]

log = logging.getLogger("gateway.trials")

#: ``off``: no TRIAL_DAYS; ``new``: never subscribed; ``confirm_email``: anonymous (the offer
#: stands once an email is confirmed); ``had_subscription``; ``unknown``: Stripe cannot say.
TrialReason = Literal["off", "new", "confirm_email", "had_subscription", "unknown"]


@dataclass(frozen=True, slots=True)
class TrialOffer:
    """The free trial a visitor may start: ``days`` (0: none) and why."""

    days: int
    reason: TrialReason

    def note(self, identity: Identity | None) -> str | None:
        """The landing page's sentence about the trial, when it is not simply offered."""
        if self.reason == "had_subscription":
            who = identity.email if identity and identity.email else "This account"
            return (
                f"The free trial is for new subscribers: {who} has subscribed before, so a "
                "subscription starts right away."
            )
        if self.reason == "unknown":
            return (
                "We could not check just now whether a free trial applies, so subscribing "
                "now starts a subscription right away."
            )
        if self.reason == "confirm_email":
            return (
                "The free trial is for new subscribers: first we email you a link to "
                "confirm your address."
            )
        return None


async def trial_offer(
    entitlements: Entitlements,
    settings: Settings,
    identity: Identity | None,
    *,
    fresh: bool,
    store: Store,
) -> TrialOffer:
    """The trial ``identity`` may start (see the module docstring). ``fresh``: Checkout's
    decision (Stripe is asked whenever the cached state shows no subscription); ``store``:
    where the customers of the identity's mailbox are found. Never raises: a Stripe or store
    failure is logged and means no trial."""
    if settings.trial_days <= 0:
        return TrialOffer(0, "off")
    if identity is None:
        return TrialOffer(settings.trial_days, "confirm_email")
    try:
        had = await _had_subscription(entitlements, store, identity, fresh=fresh)
    except (StripeError, StoreError) as exc:
        log_event(
            log,
            "trial_check_failed",
            level=logging.WARNING,
            customer=identity.customer_id,
            error=type(exc).__name__,
        )
        had = None
    if had is None:
        return TrialOffer(0, "unknown")
    return TrialOffer(0, "had_subscription") if had else TrialOffer(settings.trial_days, "new")


async def _had_subscription(
    entitlements: Entitlements, store: Store, identity: Identity, *, fresh: bool
) -> bool | None:
    """Whether the identity's customer, or any customer of its mailbox, has had a
    subscription; None when the cached state cannot tell (not ``fresh``). Raises
    :class:`StripeError` or :class:`StoreError`."""
    unknown = False
    for customer_id in await _customers(entitlements, store, identity, fresh=False):
        # The customer alone (no email): an operator's grant to the email would hide it.
        lookup = await entitlements.lookup(Identity(None, customer_id, identity.source))
        ent = lookup.entitlement
        if ent is not None and ent.subscription_id is not None:
            return True  # a subscription never leaves Stripe's status=all list
        unknown = unknown or lookup.error is not None or lookup.stale
    if not fresh:
        return None if unknown else False
    for customer_id in await _customers(entitlements, store, identity, fresh=True):
        if (await entitlements.refresh(customer_id)).subscription_id is not None:
            return True
    return False


async def _customers(
    entitlements: Entitlements, store: Store, identity: Identity, *, fresh: bool
) -> list[str]:
    """The identity's customer, the store's customers of its mailbox, and Stripe's for the
    email as typed and for the mailbox's base address (``alice@…`` for ``alice+1@…``)."""
    ids = [identity.customer_id] if identity.customer_id else []
    if identity.email:
        ids += await store.customer_ids_for_mailbox(identity.email)
        for email in dict.fromkeys([identity.email, mailbox_key(identity.email)]):
            ids += await entitlements.customers_for_email(email, fresh=fresh)
    return list(dict.fromkeys(ids))


async def customer_for_new_email(stripe: StripeAPI, entitlements: Entitlements, email: str) -> str:
    """A Stripe customer for a confirmed email that has none (so the trial's Checkout names a
    customer, whose email Checkout then shows fixed), remembered in the store. One per email
    however often it is asked within Stripe's idempotency window (24 h). Raises
    :class:`StripeError` (and :class:`~gateway.store.StoreError` from the store)."""
    mail = valid_email(email) or email
    key = "customer-" + hashlib.sha256(mail.encode()).hexdigest()
    customer = await stripe.create_customer(mail, key)
    customer_id = str(customer["id"])
    await entitlements.link_customer(customer_id, mail)
    log_event(log, "customer_created", customer=customer_id, via="email_confirmed")
    return customer_id
