"""``gateway keys create USER --name NAME [--expires 90d] [--json]``, ``gateway keys list USER
[--json]``, ``gateway keys revoke KEY_ID``.

``USER`` is a customer id (``cus_…``) or an email, as for ``grant`` (an email names the
customers the gate knows for it; it must be exactly one to create a key). ``create`` prints
the key once (with ``--json``: one object with ``id``, ``key``, ``customer``, ``expires``, for
scripts); nothing else ever shows it again. On PostgreSQL ``revoke`` reaches the running
replicas through the bus at once (every worker within 1 s in any case)."""

import argparse
import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from gateway.settings import Settings, SettingsError, parse_duration
from gateway.store.api_keys import ApiKeyRow, TooManyKeys

if TYPE_CHECKING:  # the parser is built for every command; the services only for `keys`
    from gateway.apikeys.keys import ApiKeys
    from gateway.store import Backend

__all__ = ["add_parser", "run"]


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register ``keys`` and its three sub-commands."""
    keys = sub.add_parser("keys", help="API keys: create, list, revoke")
    cmds = keys.add_subparsers(dest="keys_command", required=True)
    create = cmds.add_parser("create", help="a new API key for USER (printed once)")
    create.add_argument("user", help="customer id (cus_…) or email")
    create.add_argument("--name", required=True, help="what uses the key (a job, a notebook)")
    create.add_argument("--expires", default="", help="lifetime, e.g. 90d or 12h (default: none)")
    create.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    listing = cmds.add_parser("list", help="USER's working API keys (never the keys)")
    listing.add_argument("user", help="customer id (cus_…) or email")
    listing.add_argument("--json", action="store_true", help="a JSON array")
    revoke = cmds.add_parser("revoke", help="stop an API key now")
    revoke.add_argument("key_id", help="the key's id (key_…), as `keys list` shows it")


def _expiry(text: str) -> timedelta | None:
    if not text:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise SettingsError(
            f"keys create --expires={text!r} is invalid: expected a duration like 90d or 12h"
        ) from None
    if seconds <= 0:
        raise SettingsError(f"keys create --expires={text!r} is invalid: must be positive")
    return timedelta(seconds=seconds)


def _shown(row: ApiKeyRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "customer": row.customer_id,
        "name": row.name,
        "start": row.start,
        "created": row.created_at.isoformat(),
        "last_used": row.last_used.isoformat() if row.last_used else None,
        "expires": row.expires_at.isoformat() if row.expires_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


async def _customers(user: str, store: "Backend") -> list[str]:
    if user.startswith("cus_"):
        return [user]
    return await store.customer_ids_for_email(user)


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``keys`` sub-command on the server's own services (exit status)."""
    from gateway.services import open_services

    command = args.keys_command
    expires = _expiry(args.expires) if command == "create" else None
    async with open_services(settings, replicas=command != "list") as svc:
        keys = svc.apikeys
        if keys is None:  # pragma: no cover - open_services always builds it
            raise SettingsError("API keys need the store")
        if command == "revoke":
            return await _revoke(keys, args.key_id)
        ids = await _customers(args.user, svc.store)
        if command == "list":
            rows = [r for c in ids for r in await keys.of_customer(c)]
            if args.json:
                print(json.dumps([_shown(r) for r in rows]))
            else:
                for r in rows:
                    expiry = r.expires_at.date().isoformat() if r.expires_at else "never"
                    used = r.last_used.isoformat(timespec="seconds") if r.last_used else "never"
                    print(f"{r.id}  {r.start}…  {r.name}  expires {expiry}  last used {used}")
            return 0
        if len(ids) != 1:
            print(f"gateway keys create: {args.user} names {len(ids)} customers; give a cus_ id")
            return 1
        try:
            key, row = await keys.create(ids[0], args.name, expires)
        except TooManyKeys as exc:
            print(f"gateway keys create: {exc} (MAX_API_KEYS_PER_CUSTOMER)")
            return 1
        if args.json:
            print(json.dumps({"key": key, **_shown(row)}))
        else:
            print(key)
            print(f"id {row.id}, customer {row.customer_id}: shown once, store it now")
        return 0


async def _revoke(keys: "ApiKeys", key_id: str) -> int:
    row = await keys.revoke(key_id)
    if row is None:
        print(f"gateway keys revoke: {key_id} is not a working key")
        return 1
    print(f"revoked {row.id} ({row.start}…, customer {row.customer_id})")
    return 0
