"""Command line: ``gateway [serve|demo|check|sync|grant|revoke|status|keys|migrate|settings]``.

With no sub-command the gate serves ``UPSTREAM_URL``, or runs the local demo when it is unset.
Settings come from the environment and an optional ``.env`` file (environment wins).
A bad setting prints one line naming it and exits with status 2.
"""

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from gateway import settings as settings_mod
from gateway.apikeys.cli import add_parser as add_keys_parser
from gateway.settings import Settings, SettingsError, load_settings

__all__ = ["EXIT_CONFIG", "build_parser", "main"]

EXIT_CONFIG = 2


def _environ(env_file: str | None) -> tuple[dict[str, str], list[str]]:
    """The process environment over the ``.env`` file's values (environment wins), and a line
    for each name there that is not a setting (:func:`~gateway.settings.unknown_settings`)."""
    path = env_file or ".env"
    values: dict[str, str] = {}
    if os.path.exists(path):
        values = settings_mod.read_env_file(path)
    elif env_file:
        raise SettingsError(f"--env-file={env_file!r} is invalid: no such file")
    unknown = settings_mod.unknown_settings(values, os.environ)
    values.update(os.environ)
    return values, unknown


def _settings_epilog() -> str:
    lines = ["settings (environment variables or .env):"]
    for s in settings_mod.TABLE:
        default = f" [default: {s.default}]" if s.default else ""
        lines.append(f"  {s.name:<22} {s.help}{default}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A Stripe subscription gate in front of an existing web app.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--env-file", help="read settings from this file (default: ./.env)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the gate in front of UPSTREAM_URL")
    demo = sub.add_parser("demo", help="run the local demo: demo app + Stripe test double + gate")
    demo.add_argument("--port", type=int, default=None, help="gate port (default: PORT or 8080)")
    sub.add_parser("check", help="validate settings, reach Stripe and the upstream, print a table")
    sync = sub.add_parser("sync", help="re-read subscriptions from Stripe into the cache")
    sync.add_argument("user", nargs="?", help="customer id (cus_…) or email")
    sync.add_argument("--all", action="store_true", help="every known customer")
    grant = sub.add_parser("grant", help="grant access without a subscription (operator override)")
    grant.add_argument("user", help="customer id (cus_…) or email")
    grant.add_argument("--until", required=True, help="end date, YYYY-MM-DD (UTC)")
    grant.add_argument("--note", default="", help="why (kept with the grant)")
    revoke = sub.add_parser("revoke", help="remove an operator grant")
    revoke.add_argument("user", help="customer id (cus_…) or email")
    status = sub.add_parser("status", help="show what the gate knows about a user")
    status.add_argument("user", help="customer id (cus_…) or email")
    use = sub.add_parser(
        "usage", help="show a user's usage this period, or `usage reconcile` against Stripe"
    )
    use.add_argument("user", help="customer id (cus_…), email, or `reconcile`")
    use.add_argument("--period", help="reconcile: the month, YYYY-MM (default: this one)")
    mig = sub.add_parser(
        "migrate",
        help="apply schema migrations to DATABASE_URL; --from/--to: copy SQLite into PostgreSQL",
    )
    mig.add_argument("--from", dest="from_url", help="the SQLite store to copy: sqlite:///path")
    mig.add_argument("--to", dest="to_url", help="the database to copy into: postgresql://…")
    from gateway.teams.cli import add_parser as add_team_parser

    add_team_parser(sub)
    add_keys_parser(sub)
    st = sub.add_parser("settings", help="print the settings table")
    st.add_argument("--env", action="store_true", help="as .env.example")
    st.add_argument("--markdown", action="store_true", help="as the README's markdown table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command
    try:
        if command == "settings":
            print(settings_mod.markdown_table() if args.markdown else settings_mod.env_example())
            return 0
        env, unknown = _environ(args.env_file)
        for line in unknown:  # a typo would otherwise be silently ignored
            print(f"gateway: warning: {line}", file=sys.stderr)
        args.unknown_settings = unknown  # `gateway check` lists them and fails
        if command is None:
            command = "serve" if env.get("UPSTREAM_URL") else "demo"
        if command == "demo":
            from gateway.demo.runner import run_demo

            return run_demo(env, port=getattr(args, "port", None))
        if command == "migrate":
            from gateway import admin

            return asyncio.run(admin.migrate(args, _store_settings(env)))
        settings = load_settings(env)
        if command == "serve":
            return _serve(settings)
        if command == "keys":
            from gateway.apikeys.cli import run as run_keys

            return asyncio.run(run_keys(args, settings))
        from gateway import admin

        return asyncio.run(admin.run(command, args, settings))
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _store_settings(env: dict[str, str]) -> Settings:
    """Only the store's settings (``migrate`` needs no upstream, Stripe key or secret)."""
    wanted: dict[str, str] = {k: env[k] for k in ("DATABASE_URL", "DATABASE_PATH") if k in env}
    return load_settings(wanted, demo=True)


def _serve(settings: Settings) -> int:
    from gateway.app import create_app
    from gateway.server import serve

    serve(settings, create_app)  # its SettingsError (the store cannot be opened): exit 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
