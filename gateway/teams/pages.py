"""The teams' pages: the account page's Team section (:func:`team_context`), the owner's forms
(``team/invite``, ``team/remove``, ``team/cancel``, ``team/seats``, ``team/seats/confirm``) and
the invitation link (``team/join``: a GET shows it, the POST uses it once and signs the invitee
in with the invited email).

Every form is CSRF-checked and then authorized (:func:`gateway.pages.common.authorized_form`):
only the team's owner — the signed-in customer who pays for the seats — may change it; a member (or
anyone else) gets a 403 page and nothing changes."""

import logging
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import quote

from aiohttp import web

from gateway.accounts import best_customer, format_day
from gateway.model import Identity, Lookup
from gateway.pages.common import (
    Handler,
    authorized_form,
    base_url,
    form_post,
    identity_of,
    render,
    services,
    stripe_down,
)
from gateway.responses import see_other
from gateway.services import Services
from gateway.sessions import set_session
from gateway.store.teams import TeamRow
from gateway.stripe_api import StripeError
from gateway.teams.seats import change_seats, preview_seats
from gateway.teams.service import ROLE_MEMBER, ROLE_OWNER, Teams

__all__ = ["TEAM_ROUTES", "team_context"]

log = logging.getLogger("gateway.pages")

#: What the owner is told after a form, by outcome (``?team=…`` on the account page).
NOTES = {
    "invited": "Invitation sent.",
    "no_seat": "Every seat is taken (you, your members and pending invitations). Add seats "
    "below, or remove a member or an invitation, to invite someone else.",
    "member": "That address is already a member of your team.",
    "other_team": "That address already belongs to another team.",
    "rate_limited": "Too many invitations in the last minute. Please wait a moment.",
    "invalid_email": "That is not a valid email address.",
    "removed": "Member removed: their sessions have ended.",
    "not_member": "That address is not a member of your team.",
    "canceled": "Invitation canceled.",
    "seats_changed": "Seats changed. Stripe prorates the difference on your next invoice.",
    "seats_below_members": "You cannot have fewer seats than the people in your team (you, "
    "your members and pending invitations). Remove members or invitations first.",
    "seats_invalid": "Choose a number of seats between 1 and the maximum.",
    "seats_same": "That is the number of seats you have.",
}


def _when(at: datetime | None) -> str:
    return format_day(at) if at is not None else "—"


async def team_context(
    svc: Services, identity: Identity, lookup: Lookup | None, note: str | None
) -> dict[str, Any] | None:
    """The Team section of the account page: the owner's (members, invitations, seats) or a
    member's (who manages the subscription); None for anyone else."""
    teams = svc.teams
    if teams is None:
        return None
    role = teams.role(identity, lookup)
    if role is None:
        return None
    team_id, kind = role
    if kind == ROLE_MEMBER:
        manager = await svc.store.customer_email(team_id)
        return {"role": ROLE_MEMBER, "manager": manager or "your team's owner"}
    try:
        await teams.team(team_id)
    except StripeError as exc:  # the seats as last stored
        log.warning("team_seats_unread customer=%s error=%s", team_id, type(exc).__name__)
    seats = await teams.seats(team_id)
    row = await svc.store.get_team(team_id)
    return {
        "role": ROLE_OWNER,
        "paid": seats.paid,
        "used": seats.used,
        "members": [
            {
                "email": m.email,
                "joined": _when(m.joined_at),
                "last_seen": _when(m.last_seen),
                "suspended": m.state != "active",
                "reason": m.reason,
            }
            for m in seats.members
        ],
        "pending": [{"email": i.email, "expires": _when(i.expires_at)} for i in seats.pending],
        "notice": row.notice if row is not None else "",
        "note": NOTES.get(note or ""),
        "max_seats": svc.settings.max_seats,
    }


def _account(svc: Services, outcome: str) -> web.Response:
    return see_other(f"{svc.settings.gate_prefix}/account?team={quote(outcome)}#team")


def _forbidden(request: web.Request) -> web.Response:
    return render(
        request,
        "message.html",
        {
            "title": "Only the team's owner can do this",
            "message": "Seats and members are managed by the person who pays for the team.",
            "link": f"{services(request).settings.gate_prefix}/account",
            "link_text": "Back to your account",
        },
        status=403,
    )


class Owner(NamedTuple):
    """The teams service, the team (its customer id) and its owner's identity."""

    teams: Teams
    team_id: str
    identity: Identity


async def _owner(request: web.Request, svc: Services, form: dict[str, str]) -> Owner | web.Response:
    """The team's owner, when the signed-in user owns a team; else the 403 page."""
    teams = svc.teams
    identity = await identity_of(request, svc)
    if teams is None or identity is None:
        return _forbidden(request)
    role = teams.role(identity, await svc.entitlements.lookup(identity))
    if role is None or role[1] != ROLE_OWNER:
        return _forbidden(request)
    return Owner(teams, role[0], identity)


@authorized_form(_owner)
async def invite(
    request: web.Request, svc: Services, form: dict[str, str], owner: Owner
) -> web.Response:
    teams, team_id, identity = owner
    link_base = f"{base_url(request, svc)}{svc.settings.gate_prefix}/team/join"
    inviter = identity.email or await svc.store.customer_email(team_id) or "Your colleague"
    try:
        outcome, _ = await teams.invite(team_id, inviter, form.get("email", "")[:254], link_base)
    except StripeError:
        return _stripe_down(request, svc)
    return _account(svc, outcome)


@authorized_form(_owner)
async def remove(
    request: web.Request, svc: Services, form: dict[str, str], owner: Owner
) -> web.Response:
    teams, team_id, _ = owner
    removed = await teams.remove(team_id, form.get("email", "")[:254])
    return _account(svc, "removed" if removed else "not_member")


@authorized_form(_owner)
async def cancel(
    request: web.Request, svc: Services, form: dict[str, str], owner: Owner
) -> web.Response:
    teams, team_id, _ = owner
    await teams.cancel_invitation(team_id, form.get("email", "")[:254])
    return _account(svc, "canceled")


def _wanted_seats(svc: Services, form: dict[str, str]) -> int | None:
    try:
        wanted = int(form.get("seats", "").strip())
    except ValueError:
        return None
    return wanted if 1 <= wanted <= svc.settings.max_seats else None


class SeatChange(NamedTuple):
    """An owner's checked seat change: the teams service, the team, its row and the count."""

    teams: Teams
    team_id: str
    team: TeamRow
    wanted: int


async def _seat_change(
    request: web.Request, svc: Services, form: dict[str, str]
) -> SeatChange | web.Response:
    """The owner's seat change, checked (the owner, a count in range, not below the people in
    the team, a seat subscription read fresh from Stripe), or the answer refusing it."""
    owner = await _owner(request, svc, form)
    if isinstance(owner, web.Response):
        return owner
    teams, team_id, _ = owner
    wanted = _wanted_seats(svc, form)
    if wanted is None:
        return _account(svc, "seats_invalid")
    if wanted < (await teams.seats(team_id)).used:
        return _account(svc, "seats_below_members")
    try:
        team = await teams.team(team_id, fresh=True)
    except StripeError:
        return _stripe_down(request, svc)
    if team is None or team.subscription_id is None or team.item_id is None:
        return _account(svc, "seats_invalid")
    return SeatChange(teams, team_id, team, wanted)


@authorized_form(_seat_change)
async def seats(
    request: web.Request, svc: Services, form: dict[str, str], change: SeatChange
) -> web.Response:
    """The seat change's preview: Stripe's prorated amount, and a form to confirm it."""
    _, team_id, team, wanted = change
    if wanted == team.seats:
        return _account(svc, "seats_same")
    try:
        preview = await preview_seats(svc.stripe, svc.settings, team_id, team, wanted)
    except StripeError:
        return _stripe_down(request, svc)
    return render(
        request,
        "team_seats.html",
        {"seats": wanted, "current": team.seats, "preview": preview},
    )


@authorized_form(_seat_change)
async def seats_confirm(
    request: web.Request, svc: Services, form: dict[str, str], change: SeatChange
) -> web.Response:
    teams, team_id, team, wanted = change
    try:
        await change_seats(svc.stripe, svc.settings, team, wanted)
        await teams.team(team_id, fresh=True)
    except StripeError:
        return _stripe_down(request, svc)
    log.info("team_seats_changed customer=%s seats=%d", team_id, wanted)
    return _account(svc, "seats_changed")


def _stripe_down(request: web.Request, svc: Services) -> web.Response:
    return stripe_down(request, f"{svc.settings.gate_prefix}/account")


# --- the invitation link ----------------------------------------------------------------------


def _link_refused(request: web.Request, title: str, message: str, status: int) -> web.Response:
    prefix = services(request).settings.gate_prefix
    return render(
        request,
        "message.html",
        {"title": title, "message": message, "link": f"{prefix}/login", "link_text": "Sign in"},
        status=status,
    )


_USED = (
    "This invitation was already used",
    "Each invitation works once. Sign in with the invited address, or ask for a new one.",
)


async def join_form(request: web.Request) -> web.Response:
    """GET never uses the invitation (mail scanners open links): the button POSTs it."""
    svc = services(request)
    token = request.query.get("token", "")
    teams = svc.teams
    inv = await teams.invitation(token) if teams is not None else None
    if inv is None:
        return _link_refused(request, *_USED, status=400)
    owner = await svc.store.customer_email(inv.customer_id)
    return render(
        request, "team_join.html", {"token": token, "email": inv.email, "owner": owner or ""}
    )


@form_post
async def join(request: web.Request, svc: Services, form: dict[str, str]) -> web.Response:
    """Use the invitation once: the invited email becomes a member and this browser is signed
    in as that email. A browser signed in as another email is refused (it would be signed out
    of its own account by someone else's link); nothing is used then."""
    teams = svc.teams
    token = form.get("token", "")
    if teams is None:
        return _link_refused(request, *_USED, status=400)
    inv = await teams.invitation(token)
    if inv is None:
        return _link_refused(request, *_USED, status=400)
    current = await identity_of(request, svc)
    if current is not None and current.email is not None and current.email != inv.email:
        return _link_refused(
            request,
            "This invitation is for another address",
            f"You are signed in as {current.email}. Sign out, then open the invitation again "
            "to join as the invited address.",
            status=403,
        )
    outcome, used = await teams.accept(token)
    if outcome != "joined" or used is None:
        if outcome == "no_seat":
            return _link_refused(
                request,
                "No seat is free in this team",
                "Ask the team's owner to add a seat, then to invite you again.",
                status=409,
            )
        return _link_refused(request, *_USED, status=400)
    try:
        own = await best_customer(svc.entitlements, svc.settings, used.email, svc.clock.now())
    except StripeError:
        own = None  # the team's access does not need their own customer
    response = see_other("/")
    # No customer of their own: the session names none ("") and the member's email.
    await set_session(response, svc.sessions, request, own or "", used.email)
    log.info("team_member_signed_in customer=%s", used.customer_id)
    return response


#: The teams' routes under ``GATE_PREFIX`` (registered with ``SEAT_PRICE_IDS``).
TEAM_ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "team/invite", invite),
    ("POST", "team/remove", remove),
    ("POST", "team/cancel", cancel),
    ("POST", "team/seats", seats),
    ("POST", "team/seats/confirm", seats_confirm),
    ("GET", "team/join", join_form),
    ("POST", "team/join", join),
]
