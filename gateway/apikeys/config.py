"""The API key settings' own syntax (checked at startup with the other settings: a bad value is
one line naming the setting)."""

import re

__all__ = ["check_header", "parse_rate"]

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.IGNORECASE)
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_PER.update({"h": 3600.0, "hour": 3600.0})
_TOKEN = re.compile(r"[A-Za-z0-9-]+")
_RESERVED = ("cookie", "host", "x-forwarded-", "x-original-", "x-gate-", "x-request-id")


def parse_rate(text: str) -> float:
    """``API_KEY_RATE`` (``10/s``, ``600/m``, ``1000/h``; empty: no limit, 0.0) as requests
    per second. ValueError saying what is expected otherwise."""
    if not text.strip():
        return 0.0
    m = _RATE.match(text)
    if m is None or int(m.group(1)) == 0:
        raise ValueError(
            f"{text!r}: expected requests per unit, like 10/s, 600/m or 1000/h (empty: no limit)"
        )
    return int(m.group(1)) / _PER[m.group(2).lower()]


def check_header(name: str) -> str:
    """``API_KEY_HEADER``: a header name the gate does not own otherwise. ValueError if not."""
    low = name.lower()
    if not _TOKEN.fullmatch(name) or low.startswith(_RESERVED):
        raise ValueError(
            f"{name!r}: expected a header name such as Authorization or X-Api-Key (not Cookie, "
            "Host, X-Forwarded-*, X-Original-* or X-Gate-*)"
        )
    return name
