"""Sending email sign-in links: over SMTP in production, to the log in development.

``make_mailer`` picks the implementation from the settings: :class:`SMTPMailer` when
``SMTP_HOST`` is set, :class:`LogMailer` otherwise. Both only ever send one kind of message, the
sign-in link built by :class:`gateway.signin.LoginLinks`.
"""

import logging
import sys
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Protocol, TextIO

import aiosmtplib

from gateway.errors import GatewayError
from gateway.logs import flush_logs, log_event
from gateway.settings import Settings

__all__ = [
    "LOG_MAILER_KEEP",
    "LogMailer",
    "MailError",
    "Mailer",
    "SMTPMailer",
    "framed_link",
    "make_mailer",
]

log = logging.getLogger(__name__)

#: How many links a :class:`LogMailer` remembers (for tests and the demo).
LOG_MAILER_KEEP = 100


class MailError(GatewayError):
    """A sign-in email could not be sent. The message names the server, never the password."""


class Mailer(Protocol):
    async def send_login_link(self, email: str, link: str) -> None:
        """Send ``link`` to ``email``. Raises :class:`MailError` if it could not be sent."""
        ...

    async def send_invitation(self, email: str, link: str, inviter: str) -> None:
        """Send a team invitation ``link`` (from ``inviter``) to ``email``. Raises
        :class:`MailError` if it could not be sent."""
        ...


def _body(app_name: str, link: str, ttl_minutes: int) -> str:
    return (
        f"Hello,\n\n"
        f"Someone (hopefully you) asked to sign in to {app_name} with this address.\n"
        f"Open this link to sign in. It works once and expires in {ttl_minutes} minutes:\n\n"
        f"{link}\n\n"
        f"If you did not ask for it, ignore this email: nothing happens without the link.\n"
    )


class SMTPMailer:
    """Sends sign-in links through an SMTP server with ``aiosmtplib``.

    ``SMTP_STARTTLS=true`` requires STARTTLS on a plain connection (port 587); port 465 is
    SMTPS (implicit TLS), whatever ``SMTP_STARTTLS`` says. Authentication is used when
    ``SMTP_USERNAME`` is set. The From address is ``SMTP_FROM``, else ``SMTP_USERNAME``.
    """

    def __init__(self, settings: Settings) -> None:
        self._host = settings.smtp_host
        self._port = settings.smtp_port
        self._username = settings.smtp_username or None
        self._password = settings.smtp_password or None
        self._implicit_tls = settings.smtp_port == 465
        self._starttls = settings.smtp_starttls and not self._implicit_tls
        self._sender = settings.smtp_from or settings.smtp_username or f"gateway@{self._host}"
        self._app_name = settings.app_name
        self._ttl_minutes = max(1, int(settings.login_token_ttl // 60))
        self._timeout = 30.0

    def message(self, email: str, link: str) -> EmailMessage:
        """The sign-in email (plain text)."""
        msg = EmailMessage()
        msg["From"] = self._sender
        msg["To"] = email
        msg["Subject"] = f"Sign in to {self._app_name}"
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=self._sender.rpartition("@")[2] or None)
        msg.set_content(_body(self._app_name, link, self._ttl_minutes))
        return msg

    async def send_invitation(self, email: str, link: str, inviter: str) -> None:
        msg = self.message(email, link)
        msg.replace_header("Subject", f"{inviter} invited you to {self._app_name}")
        msg.set_content(
            f"Hello,\n\n{inviter} invited you to join their team on {self._app_name}.\n"
            f"Open this link to join and sign in with this address. It works once:\n\n"
            f"{link}\n\nIf you do not know {inviter}, ignore this email.\n"
        )
        await self._send(email, msg)

    async def send_login_link(self, email: str, link: str) -> None:
        await self._send(email, self.message(email, link))

    async def _send(self, email: str, msg: EmailMessage) -> None:
        try:
            await aiosmtplib.send(
                msg,
                hostname=self._host,
                port=self._port,
                username=self._username,
                password=self._password,
                use_tls=self._implicit_tls,
                start_tls=self._starttls,
                timeout=self._timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:  # OSError covers timeouts
            # The exception text is the server's reply or the socket error; aiosmtplib never
            # puts the password in it.
            reason = f"{type(exc).__name__}: {exc}"
            self._log_send("smtp_send_failed", email, logging.ERROR, error=reason)
            raise MailError(
                f"could not send the sign-in email via {self._host}:{self._port}: {reason}"
            ) from exc
        self._log_send("smtp_sent", email)

    def _log_send(
        self, event: str, email: str, level: int = logging.INFO, **fields: object
    ) -> None:
        """A send's outcome, with the server and the recipient's domain (never the address)."""
        domain = email.rpartition("@")[2]
        log_event(
            log,
            event,
            level=level,
            host=self._host,
            port=self._port,
            recipient_domain=domain,
            **fields,
        )


class LogMailer:
    """Development mailer: logs ``login link for <email>: <link>`` at WARNING level.

    The link is a bearer credential for that account until it is used or expires, so this is
    acceptable only in development (``SMTP_HOST`` unset): anyone who reads the log can sign in
    as that user. The last :data:`LOG_MAILER_KEEP` links are kept in :attr:`sent` for tests.
    """

    def __init__(self, *, framed: bool = False, stream: TextIO | None = None) -> None:
        #: ``(email, link)`` pairs, oldest first.
        self.sent: list[tuple[str, str]] = []
        self._framed = framed
        self._stream = stream

    async def send_invitation(self, email: str, link: str, inviter: str) -> None:
        self.sent.append((email, link))
        del self.sent[:-LOG_MAILER_KEEP]
        log_event(log, f"team invitation for {email} from {inviter}: {link}", level=logging.WARNING)

    async def send_login_link(self, email: str, link: str) -> None:
        self.sent.append((email, link))
        del self.sent[:-LOG_MAILER_KEEP]
        if self._framed:
            # The demo's terminal: a box the eye finds among the log lines.
            flush_logs()
            stream = self._stream or sys.stderr
            stream.write(framed_link(email, link))
            stream.flush()
            return
        # A plain sentence (not key=value fields) so a developer spots and copies the link.
        log_event(log, f"login link for {email}: {link}", level=logging.WARNING)


def framed_link(email: str, link: str) -> str:
    """The sign-in link as a framed block (the link on a line of its own, to copy whole)."""
    lines = [f"Sign-in link for {email} (opens once, works for a limited time):", link]
    width = max(len(line) for line in lines)
    rule = "+" + "-" * (width + 2) + "+"
    body = "\n".join(f"| {line.ljust(width)} |" for line in lines)
    return f"\n{rule}\n{body}\n{rule}\n\n"


def make_mailer(settings: Settings) -> Mailer:
    """:class:`SMTPMailer` when ``SMTP_HOST`` is set, else :class:`LogMailer` (development)."""
    if settings.smtp_host:
        return SMTPMailer(settings)
    log_event(
        log,
        "mailer_log_only",
        level=logging.WARNING,
        reason="SMTP_HOST unset",
        effect="sign-in links are written to the log (development only)",
    )
    return LogMailer(framed=settings.demo and settings.log_format == "text")
