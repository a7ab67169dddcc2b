"""The API-key forms' choices against a running gate: an expiry or an overlap the form does not
offer gets the 400 page naming the choices and changes nothing; someone signed out is sent to
sign in first, whatever they chose."""

from pathlib import Path

import pytest

from gateway.apikeys.keys import ApiKeys
from tests.stack import Stack, form_fields, running_stack, subscribed

pytestmark = pytest.mark.timeout(120)

HTML = {"Accept": "text/html"}


def keys_of(stack: Stack) -> ApiKeys:
    keys = stack.services.apikeys
    assert keys is not None
    return keys


@pytest.mark.parametrize(
    ("action", "field", "refusal"),
    [
        ("api-keys", "expires", "Pick an expiry: 30, 90 or 365 days, or none."),
        ("api-keys/roll", "overlap", "Pick how long the old key keeps working: now, 1 h or 24 h."),
    ],
)
async def test_a_choice_the_form_does_not_offer_is_refused(
    tmp_path: Path, action: str, field: str, refusal: str
) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        customer_id = await subscribed(stack, client, "choice@example.com")
        _, row = await keys_of(stack).create(customer_id, "job")
        async with client.get(stack.url("/_gate/account"), headers=HTML) as resp:
            form = form_fields(await resp.text(), f"/_gate/{action}")
        for value in ("7", "forever", "", "90 "):
            data = {**form, "name": "nightly", "key": row.id, field: value}
            async with client.post(
                stack.url(f"/_gate/{action}"), data=data, headers=HTML, allow_redirects=False
            ) as resp:
                assert resp.status == 400, (value, resp.status)
                assert refusal in await resp.text()
        rows = await keys_of(stack).of_customer(customer_id)
        assert [(r.id, r.revoked_at) for r in rows] == [(row.id, None)]

        async with stack.session() as stranger:
            async with stranger.get(stack.url("/_gate/login"), headers=HTML) as resp:
                csrf = form_fields(await resp.text(), "/_gate/login")["csrf"]
            data = {"csrf": csrf, "name": "nightly", "key": row.id, field: "7"}
            async with stranger.post(
                stack.url(f"/_gate/{action}"), data=data, headers=HTML, allow_redirects=False
            ) as resp:
                assert resp.status == 303, resp.status
                assert resp.headers["Location"].startswith("/_gate/login?next=")
        assert len(await keys_of(stack).of_customer(customer_id)) == 1
