"""The mailer: SMTP against a real (tiny) SMTP server on 127.0.0.1, and the log mailer."""

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from gateway.mailer import LOG_MAILER_KEEP, LogMailer, MailError, SMTPMailer, make_mailer
from gateway.settings import Settings
from tests.conftest import closed_port, make_settings

LINK = "http://127.0.0.1:8080/_gate/login/verify?next=%2Fapp&token=" + "A" * 43
PASSWORD = "hunter2-very-secret"


def address(command: str) -> str:
    """The path of ``MAIL FROM:<a@b> BODY=8BITMIME`` or ``RCPT TO:<a@b>``."""
    return command.partition("<")[2].partition(">")[0]


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class FakeSMTPServer:
    """Just enough of RFC 5321 for aiosmtplib: EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT."""

    accept_auth: bool = True
    reject_rcpt: bool = False
    messages: list[Received] = field(default_factory=list)
    auth_lines: list[str] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def reply(line: str) -> None:
            writer.write(line.encode() + b"\r\n")

        reply("220 fake.test ESMTP ready")
        sender, recipients = "", list[str]()
        try:
            while line := await reader.readline():
                command = line.decode().rstrip("\r\n")
                verb = command.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    reply("250-fake.test")
                    reply("250-AUTH PLAIN")
                    reply("250 8BITMIME")
                elif verb == "HELO":
                    reply("250 fake.test")
                elif verb == "AUTH":
                    self.auth_lines.append(command)
                    if self.accept_auth:
                        reply("235 2.7.0 Authentication successful")
                    else:
                        reply("535 5.7.8 Authentication credentials invalid")
                elif verb == "MAIL":
                    sender, recipients = address(command), []
                    reply("250 OK")
                elif verb == "RCPT":
                    if self.reject_rcpt:
                        reply("550 5.1.1 No such user")
                    else:
                        recipients.append(address(command))
                        reply("250 OK")
                elif verb == "DATA":
                    reply("354 End data with <CR><LF>.<CR><LF>")
                    await writer.drain()
                    lines: list[bytes] = []
                    while (chunk := await reader.readline()) != b".\r\n":
                        lines.append(chunk[1:] if chunk.startswith(b"..") else chunk)
                    self.messages.append(Received(sender, recipients, b"".join(lines)))
                    self.received.set()
                    reply("250 OK queued")
                elif verb in ("RSET", "NOOP"):
                    reply("250 OK")
                elif verb == "QUIT":
                    reply("221 Bye")
                    await writer.drain()
                    break
                else:
                    reply("502 Command not implemented")
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def smtp() -> AsyncIterator[FakeSMTPServer]:
    fake = FakeSMTPServer()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    async with server:
        yield fake


def smtp_settings(port: int, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_starttls": False,
        "smtp_from": "gate@example.com",
        "app_name": "PatentLLM",
    }
    values.update(overrides)
    return make_settings(**values)


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every record's message and structured fields, as one text."""
    return "\n".join(f"{r.getMessage()} {getattr(r, 'gate_fields', {})}" for r in caplog.records)


def parse(data: bytes) -> EmailMessage:
    msg = message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


async def test_smtp_delivers_the_link(smtp: FakeSMTPServer) -> None:
    mailer = SMTPMailer(smtp_settings(smtp.port))
    await mailer.send_login_link("alice@example.com", LINK)
    await asyncio.wait_for(smtp.received.wait(), 5)

    [received] = smtp.messages
    assert received.sender == "gate@example.com"
    assert received.recipients == ["alice@example.com"]
    msg = parse(received.data)
    assert msg["To"] == "alice@example.com"
    assert msg["From"] == "gate@example.com"
    assert msg["Subject"] == "Sign in to PatentLLM"
    assert msg["Message-ID"] and msg["Date"]
    body = msg.get_content()
    assert LINK in body
    assert "15 minutes" in body
    assert smtp.auth_lines == []  # no SMTP_USERNAME: no AUTH


async def test_smtp_authenticates_when_a_username_is_set(smtp: FakeSMTPServer) -> None:
    mailer = SMTPMailer(smtp_settings(smtp.port, smtp_username="gate", smtp_password=PASSWORD))
    await mailer.send_login_link("bob@example.com", LINK)
    [auth] = smtp.auth_lines
    assert base64.b64decode(auth.split()[2]) == f"\0gate\0{PASSWORD}".encode()
    assert LINK in parse(smtp.messages[0].data).get_content()


async def test_smtp_auth_failure_is_a_mail_error_without_the_password(
    smtp: FakeSMTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    smtp.accept_auth = False
    mailer = SMTPMailer(smtp_settings(smtp.port, smtp_username="gate", smtp_password=PASSWORD))
    with caplog.at_level(logging.DEBUG), pytest.raises(MailError) as info:
        await mailer.send_login_link("bob@example.com", LINK)
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in logged(caplog)
    assert "smtp_send_failed" in logged(caplog)
    assert smtp.messages == []


async def test_smtp_refused_recipient_is_a_mail_error(smtp: FakeSMTPServer) -> None:
    smtp.reject_rcpt = True
    with pytest.raises(MailError):
        await SMTPMailer(smtp_settings(smtp.port)).send_login_link("nobody@example.com", LINK)
    assert smtp.messages == []


async def test_smtp_server_down_is_a_mail_error(caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    with caplog.at_level(logging.ERROR), pytest.raises(MailError):
        await SMTPMailer(smtp_settings(port)).send_login_link("carol@example.com", LINK)
    [record] = [r for r in caplog.records if r.getMessage() == "smtp_send_failed"]
    assert getattr(record, "gate_fields", {})["port"] == port


async def test_log_mailer_logs_one_warning_and_keeps_the_links(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mailer = LogMailer()
    with caplog.at_level(logging.WARNING, logger="gateway.mailer"):
        await mailer.send_login_link("dave@example.com", LINK)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"login link for dave@example.com: {LINK}"
    assert mailer.sent == [("dave@example.com", LINK)]


async def test_log_mailer_keeps_a_bounded_history() -> None:
    mailer = LogMailer()
    for i in range(LOG_MAILER_KEEP + 5):
        await mailer.send_login_link(f"u{i}@example.com", f"link-{i}")
    assert len(mailer.sent) == LOG_MAILER_KEEP
    assert mailer.sent[-1] == (f"u{LOG_MAILER_KEEP + 4}@example.com", f"link-{LOG_MAILER_KEEP + 4}")


def test_make_mailer_picks_smtp_only_with_a_host() -> None:
    assert isinstance(make_mailer(make_settings()), LogMailer)
    assert isinstance(make_mailer(smtp_settings(2525)), SMTPMailer)
