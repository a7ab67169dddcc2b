"""The account page's "API keys" section and its three forms (CSRF-checked like every form
of the gate's): create (a name, an expiry of 30, 90 or 365 days or none), revoke, and roll (a
new key; the old one keeps working for the overlap picked: now, 1 h or 24 h).

A new key is shown once, on the page that answers the form (``no-store``), and never again:
the section lists each key's name, start (first 12 characters), created, last used and
expiry. Only a browser session manages keys: a key never signs anyone in to these pages.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import quote

from aiohttp import web

from gateway.accounts import format_day
from gateway.apikeys.keys import ApiKeys, TooManyKeys
from gateway.logs import log_event
from gateway.model import Identity
from gateway.pages.common import Authorize, authorized_form, identity_of, render
from gateway.responses import error_page, see_other
from gateway.services import Services
from gateway.store.api_keys import ApiKeyRow

__all__ = ["EXPIRIES", "OVERLAPS", "ROUTES", "key_list"]

log = logging.getLogger("gateway.pages")

#: The expiry choices of the create form: value → lifetime (None: never expires).
EXPIRIES: dict[str, timedelta | None] = {
    "30": timedelta(days=30),
    "90": timedelta(days=90),
    "365": timedelta(days=365),
    "none": None,
}
#: The overlap choices of the roll form: how long the old key keeps working.
OVERLAPS: dict[str, timedelta] = {
    "now": timedelta(0),
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
}

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Choice(Generic[V]):
    """A form's select field: its options (value → what it means), the value when the field
    is absent, and what the 400 page says for any other value."""

    field: str
    options: Mapping[str, V]
    default: str
    refusal: str


EXPIRY = Choice(
    field="expires",
    options=EXPIRIES,
    default="90",
    refusal="Pick an expiry: 30, 90 or 365 days, or none.",
)
OVERLAP = Choice(
    field="overlap",
    options=OVERLAPS,
    default="now",
    refusal="Pick how long the old key keeps working: now, 1 h or 24 h.",
)


def key_list(rows: list[ApiKeyRow]) -> list[dict[str, Any]]:
    """The section's rows: what people see of each key (never the key)."""
    return [
        {
            "id": row.id,
            "name": row.name,
            "start": row.start,
            "created": format_day(row.created_at),
            "last_used": format_day(row.last_used) if row.last_used else "never",
            "expires": format_day(row.expires_at) if row.expires_at else "never",
            "ends": row.revoked_at.strftime("%d %b %Y, %H:%M UTC") if row.revoked_at else None,
        }
        for row in rows
    ]


async def section(svc: Services, identity: Identity) -> dict[str, Any]:
    """The account page's context for the section (empty without a customer)."""
    keys = svc.apikeys
    if keys is None or not identity.customer_id:
        return {"api_keys": None}
    rows = await keys.of_customer(identity.customer_id)
    return {
        "api_keys": key_list(rows),
        "api_keys_full": len(rows) >= keys.max_per_customer,
        "api_key_header": keys.header,
    }


class Owner(NamedTuple):
    """The signed-in customer whose keys a form changes, and the keys."""

    customer_id: str
    keys: ApiKeys


async def _owner(request: web.Request, svc: Services, form: dict[str, str]) -> Owner | web.Response:
    """The keys' owner: a signed-in customer (anyone else is sent to sign in)."""
    identity = await identity_of(request, svc)
    prefix = svc.settings.gate_prefix
    if identity is None or not identity.customer_id or svc.apikeys is None:
        return see_other(f"{prefix}/login?next={quote(prefix + '/account')}")
    return Owner(identity.customer_id, svc.apikeys)


def _owner_choosing(choice: Choice[Any]) -> Authorize[tuple[Owner, str]]:
    """The keys' owner (see :func:`_owner`) and the value they chose for ``choice`` (one of
    its options, else the 400 page)."""

    async def authorize(
        request: web.Request, svc: Services, form: dict[str, str]
    ) -> tuple[Owner, str] | web.Response:
        owner = await _owner(request, svc, form)
        if isinstance(owner, web.Response):
            return owner
        value = form.get(choice.field, choice.default)
        if value not in choice.options:
            return _bad(request, svc, choice.refusal)
        return owner, value

    return authorize


def _bad(request: web.Request, svc: Services, message: str, status: int = 400) -> web.Response:
    prefix = svc.settings.gate_prefix
    return error_page(
        request,
        svc.settings,
        "bad_request",
        "API keys",
        message,
        status=status,
        retry_url=f"{prefix}/account",
    )


def _shown_once(
    request: web.Request, svc: Services, key: str, row: ApiKeyRow, note: str
) -> web.Response:
    return render(
        request,
        "api_key_created.html",
        {
            "key": key,
            "row": key_list([row])[0],
            "note": note,
            "api_key_header": svc.apikeys.header if svc.apikeys else "Authorization",
        },
    )


@authorized_form(_owner_choosing(EXPIRY))
async def create(
    request: web.Request, svc: Services, form: dict[str, str], chosen: tuple[Owner, str]
) -> web.Response:
    (customer_id, keys), expiry = chosen
    name = form.get("name", "").strip()
    if not name:
        return _bad(request, svc, "Give the key a name (what will use it: a notebook, a job).")
    try:
        key, row = await keys.create(customer_id, name, EXPIRIES[expiry])
    except TooManyKeys:
        return _bad(
            request,
            svc,
            f"You have {keys.max_per_customer} API keys already: revoke one to create another.",
            409,
        )
    return _shown_once(request, svc, key, row, "")


@authorized_form(_owner)
async def revoke(
    request: web.Request, svc: Services, form: dict[str, str], owner: Owner
) -> web.Response:
    customer_id, keys = owner
    row = await keys.revoke(form.get("key", ""), customer_id)
    if row is None:
        return _bad(request, svc, "That key is not one of your working keys.", 404)
    log_event(log, "api_key_revoked_by_owner", customer=customer_id, key=row.id)
    return see_other(f"{svc.settings.gate_prefix}/account#api-keys")


@authorized_form(_owner_choosing(OVERLAP))
async def roll(
    request: web.Request, svc: Services, form: dict[str, str], chosen: tuple[Owner, str]
) -> web.Response:
    (customer_id, keys), overlap = chosen
    try:
        made = await keys.roll(form.get("key", ""), customer_id, OVERLAPS[overlap])
    except TooManyKeys:  # a key still in its overlap holds the one extra place
        return _bad(
            request,
            svc,
            f"You have {keys.max_per_customer} API keys already, and an old one still in its "
            "overlap: revoke one to roll another.",
            409,
        )
    if made is None:
        return _bad(request, svc, "That key is not one of your working keys.", 404)
    key, row = made
    note = {
        "now": "The old key has stopped working.",
        "1h": "The old key keeps working for 1 hour.",
        "24h": "The old key keeps working for 24 hours.",
    }[overlap]
    return _shown_once(request, svc, key, row, note)


#: (method, path under GATE_PREFIX, handler) for :func:`gateway.pages.add_routes`.
ROUTES = (
    ("POST", "api-keys", create),
    ("POST", "api-keys/revoke", revoke),
    ("POST", "api-keys/roll", roll),
)
