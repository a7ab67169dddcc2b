"""One free trial per customer and per mailbox (gate + demo app + Stripe double, real servers).

The attack: with ``TRIAL_DAYS=7 TRIAL_WITHOUT_CARD=true`` the same signed-in customer posts the
Subscribe form again and again and starts a new card-less trial every time; or a second Stripe
customer for the same email does; or an anonymous visitor types the same email into Checkout.
Whoever has had any subscription (any status, canceled included) gets Checkout without a trial,
decided from Stripe (``status=all``) and, where it suffices, from the cached state; an anonymous
visitor confirms an email first; when Stripe cannot say, there is no trial.
"""

import html
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.mailer import LogMailer
from gateway.model import Clock
from gateway.settings import Settings
from gateway.stripe_api import StripeAPI, StripeUnavailable
from gateway.stripe_client import StripeClientAPI
from tests.stack import Stack, checkout_form, follow_link, page_form, running_stack

TRIAL = {"TRIAL_DAYS": "7", "TRIAL_WITHOUT_CARD": "true"}
HTML = {"Accept": "text/html,application/xhtml+xml"}
DAY = 86_400
PROMISE = "7-day free trial"
NO_TRIAL_SENTENCE = "The free trial is for new subscribers"


async def landing(client: aiohttp.ClientSession, stack: Stack) -> str:
    async with client.get(
        stack.url("/_gate/subscribe?next=/"), headers=HTML, allow_redirects=False
    ) as resp:
        assert resp.status == 200, await resp.text()
        return html.unescape(await resp.text())


async def post_checkout(
    client: aiohttp.ClientSession, stack: Stack, form: dict[str, str], form_id: str
) -> aiohttp.ClientResponse:
    """The attacker's request: the landing page's Subscribe form, posted again (a new
    ``form_id`` each time, as a reloaded page has)."""
    resp = await client.post(
        stack.url("/_gate/checkout"),
        data={**form, "form_id": form_id},
        headers=HTML,
        allow_redirects=False,
    )
    await resp.read()
    return resp


def session_of(stack: Stack, checkout_url: str) -> dict[str, Any]:
    assert checkout_url.startswith(stack.double.public_base + "/checkout/"), checkout_url
    return stack.double.checkout_sessions[checkout_url.rsplit("/", 1)[1]]


def trial_days_of(stack: Stack, session: dict[str, Any]) -> int:
    days: int = stack.double.checkout_options[session["id"]]["trial_period_days"]
    return days


async def pay(
    client: aiohttp.ClientSession, checkout_url: str, email: str, *, card: bool
) -> aiohttp.ClientResponse:
    """Press Pay (with a card) or "Start trial without a card" on the double's Checkout page."""
    data = {"email": email} if card else {"email": email, "without_card": "1"}
    resp = await client.post(f"{checkout_url}/pay", data=data, allow_redirects=False)
    await resp.read()
    return resp


def trials_of(stack: Stack, email: str) -> list[dict[str, Any]]:
    """The subscriptions on the double that started with a trial, of every customer with
    ``email``."""
    return [
        sub
        for sub in stack.double.subscriptions.values()
        if stack.double.customers[sub["customer"]]["email"] == email
        and sub["trial_start"] is not None
    ]


# --------------------------------------------------------------------------- the attack


async def test_the_same_customer_gets_one_trial_not_three(tmp_path: Path) -> None:
    async with running_stack(tmp_path, TRIAL) as stack, stack.session() as client:
        customer = stack.double.create_customer("eve@example.com")
        await stack.sign_in(client, customer["id"], "eve@example.com")
        form = checkout_form(await landing(client, stack))
        outcomes: list[tuple[int, int]] = []  # (trial days offered, status of "no card")
        for attempt in range(3):
            resp = await post_checkout(client, stack, form, f"attack-{attempt}")
            assert resp.status == 303, await resp.text()
            url = resp.headers["Location"]
            no_card = await pay(client, url, "eve@example.com", card=False)
            outcomes.append((trial_days_of(stack, session_of(stack, url)), no_card.status))
            if no_card.status != 303:  # no trial: Stripe asks for the card, as it must
                assert (await pay(client, url, "eve@example.com", card=True)).status == 303
            if attempt == 1:  # the first trial ends without a card: Stripe cancels it
                await stack.double.advance_time(7 * DAY + 60)
        assert len(trials_of(stack, "eve@example.com")) == 1
        assert outcomes == [(7, 303), (0, 400), (0, 400)]


async def test_a_trial_whose_webhook_has_not_arrived_still_counts(tmp_path: Path) -> None:
    """The gate's cache still says "no subscription" (no webhook, no /success visit): the
    Checkout's fresh read from Stripe sees the trial just started."""
    async with running_stack(tmp_path, TRIAL) as stack, stack.session() as client:
        stack.double.deliver_webhooks = False
        customer = stack.double.create_customer("quick@example.com")
        await stack.sign_in(client, customer["id"], "quick@example.com")
        form = checkout_form(await landing(client, stack))
        first = (await post_checkout(client, stack, form, "one")).headers["Location"]
        assert (await pay(client, first, "quick@example.com", card=False)).status == 303
        resp = await post_checkout(client, stack, form, "two")
        assert resp.status == 303
        assert trial_days_of(stack, session_of(stack, resp.headers["Location"])) == 0
        assert len(trials_of(stack, "quick@example.com")) == 1


async def test_a_known_past_subscriber_costs_checkout_no_extra_stripe_read(
    tmp_path: Path,
) -> None:
    """The cached state suffices when it already shows a subscription."""
    async with running_stack(tmp_path, TRIAL) as stack, stack.session() as client:
        customer = stack.double.create_customer("known@example.com")
        stack.double.create_subscription(customer["id"], "price_demo_monthly", status="canceled")
        await stack.sign_in(client, customer["id"], "known@example.com")
        form = checkout_form(await landing(client, stack))
        stack.double.calls.clear()
        resp = await post_checkout(client, stack, form, "known")
        assert resp.status == 303
        assert trial_days_of(stack, session_of(stack, resp.headers["Location"])) == 0
        assert stack.double.calls == [("POST", "/v1/checkout/sessions")]


@pytest.mark.parametrize("identity", ["second-customer", "identity-header"])
async def test_a_new_customer_for_an_email_that_had_a_trial_gets_none(
    tmp_path: Path, identity: str
) -> None:
    env = {**TRIAL, "IDENTITY_HEADER": "X-Forwarded-Email"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        first = stack.double.create_customer("eve@example.com")
        stack.double.create_subscription(first["id"], "price_demo_monthly", trial_days=7)
        await stack.double.set_status(next(iter(stack.double.subscriptions)), "canceled")
        headers: dict[str, str] = {}
        if identity == "second-customer":  # Stripe allows several customers per email
            second = stack.double.create_customer("eve@example.com")
            await stack.sign_in(client, second["id"], "eve@example.com")
        else:  # an auth proxy vouches for the email; the gate knows no customer of its own
            headers = {"X-Forwarded-Email": "Eve@Example.com"}
        async with client.get(
            stack.url("/_gate/subscribe?next=/"), headers={**HTML, **headers}
        ) as resp:
            page = html.unescape(await resp.text())
        assert PROMISE not in page and NO_TRIAL_SENTENCE in page
        resp = await client.post(
            stack.url("/_gate/checkout"),
            data=checkout_form(page),
            headers={**HTML, **headers},
            allow_redirects=False,
        )
        assert resp.status == 303, await resp.text()
        url = resp.headers["Location"]
        assert trial_days_of(stack, session_of(stack, url)) == 0
        assert (await pay(client, url, "eve@example.com", card=False)).status == 400
        assert len(trials_of(stack, "eve@example.com")) == 1


async def test_an_anonymous_visitor_confirms_an_email_before_a_trial(tmp_path: Path) -> None:
    """Anonymous, Checkout would ask Stripe's page for any email, and a new customer would
    get a new trial each time: the gate asks for the email (the sign-in link) first."""
    async with running_stack(tmp_path, TRIAL) as stack:
        for round_ in ("first", "again"):
            async with stack.session() as client:
                page = await landing(client, stack)
                assert PROMISE in page  # nobody is known yet: the offer stands
                resp = await post_checkout(client, stack, checkout_form(page), f"anon-{round_}")
                assert resp.status == 303
                login = resp.headers["Location"]
                assert login.startswith("/_gate/login?"), login  # not Stripe's Checkout
                assert not stack.double.checkout_sessions or round_ == "again"
                async with client.get(stack.url(login), headers=HTML) as resp:
                    assert "to start your free trial" in html.unescape(await resp.text())
                link = await mailed_link(stack, client, login, "new@example.com")
                resp = await follow_link(stack, client, link)
                assert resp.status == 303, await resp.text()
                assert resp.headers["Location"].startswith("/_gate/subscribe?next=")
                page = await landing(client, stack)
                resp = await post_checkout(client, stack, checkout_form(page), f"s-{round_}")
                assert resp.status == 303
                url = resp.headers["Location"]
                session = session_of(stack, url)
                assert session["customer"] is not None  # Checkout's email is the confirmed one
                if round_ == "first":
                    assert PROMISE in page
                    assert trial_days_of(stack, session) == 7
                    assert (await pay(client, url, "new@example.com", card=False)).status == 303
                    # The trial ends without a card; Stripe cancels it.
                    await stack.double.advance_time(7 * DAY + 60)
                else:
                    assert PROMISE not in page and NO_TRIAL_SENTENCE in page
                    assert trial_days_of(stack, session) == 0
                    assert (await pay(client, url, "new@example.com", card=False)).status == 400
        assert len(trials_of(stack, "new@example.com")) == 1
        assert len({c["id"] for c in stack.double.customers.values()}) == 1


async def mailed_link(
    stack: Stack, client: aiohttp.ClientSession, login_path: str, email: str
) -> str:
    """Ask for a sign-in link on the login page at ``login_path``; the link mailed."""
    form = await page_form(client, stack.url(login_path), "/_gate/login")
    async with client.post(
        stack.url("/_gate/login"), data={**form, "email": email}, headers=HTML
    ) as resp:
        assert resp.status == 200, await resp.text()
    mailer = stack.services.mailer
    assert isinstance(mailer, LogMailer)
    sent_to, link = mailer.sent[-1]
    assert sent_to == email
    return link


# --------------------------------------------------------------------------- one mailbox


async def confirm_and_checkout(stack: Stack, email: str, tag: str) -> tuple[str, str, int]:
    """An anonymous visitor confirms ``email`` (the mailed link) and posts Subscribe: the
    landing page then, the Checkout URL and the trial days it offers."""
    async with stack.session() as client:
        page = await landing(client, stack)
        resp = await post_checkout(client, stack, checkout_form(page), f"anon-{tag}")
        link = await mailed_link(stack, client, resp.headers["Location"], email)
        assert (await follow_link(stack, client, link)).status == 303
        page = await landing(client, stack)
        resp = await post_checkout(client, stack, checkout_form(page), f"s-{tag}")
        assert resp.status == 303, await resp.text()
        url = resp.headers["Location"]
        days = trial_days_of(stack, session_of(stack, url))
        if days:
            assert (await pay(client, url, email, card=False)).status == 303
            await stack.double.advance_time(7 * DAY + 60)  # ends without a card: canceled
        return page, url, days


@pytest.mark.parametrize(
    "emails",
    [
        ("alice+1@example.com", "alice+2@example.com", "alice@example.com"),
        ("a.lice@gmail.com", "alice+x@googlemail.com", "ali.ce+y@gmail.com"),
    ],
)
async def test_one_mailbox_gets_one_trial(tmp_path: Path, emails: tuple[str, ...]) -> None:
    """The red team's attack: anonymous visitors confirm ``alice+1@…`` then ``alice+2@…``
    (one inbox; on Gmail also dotted and googlemail.com variants) and each would start a
    card-less trial. One mailbox, one trial; another mailbox keeps its own."""
    async with running_stack(tmp_path, TRIAL) as stack:
        offered = []
        for n, email in enumerate(emails):
            page, _, days = await confirm_and_checkout(stack, email, str(n))
            offered.append(days)
            if n:
                assert PROMISE not in page and NO_TRIAL_SENTENCE in page
        assert offered == [7, 0, 0]
        assert (await confirm_and_checkout(stack, "bob+1@example.com", "bob"))[2] == 7


async def test_a_sub_address_of_a_past_stripe_subscriber_gets_no_trial(tmp_path: Path) -> None:
    """Stripe (not the gate's store) knows ``carol@example.com`` had a subscription: Stripe's
    answer for the base address counts when ``carol+new@example.com`` asks."""
    async with running_stack(tmp_path, TRIAL) as stack:
        carol = stack.double.create_customer("carol@example.com")
        sub = stack.double.create_subscription(carol["id"], "price_demo_monthly")
        await stack.double.set_status(sub["id"], "canceled")
        page, url, days = await confirm_and_checkout(stack, "carol+new@example.com", "c")
        assert days == 0 and NO_TRIAL_SENTENCE in page
        async with stack.session() as client:
            assert (await pay(client, url, "carol+new@example.com", card=False)).status == 400


# --------------------------------------------------------------------------- the landing page


async def test_the_landing_page_promises_no_trial_to_a_past_subscriber(tmp_path: Path) -> None:
    async with running_stack(tmp_path, TRIAL) as stack, stack.session() as client:
        customer = stack.double.create_customer("old@example.com")
        sub = stack.double.create_subscription(customer["id"], "price_demo_monthly")
        await stack.double.set_status(sub["id"], "canceled")
        await stack.sign_in(client, customer["id"], "old@example.com")
        page = await landing(client, stack)
        assert PROMISE not in page and "free for the first" not in page
        assert "Start free trial" not in page and ">Subscribe</button>" in page
        sentence = re.search(r'<p class="note" id="trial-note">([^<]*)</p>', page)
        assert sentence is not None, page
        assert sentence.group(1).startswith(NO_TRIAL_SENTENCE)

        # A customer who never subscribed keeps the offer.
        async with stack.session() as other:
            fresh = stack.double.create_customer("fresh@example.com")
            await stack.sign_in(other, fresh["id"], "fresh@example.com")
            page = await landing(other, stack)
            assert PROMISE in page and "Start free trial" in page and "trial-note" not in page


# --------------------------------------------------------------------------- Stripe cannot say


class _Flaky:
    """The real client, whose subscription and customer lists fail while ``down`` is set."""

    def __init__(self, inner: StripeClientAPI) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in ("list_subscriptions", "find_customers"):
            return attr

        async def call(*args: Any) -> Any:
            if self.down:
                raise StripeUnavailable("injected outage", operation=name)
            return await attr(*args)

        return call


async def test_no_trial_when_stripe_cannot_say(tmp_path: Path) -> None:
    flaky: list[_Flaky] = []

    async def factory(settings: Settings, clock: Clock) -> StripeAPI:
        flaky.append(_Flaky(await StripeClientAPI.create(settings, clock=clock)))
        return flaky[-1]

    async with (
        running_stack(tmp_path, TRIAL, stripe_factory=factory) as stack,
        stack.session() as client,
    ):
        customer = stack.double.create_customer("unsure@example.com")
        await stack.sign_in(client, customer["id"], "unsure@example.com")
        form = checkout_form(await landing(client, stack))
        flaky[-1].down = True
        resp = await post_checkout(client, stack, form, "outage")
        assert resp.status == 303, await resp.text()
        session = session_of(stack, resp.headers["Location"])
        assert trial_days_of(stack, session) == 0
        assert session["payment_method_collection"] == "always"
