"""A team's seat change on the account page: Stripe's prorated preview
(``invoices.create_preview`` with ``subscription_details[items]`` and
``subscription_details[proration_behavior]``, at a fixed ``proration_date``), then
``subscriptions.update`` of the item's quantity with ``PRORATION_BEHAVIOR``. The new count
arrives by webhook as any change does (and is read again at once)."""

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from gateway.settings import Settings
from gateway.store.teams import TeamRow
from gateway.stripe_api import StripeAPI, StripeUnavailable
from gateway.stripe_client import StripeClientAPI

__all__ = ["Preview", "change_seats", "preview_seats"]


@dataclass(frozen=True, slots=True)
class Preview:
    """What the owner is shown before confirming: the prorated amount for the rest of the
    period (negative: a credit), the next invoice's total, in the smallest currency unit."""

    prorated: int
    next_total: int
    currency: str

    def money(self, amount: int) -> str:
        sign = "-" if amount < 0 else ""
        symbol = "$" if self.currency == "usd" else f"{self.currency.upper()} "
        return f"{sign}{symbol}{abs(amount) / 100:.2f}"


def _client(stripe: StripeAPI) -> StripeClientAPI:
    if not isinstance(stripe, StripeClientAPI):
        raise StripeUnavailable("seat changes need the Stripe client", operation="seats")
    return stripe


def _proration(line: dict[str, Any]) -> bool:
    parent = line.get("parent") or {}
    details = parent.get("subscription_item_details") or {}
    return bool(details.get("proration") or line.get("proration"))


async def preview_seats(
    stripe: StripeAPI, settings: Settings, customer_id: str, team: TeamRow, seats: int
) -> Preview:
    """Stripe's preview of the seat change. Raises :class:`~gateway.stripe_api.StripeError`."""
    details: dict[str, Any] = {
        "items": [{"id": team.item_id, "quantity": seats}],
        "proration_behavior": settings.proration_behavior,
    }
    if settings.proration_behavior != "none":
        details["proration_date"] = int(time.time())
    invoice = await _client(stripe).preview_invoice(
        {
            "customer": customer_id,
            "subscription": team.subscription_id,
            "subscription_details": details,
        }
    )
    lines = (invoice.get("lines") or {}).get("data") or []
    prorated = sum(int(line.get("amount") or 0) for line in lines if _proration(line))
    return Preview(prorated, int(invoice.get("total") or 0), str(invoice.get("currency") or "usd"))


async def change_seats(stripe: StripeAPI, settings: Settings, team: TeamRow, seats: int) -> None:
    """Set the seat item's quantity. Raises :class:`~gateway.stripe_api.StripeError`."""
    if team.subscription_id is None or team.item_id is None:
        raise StripeUnavailable("the team has no seat subscription", operation="seats")
    # One change per (subscription, count, minute): a double submit is one update.
    minute = int(time.time() // 60)
    key = hashlib.sha256(f"{team.subscription_id}:{seats}:{minute}".encode()).hexdigest()
    await _client(stripe).update_subscription(
        team.subscription_id,
        {
            "items": [{"id": team.item_id, "quantity": seats}],
            "proration_behavior": settings.proration_behavior,
        },
        f"seats-{key}",
    )
