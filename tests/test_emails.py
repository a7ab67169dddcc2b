"""One email validator for every source (:mod:`gateway.emails`), and upstream headers that
cannot carry a bad value (``gate_headers``): through the real stack where the data comes from
the Stripe double."""

import logging
from pathlib import Path

import pytest

from gateway.emails import mailbox_key, valid_email
from gateway.gate import gate_headers
from gateway.model import Entitlement, Identity, Lookup, utcnow
from gateway.webhooks import checkout_email
from tests.stack import echoed_headers, running_stack

JSON = {"Accept": "application/json"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a@example.com", "a@example.com"),
        (" A.B+tag@Sub.Example.ORG\t", "a.b+tag@sub.example.org"),
        ("a@localhost", None),
        ("@example.com", None),
        ("a@@example.com", None),
        ("a b@example.com", None),
        ("<a@example.com>", None),
        ("a@example.com\r\nBcc: x@y.z", None),
        ("a@example.com\nX-Gate-User: cus_victim", None),
        ("<script>alert(1)</script>@example.com", None),
        ('"a"@example.com', None),
        ("a\x00b@example.com", None),
        ("a@exämple.com", None),
        ("a@" + "x" * 250 + ".com", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_valid_email(raw: object, expected: str | None) -> None:
    assert valid_email(raw) == expected


@pytest.mark.parametrize(
    ("email", "key"),
    [
        ("alice@example.com", "alice@example.com"),
        (" Alice+Promo@Example.COM ", "alice@example.com"),
        ("alice+a+b@example.com", "alice@example.com"),  # the first + starts the tag
        ("a.lice+x@example.com", "a.lice@example.com"),  # dots count outside Gmail
        ("a.l.ice+x@gmail.com", "alice@gmail.com"),
        ("A.Lice@GoogleMail.com", "alice@gmail.com"),
        ("alice@gmail.com.evil.example", "alice@gmail.com.evil.example"),
        ("a.lice@mail.gmail.com", "a.lice@mail.gmail.com"),  # only the two domains
        ("first-last@yahoo.com", "first-last@yahoo.com"),  # no "-" rule (documented)
        ("+tag@example.com", "+tag@example.com"),  # nothing before the +: kept whole
        ("...@gmail.com", "...@gmail.com"),
        ("not-an-email", "not-an-email"),
    ],
)
def test_mailbox_key(email: str, key: str) -> None:
    assert mailbox_key(email) == key
    assert mailbox_key(key) == key  # a key is its own key


def test_a_bad_email_from_a_trusted_source_is_logged_without_its_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.emails"):
        assert valid_email("x@example.com\r\nEvil: 1", source="stripe_checkout") is None
        assert valid_email("typed by anyone") is None  # a form: not logged
    [record] = [r for r in caplog.records if r.name == "gateway.emails"]
    assert record.getMessage() == "email_rejected"
    assert getattr(record, "gate_fields", {}) == {"source": "stripe_checkout", "reason": "invalid"}
    assert "Evil" not in caplog.text


def test_webhook_checkout_email_uses_the_validator() -> None:
    bad = {"customer_details": {"email": "a@example.com\r\nX: 1"}, "customer_email": None}
    assert checkout_email(bad) is None
    assert checkout_email({"customer_email": " A@Example.com "}) == "a@example.com"


def test_unsendable_header_values_are_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    now = utcnow()
    ent = Entitlement("cus_1", "active", checked_at=now, expires_at=now, price_id="price_\u2603")
    identity = Identity("a@example.com\r\nX-Gate-User: cus_victim", "cus_1", "cookie")
    with caplog.at_level(logging.WARNING, logger="gateway.gate"):
        headers = gate_headers(identity, Lookup(ent))
    assert headers == {"X-Gate-User": "cus_1", "X-Gate-Status": "active"}
    dropped = [getattr(r, "gate_fields", {}) for r in caplog.records if r.name == "gateway.gate"]
    assert dropped == [{"header": "X-Gate-Email"}, {"header": "X-Gate-Plan"}]
    assert "cus_victim" not in caplog.text


@pytest.mark.parametrize(
    "email",
    ["alice@example.com\r\nX-Gate-Role: admin", "<b onmouseover=alert(1)>alice</b>@example.com"],
)
async def test_stripe_email_with_crlf_or_html_never_reaches_upstream(
    tmp_path: Path, email: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The double takes the email as typed on its Checkout page, so its customer and Checkout
    # Session carry it; before the fix every request of this paying user was a 500.
    async with running_stack(tmp_path) as stack, stack.session() as client:
        with caplog.at_level(logging.WARNING, logger="gateway.emails"):
            resp = await stack.subscribe(client, email)
        assert resp.status == 303
        [customer] = stack.double.customers.values()
        assert customer["email"] == email  # the bad data really came from Stripe
        for _ in range(2):  # the remembered verdict too
            async with client.get(stack.url("/api/echo"), headers=JSON) as resp:
                assert resp.status == 200
                headers = echoed_headers(await resp.json())
            assert headers["x-gate-user"] == [customer["id"]]
            assert "x-gate-email" not in headers
            assert "x-gate-role" not in headers
        rejected = [
            getattr(r, "gate_fields", {}).get("source")
            for r in caplog.records
            if r.name == "gateway.emails"
        ]
        assert "stripe_checkout" in rejected
