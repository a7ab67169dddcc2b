"""The outage policy for a webhook's payload: what a ``customer.subscription.*`` event's own
object may change while Stripe cannot be read (pure; applied by
:meth:`gateway.entitlement.Entitlements.apply_event`).

The event carries the subscription's state as of its ``created``: good enough while Stripe is
down, as long as nothing newer is stored (the owner stores it only if strictly newer). Against
the stored state:

- the same subscription on the same price keeps the features last read from Stripe (the payload
  has no entitlements; a cancellation still ends them: no access);
- the stored state is the customer's best *other* subscription: an event about this one alone
  cannot make that one worse (e.g. an old subscription canceled while a newer one is active),
  only better — it applies only if it grants access where the stored one does not.
"""

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from gateway import rules
from gateway.entitlement.base import PAYLOAD_SOURCE
from gateway.model import Entitlement
from gateway.settings import Settings

#: :func:`payload_entitlement`'s answer when the stored state is kept.
OTHER_SUBSCRIPTION_KEPT = "other_subscription_kept"


def payload_entitlement(
    customer_id: str,
    created: int,
    subscription: Mapping[str, Any],
    stored: Entitlement | None,
    settings: Settings,
    now: datetime,
) -> Entitlement | None:
    """The state to apply from the event's ``subscription`` (see the module docstring), or
    None when the stored state (another subscription) is kept."""
    ent = rules.summarize(
        customer_id, [subscription], settings, now, source=PAYLOAD_SOURCE, event_created=created
    )
    if stored is None:
        return ent
    if stored.subscription_id == ent.subscription_id and stored.price_id == ent.price_id:
        ent = dataclasses.replace(ent, features=stored.features)
    if (
        stored.subscription_id is not None
        and stored.subscription_id != ent.subscription_id
        and not (
            rules.access(ent, settings, now).allowed
            and not rules.access(stored, settings, now).allowed
        )
    ):
        return None
    return ent
