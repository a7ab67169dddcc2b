"""Operator commands: ``check``, ``sync``, ``grant``, ``revoke``, ``status``, ``migrate``.

They use the same store, Stripe client and entitlement cache as the server, so what they print is
what the gate sees, and every change (sync, grant, revoke) goes through
:class:`~gateway.entitlement.Entitlements`, the one owner of that state. Output is a plain table;
exit status 0 on success, 1 when something is wrong.
"""

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from gateway.dates import parse_until
from gateway.dburl import DatabaseURL, DatabaseURLError, parse_database_url
from gateway.entitlement import Entitlements
from gateway.model import SYSTEM_CLOCK, Clock, Entitlement, Identity
from gateway.plans import plan_from_price
from gateway.rules import access
from gateway.services import open_services
from gateway.sessions import Sessions
from gateway.settings import Settings, SettingsError, billing_state
from gateway.store import Backend, StoreError, database_url_of, open_store
from gateway.store.copy import copy_sqlite_to_postgres
from gateway.stripe_api import StripeAPI, StripeError, StripeRejected
from gateway.teams.cli import team
from gateway.teams.service import Teams
from gateway.usage import admin as usage_admin
from gateway.usage.service import Usage

__all__ = ["COMMANDS", "Ops", "migrate", "run"]


@dataclass
class Ops:
    """What every command works with: the gate's own store, the entitlement cache on it and,
    with billing on, Stripe (``stripe`` is None when billing is off)."""

    settings: Settings
    store: Backend
    stripe: StripeAPI | None
    entitlements: Entitlements
    sessions: Sessions
    clock: Clock = SYSTEM_CLOCK
    #: Teams and seats (None without ``SEAT_PRICE_IDS``).
    teams: Teams | None = None
    usage: Usage | None = None

    @property
    def billing(self) -> bool:
        return self.stripe is not None


Command = Callable[[argparse.Namespace, Ops], Awaitable[int]]


def _subject(user: str) -> str:
    """Grants are keyed by customer id, or by lower-cased email."""
    return user.lower() if "@" in user else user


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


async def _customers(user: str, ents: Entitlements) -> list[str]:
    if user.startswith("cus_"):
        return [user]
    return await ents.customers_for_email(user.lower())


async def check(args: argparse.Namespace, ops: Ops) -> int:
    settings, store, stripe = ops.settings, ops.store, ops.stripe
    enabled, why = billing_state(settings)
    rows = [
        ("billing", f"{'on' if enabled else 'off'} ({why})"),
        ("upstream", settings.upstream_url),
    ]
    ok = True
    for line in getattr(args, "unknown_settings", []):
        ok = False
        name, _, problem = line.partition(" ")
        rows.append((f"setting {name}", f"UNKNOWN {problem}"))
    try:
        timeout = aiohttp.ClientTimeout(total=settings.connect_timeout + 5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(settings.upstream_url + "/", allow_redirects=False) as resp,
        ):
            rows.append(("upstream reachable", f"yes (HTTP {resp.status})"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        ok = False
        rows.append(("upstream reachable", f"NO ({type(exc).__name__}: {exc})"))
    url = database_url_of(settings)
    # The password hidden; an unset DATABASE_URL is the SQLite file DATABASE_PATH.
    where = url.shown or f"sqlite://{_absolute(url.path)} (DATABASE_PATH)"
    writable = "writable" if await store.check_writable() else "NOT writable"
    rows.append(("store", f"{where} ({writable})"))
    if enabled:
        rows.append(("webhooks", _webhook_row(settings)))
    if stripe is not None:
        for price_id in settings.stripe_price_ids:
            try:
                plan = plan_from_price(await stripe.get_price(price_id))
                rows.append((f"price {price_id}", f"ok ({plan.name}, {plan.label})"))
            except StripeRejected as exc:
                ok = False
                verdict = (
                    "NOT FOUND: configuration error, STRIPE_PRICE_IDS lists a price (or plan) "
                    "Stripe does not know with this key (test vs live mode? a typo?)"
                    if exc.not_found
                    else f"FAILED ({exc})"
                )
                rows.append((f"price {price_id}", verdict))
            except StripeError as exc:
                ok = False
                rows.append((f"price {price_id}", f"FAILED ({exc})"))
    print(_table(rows))
    return 0 if ok else 1


def _absolute(path: str) -> str:
    return os.path.abspath(path)  # string work on the path (and the cwd): no disk I/O


def _webhook_row(settings: Settings) -> str:
    """Whether Stripe's webhooks will be accepted (they keep the cache true between reads)."""
    endpoint = f"{settings.public_url or '<PUBLIC_URL>'}{settings.gate_prefix}/webhooks/stripe"
    if not settings.stripe_webhook_secret:
        return (
            "STRIPE_WEBHOOK_SECRET is not set: webhooks will be refused (503), so cancellations "
            f"and plan changes show only after CACHE_TTL; set the endpoint's whsec_… ({endpoint})"
        )
    count = len(settings.stripe_webhook_secret)
    return f"ok ({count} signing secret{'s' if count > 1 else ''}; endpoint {endpoint})"


async def sync(args: argparse.Namespace, ops: Ops) -> int:
    ents = ops.entitlements
    if not ops.billing:
        print("billing is off: nothing to sync")
        return 1
    if args.all:
        ids = await ents.customer_ids()
    elif args.user:
        ids = await _customers(args.user, ents)
    else:
        print("gateway sync: give a USER or --all")
        return 1
    failed = 0
    for customer_id in ids:
        try:
            ent = await ents.refresh(customer_id, source="sync")
            print(f"{customer_id}  {ent.status}")
        except StripeError as exc:
            failed += 1
            print(f"{customer_id}  FAILED ({exc})")
    return 1 if failed else 0


async def grant(args: argparse.Namespace, ops: Ops) -> int:
    until = parse_until(args.until)
    await ops.entitlements.grant(_subject(args.user), until, args.note)
    print(f"granted {args.user} until {until.date().isoformat()}")
    return 0


async def revoke(args: argparse.Namespace, ops: Ops) -> int:
    """Remove the user's grant and sign out every session of theirs (every worker stops
    letting them in within ``L1_TTL``)."""
    await ops.entitlements.revoke(_subject(args.user))
    if args.user.startswith("cus_"):
        ids = [args.user]
    else:  # the customers this gate knows for the email (no Stripe call needed)
        ids = await ops.store.customer_ids_for_email(args.user)
    signed_out = 0
    for customer_id in ids:
        signed_out += await ops.sessions.revoke_all(customer_id)
    unit = "session" if signed_out == 1 else "sessions"
    print(f"revoked {args.user}: {signed_out} {unit} signed out")
    return 0


async def status(args: argparse.Namespace, ops: Ops) -> int:
    ents = ops.entitlements
    if not ops.billing:
        print("billing is off: everyone has access")
        return 0
    ids = await _customers(args.user, ents)
    if not ids:
        print(f"{args.user}: no Stripe customer")
        return 0
    now = ops.clock.now()
    email = args.user.lower() if "@" in args.user else None
    for customer_id in ids:
        lookup = await ents.lookup(Identity(email, customer_id, "cookie"))
        ent = lookup.entitlement
        acc = access(ent, ops.settings, now)
        source = (ent.source if ent else "—") + (" (stale)" if lookup.stale else "")
        rows = [
            ("customer", customer_id),
            ("status", ent.status if ent else "unknown"),
            ("access", f"{'yes' if acc.allowed else 'no'} ({acc.reason})"),
            ("ends", acc.ends_at.isoformat() if acc.ends_at else "—"),
            ("checked", ent.checked_at.isoformat() if ent else "—"),
            ("source", source),
        ]
        print(_table(rows))
    return 0


async def usage(args: argparse.Namespace, ops: Ops) -> int:
    """``gateway usage USER`` / ``gateway usage reconcile [--period YYYY-MM]``."""
    if ops.usage is None:
        print("no usage meters: set USAGE_RULES or USAGE_METERS (and billing on)")
        return 1
    if args.user == "reconcile":
        return await usage_admin.reconcile(ops.usage, args)
    ids = await _customers(args.user, ops.entitlements)
    if not ids:
        print(f"{args.user}: no Stripe customer")
        return 0

    async def entitlement_of(customer_id: str) -> Entitlement | None:
        return (await ops.entitlements.lookup(Identity(None, customer_id, "cookie"))).entitlement

    return await usage_admin.show(ops.usage, ids, entitlement_of)


COMMANDS: dict[str, Command] = {
    "check": check,
    "sync": sync,
    "grant": grant,
    "revoke": revoke,
    "status": status,
    "team": team,
    "usage": usage,
}


#: The commands that change state: on PostgreSQL they join the replica bus, so the running
#: replicas hear of the change; the read-only ones (check, status) need no listener.
_CHANGING = frozenset({"sync", "grant", "revoke", "team"})


async def run(command: str, args: argparse.Namespace, settings: Settings) -> int:
    """Run one operator command on the services the server builds (:func:`open_services`):
    on PostgreSQL its changes reach the running replicas through the same bus."""
    replicas = command in _CHANGING
    async with open_services(settings, replicas=replicas, usage_loops=False) as svc:
        stripe = svc.stripe if settings.billing_enabled else None
        ops = Ops(settings, svc.store, stripe, svc.entitlements, svc.sessions, svc.clock, svc.teams)
        ops.usage = svc.usage
        return await COMMANDS[command](args, ops)


async def migrate(args: argparse.Namespace, settings: Settings) -> int:
    """``gateway migrate``: bring ``DATABASE_URL``'s schema up to date and print its version;
    with ``--from sqlite:///… --to postgresql://…``, copy that SQLite store into that database
    (migrated first) and print the rows per table. Passwords are never printed."""
    source, target = getattr(args, "from_url", None), getattr(args, "to_url", None)
    if source or target:
        if not (source and target):
            raise SettingsError("migrate: --from and --to go together (sqlite:///… postgresql://…)")
        src, dst = _url("--from", source), _url("--to", target)
        if src.scheme != "sqlite" or dst.scheme != "postgresql":
            raise SettingsError("migrate: --from must be sqlite:///… and --to postgresql://…")
        try:
            copied = await copy_sqlite_to_postgres(src, dst)
        except StoreError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return 1
        print(f"copied {src.shown} -> {dst.shown}")
        rows = [(c.table, f"{c.source} in source, {c.added} added, {c.target} now") for c in copied]
        print(_table(rows))
        return 0
    store = open_store(settings)
    shown = database_url_of(settings).shown
    try:
        await store.open()
        version = await store.schema_version()
    except StoreError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    print(f"{shown}: schema version {version}")
    return 0


def _url(flag: str, raw: str) -> DatabaseURL:
    try:
        return parse_database_url(raw)
    except DatabaseURLError as exc:
        raise SettingsError(f"migrate {flag}={exc}") from None
