"""Stripe Checkout does not verify the email typed on its page, and the gate takes it
as the session's email. An anonymous visitor who pays for the cheapest plan typing the
*victim's* address gets a session whose ``X-Gate-Email`` — what the app is told about the
user — is the victim's address (``X-Gate-User`` is the attacker's own customer). An app that
keys its users on the email (the natural choice: the gate "owns identity", README does not
say the email is unverified) hands the attacker the victim's account. The store also links the
attacker's customer to the victim's email (the trial rule then refuses the victim a trial).

Held: entitlement follows the customer, not the email (the attacker never gets the victim's
Pro, and loses access when their own subscription ends); the victim's own sign-in is unharmed.
Fails on main: the app sees the victim's email on the attacker's requests."""

from pathlib import Path

from tests.stack import echoed_headers
from tests.tiers import BASIC, PRO, tiers_stack

JSON = {"Accept": "application/json"}
VICTIM = "victim@example.com"


async def test_an_unverified_checkout_email_never_reaches_the_app(tmp_path: Path) -> None:
    async with tiers_stack(tmp_path, FEATURE_RULES="/api/echo/pro*=analysis") as stack:
        async with stack.session() as victim:  # the victim: Pro, through the real flow
            assert (await stack.subscribe(victim, VICTIM, price=PRO)).status == 303
        async with stack.session() as attacker:
            # Anonymous, Subscribe to Basic, type the victim's address on Checkout, pay.
            assert (await stack.subscribe(attacker, VICTIM, price=BASIC)).status == 303
            async with attacker.get(stack.url("/api/echo/paid"), headers=JSON) as resp:
                assert resp.status == 200
                seen = echoed_headers(await resp.json())
            async with attacker.get(stack.url("/api/echo/pro"), headers=JSON) as resp:
                assert resp.status == 402  # held: no Pro from the victim's subscription
        assert seen.get("x-gate-email") != [VICTIM], (
            f"the app was told the attacker ({seen['x-gate-user']}) is {VICTIM}"
        )
