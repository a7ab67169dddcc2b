"""The one check of an email address, whatever it comes from.

Emails reach the gate from Stripe (Checkout Sessions and their ``customer_details``, customer
objects, webhook payloads), from the sign-in form and from a trusted identity header. Each of
them ends up in a session, the store, a log line or an upstream header (``X-Gate-Email``), so
each goes through :func:`valid_email` first: one rule, one place.

The rule is deliberately simple — one ``@``; no whitespace, control characters, commas, quotes,
parentheses, brackets or angle brackets (so no header injection, no HTML); an ASCII domain
with a dot; at most 254 characters — a sanity check of what others hand us, not RFC 5322.
Surrounding whitespace is stripped and the address lower-cased (the gate's canonical form).
"""

import logging
import re

from gateway.logs import log_event

__all__ = ["MAX_LENGTH", "valid_email"]

log = logging.getLogger("gateway.emails")

#: RFC 5321's limit for a forward path, the most any mail system accepts.
MAX_LENGTH = 254

_EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f,;<>\"'()\[\]\\]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")


def valid_email(value: object, *, source: str | None = None) -> str | None:
    """``value`` stripped and lower-cased if it is a string that looks like an email address,
    else None.

    ``source`` names where a value that should be an email came from (``stripe_checkout``,
    ``webhook``…): a non-empty value refused from such a source is logged (a warning, without
    the value: it is personal data and may be an attack), since it is bad data from a party
    we trust. Without ``source`` (a form, a header: anyone can type anything) nothing is
    logged here."""
    if not isinstance(value, str):
        if value is not None and source is not None:
            log_event(log, "email_rejected", level=logging.WARNING, source=source, reason="type")
        return None
    email = value.strip().lower()
    if len(email) <= MAX_LENGTH and _EMAIL.fullmatch(email):
        return email
    if email and source is not None:
        log_event(log, "email_rejected", level=logging.WARNING, source=source, reason="invalid")
    return None
