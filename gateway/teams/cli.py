"""``gateway team USER`` (members and seats), ``gateway team add USER EMAIL`` (a member at once,
without an invitation) and ``gateway team remove USER EMAIL`` (their sessions end on every
replica). ``USER`` is the owner: a customer id or an email."""

import argparse
from typing import TYPE_CHECKING

from gateway.stripe_api import StripeError

if TYPE_CHECKING:
    from gateway.admin import Ops

__all__ = ["add_parser", "team"]

_ACTIONS = ("add", "remove")


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    team_parser = sub.add_parser(
        "team", help="a team's members and seats; `team add|remove USER EMAIL` changes them"
    )
    team_parser.add_argument(
        "words", nargs="+", metavar="[add|remove] USER [EMAIL]", help="the owner, then a member"
    )


async def _owner(user: str, ops: "Ops") -> str | None:
    if user.startswith("cus_"):
        return user
    ids = await ops.entitlements.customers_for_email(user.lower())
    return ids[0] if ids else None


async def team(args: argparse.Namespace, ops: "Ops") -> int:
    words: list[str] = list(args.words)
    action = words.pop(0) if words and words[0] in _ACTIONS else None
    if len(words) != (2 if action else 1):
        print("gateway: usage: gateway team USER | gateway team add|remove USER EMAIL")
        return 2
    teams = ops.teams
    if teams is None:
        print("gateway: SEAT_PRICE_IDS is not set: no teams")
        return 2
    try:
        owner = await _owner(words[0], ops)
        if owner is None:
            print(f"{words[0]}: no customer")
            return 1
        if action == "add":
            outcome = await teams.add(owner, words[1])
            print(f"{words[1]}: {outcome}")
            return 0 if outcome == "added" else 1
        if action == "remove":
            removed = await teams.remove(owner, words[1])
            print(f"{words[1]}: {'removed' if removed else 'not a member'}")
            return 0 if removed else 1
        row = await teams.team(owner, fresh=True)
    except StripeError as exc:
        print(f"gateway: Stripe: {exc}")
        return 1
    if row is None:
        print(f"{owner}: no seat subscription")
        return 1
    seats = await teams.seats(owner)
    print(f"team {owner}: {seats.used} of {row.seats} seats used (owner included)")
    for m in seats.members:
        seen = m.last_seen.isoformat(timespec="seconds") if m.last_seen else "never"
        state = "" if m.state == "active" else f"  ({m.state}: {m.reason})"
        print(f"  member   {m.email}  joined {m.joined_at.date()}  last seen {seen}{state}")
    for i in seats.pending:
        print(f"  invited  {i.email}  expires {i.expires_at.date()}")
    return 0
