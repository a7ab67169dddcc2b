"""``DATABASE_URL``: which store the gate uses, parsed once, its password never shown.

``sqlite:///absolute/path/to/file`` (the embedded default, one host) or
``postgresql://user:password@host:port/database`` (several replicas sharing one truth).
:attr:`DatabaseURL.shown` is the form every message, log line and ``repr`` uses: the password
replaced by ``***``. This module only parses; :mod:`gateway.store` speaks SQL.
"""

import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from gateway.errors import GatewayError

__all__ = ["DatabaseURL", "DatabaseURLError", "hide_password", "parse_database_url"]

_SCHEMES = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql"}
# ``scheme://user:password@``: the password is everything between the first ':' after the
# user and the last '@' before the host (a password may itself hold '@' or ':').
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):(?P<pw>.*)@(?P<tail>[^@]*)$")


class DatabaseURLError(GatewayError, ValueError):
    """A ``DATABASE_URL`` that cannot be used; the message never holds the password."""


def hide_password(raw: str) -> str:
    """``raw`` with the password of its userinfo (if any) replaced by ``***``."""
    m = _USERINFO.match(raw.strip())
    if m is None:
        return raw.strip()
    return f"{m.group('head')}:***@{m.group('tail')}"


@dataclass(frozen=True)
class DatabaseURL:
    """A parsed ``DATABASE_URL``. ``raw`` (with the password) is only handed to the driver."""

    scheme: str  # "sqlite" | "postgresql"
    raw: str = field(repr=False)
    path: str = ""  # sqlite: the file
    shown: str = ""  # the password hidden: safe to print
    password: str = field(default="", repr=False)

    def scrub(self, text: str) -> str:
        """``text`` (e.g. a driver's error message) with the password, if any, hidden."""
        return text.replace(self.password, "***") if self.password else text


def parse_database_url(raw: str) -> DatabaseURL:
    """Parse ``raw``; :class:`DatabaseURLError` (password hidden) if it is not usable."""
    text = raw.strip()
    shown = hide_password(text)
    scheme_part, sep, _ = text.partition("://")
    scheme = _SCHEMES.get(scheme_part.lower()) if sep else None
    if scheme is None:
        raise DatabaseURLError(
            f"{shown!r} is invalid: expected sqlite:///path/to/file or "
            "postgresql://user:password@host:port/database"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise DatabaseURLError(
            f"{shown!r} is invalid: a malformed URL (bad host or port)"
        ) from None
    if scheme == "sqlite":
        if parts.netloc or parts.path in ("", "/"):
            raise DatabaseURLError(
                f"{shown!r} is invalid: expected sqlite:///path/to/file (three slashes, a path)"
            )
        return DatabaseURL(scheme="sqlite", raw=text, path=unquote(parts.path), shown=shown)
    if not parts.hostname:
        raise DatabaseURLError(f"{shown!r} is invalid: no host (postgresql://user@host/db)")
    if port == 0:
        raise DatabaseURLError(f"{shown!r} is invalid: port 0")
    if not parts.path.strip("/"):
        raise DatabaseURLError(f"{shown!r} is invalid: no database name (…/database)")
    return DatabaseURL(
        scheme="postgresql",
        raw=text,
        shown=shown,
        password=unquote(parts.password or ""),
    )
