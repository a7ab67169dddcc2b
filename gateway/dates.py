"""Dates given on the command line (``gateway grant --until``)."""

from datetime import UTC, datetime

from gateway.settings import SettingsError

__all__ = ["parse_until"]


def parse_until(text: str) -> datetime:
    """``YYYY-MM-DD`` as midnight UTC of that day; else :class:`SettingsError` naming
    ``--until`` (the CLI prints it as one line and exits with status 2)."""
    try:
        day = datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise SettingsError(f"--until={text!r} is invalid: expected a date YYYY-MM-DD") from None
    return day.replace(tzinfo=UTC)
