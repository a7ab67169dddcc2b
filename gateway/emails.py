"""The one check of an email address, whatever it comes from.

Emails reach the gate from Stripe (Checkout Sessions and their ``customer_details``, customer
objects, webhook payloads), from the sign-in form and from a trusted identity header. Each of
them ends up in a session, the store, a log line or an upstream header (``X-Gate-Email``), so
each goes through :func:`valid_email` first: one rule, one place.

The rule is deliberately simple — one ``@``; no whitespace, control characters, commas, quotes,
parentheses, brackets or angle brackets (so no header injection, no HTML); an ASCII domain
with a dot; at most 254 characters — a sanity check of what others hand us, not RFC 5322.
Surrounding whitespace is stripped and the address lower-cased (the gate's canonical form).

Several addresses reach one inbox, so what is bounded *per person* (sign-in mails, free trials)
counts per :func:`mailbox_key` instead, while mail still goes to the address as typed and a
sign-in link still signs in that exact address. The rules are few and conservative — each is
true for the providers it is applied to, and merging two addresses that are in fact different
mailboxes costs only a shared sign-in limit or a trial:

- **lower case** (what :func:`valid_email` already does; no provider in use tells case apart);
- **``+tag`` dropped** from the local part (RFC 5233 sub-addressing with ``+``: Gmail, Google
  Workspace, Outlook.com / Microsoft 365, iCloud, Fastmail, Proton Mail, Zoho, and Postfix's
  and Exim's usual ``recipient_delimiter``) — on every domain, as the gate cannot tell which
  server a custom domain runs, and a real mailbox named ``x+y`` beside ``x`` is vanishingly
  rare. An address that *starts* with ``+`` is left as it is;
- **Gmail**: ``googlemail.com`` is ``gmail.com`` (one account, Google's own statement), and
  dots in the local part are ignored there (Google: "Gmail doesn't recognize dots"). Only on
  those two domains: Workspace domains and everyone else do tell ``a.b`` from ``ab``.

Left out on purpose (residuals, THREAT_MODEL): Yahoo's ``-`` disposable addresses and qmail's
``-`` delimiter (``-`` is common in real local parts), Fastmail's ``user@alias.domain``
subdomain addressing, catch-all domains and aliases — each needs knowledge of one provider's
settings the gate does not have.
"""

import logging
import re

from gateway.logs import log_event

__all__ = ["GMAIL_DOMAINS", "MAX_LENGTH", "mailbox_key", "valid_email"]

log = logging.getLogger("gateway.emails")

#: RFC 5321's limit for a forward path, the most any mail system accepts.
MAX_LENGTH = 254

#: Google's consumer mail domains: one account each, and dots in the local part do not count.
GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})

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


def mailbox_key(email: str) -> str:
    """The mailbox ``email`` lands in, as a key (see the module docstring): lower-cased, the
    ``+tag`` dropped, and for Gmail the dots too, ``googlemail.com`` as ``gmail.com``. Not an
    address to send to (send to the one typed). A value without ``@`` is only lower-cased."""
    address = email.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return address
    local = local.split("+", 1)[0] or local
    if domain in GMAIL_DOMAINS:
        local = local.replace(".", "") or local
        domain = "gmail.com"
    return f"{local}@{domain}"
