"""gateway.signin: email sign-in links against the real SQLite store, on an injected clock."""

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from gateway.emails import mailbox_key
from gateway.mailer import LogMailer, MailError, SMTPMailer
from gateway.model import ManualClock
from gateway.settings import SESSION_COOKIE
from gateway.signin import LoginLinks, Redeemed, client_key, sender_network
from gateway.store import Backend, PostgresStore
from tests.conftest import closed_port, make_settings
from tests.stack import Stack, follow_link, form_fields, running_stack, status_of
from tests.stores import BACKENDS, backend_url, new_store, opened

# --- LoginLinks (a real store: SQLite and PostgreSQL)


LINK_BASE = "http://127.0.0.1:8080/_gate/login/verify"


def token_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["token"][0]


def links(
    store: Backend, clock: ManualClock, limit: int = 5, **overrides: float
) -> tuple[LoginLinks, LogMailer]:
    """Sign-in links on ``store`` (``limit``: LOGIN_RATE_LIMIT; ``overrides``: more settings)
    and the mailer that records what they send."""
    mailer = LogMailer()
    settings = make_settings(login_rate_limit=limit, login_token_ttl=900.0, **overrides)
    return LoginLinks(settings, store, mailer, clock=clock), mailer


async def test_link_is_sent_and_works_once(store: Backend) -> None:
    login, mailer = links(store, ManualClock())
    await login.request("Alice@Example.com", "10.0.0.1", LINK_BASE)
    [(email, link)] = mailer.sent
    assert email == "alice@example.com"
    assert link.startswith(f"{LINK_BASE}?token=")
    token = token_of(link)
    assert len(token) >= 43
    assert await login.verify(token) == "alice@example.com"
    assert await login.verify(token) is None  # single use


async def test_link_base_with_a_query_keeps_it(store: Backend) -> None:
    login, mailer = links(store, ManualClock())
    await login.request("a@example.com", "10.0.0.1", f"{LINK_BASE}?next=%2Fapp")
    query = parse_qs(urlsplit(mailer.sent[0][1]).query)
    assert query["next"] == ["/app"]
    assert await login.verify(query["token"][0]) == "a@example.com"


async def test_link_expires(store: Backend) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    clock.advance(900 + 1)
    assert await login.verify(token_of(mailer.sent[0][1])) is None


async def test_link_still_valid_before_expiry(store: Backend) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    clock.advance(900 - 5)
    assert await login.verify(token_of(mailer.sent[0][1])) == "a@example.com"


async def test_unknown_and_garbage_tokens(store: Backend) -> None:
    login, _ = links(store, ManualClock())
    for token in ("", "x" * 43, "a" * 1000, "../../etc", "tok en", "\u2603"):
        assert await login.verify(token) is None


async def test_a_new_link_never_invalidates_an_older_one(store: Backend) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock)
    for _ in range(3):
        await login.request("a@example.com", "10.0.0.1", LINK_BASE)
        clock.advance(61)  # past the address's cool-down
    await login.request("b@example.com", "10.0.0.1", LINK_BASE)  # another address
    first, second, third, other = (token_of(link) for _, link in mailer.sent)
    assert len({first, second, third}) == 3
    # every one works, in any order, each once
    for token in (second, first, third):
        assert await login.redeem(token) == Redeemed("ok", "a@example.com")
        assert await login.redeem(token) == Redeemed("used")
    assert await login.redeem(other) == Redeemed("ok", "b@example.com")


async def test_a_refused_link_says_why(store: Backend) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    used = token_of(mailer.sent[-1][1])
    assert (await login.redeem(used)).outcome == "ok"
    assert await login.redeem(used) == Redeemed("used")  # "already used", not "expired"
    assert await login.redeem(used) == Redeemed("used")  # and again
    clock.advance(61)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    late = token_of(mailer.sent[-1][1])
    clock.advance(900 + 1)
    assert await login.redeem(late) == Redeemed("expired")
    assert await login.redeem(late) == Redeemed("expired")
    assert await login.redeem("x" * 43) == Redeemed("invalid")  # never issued
    assert await login.redeem("../x") == Redeemed("invalid")


async def test_unknown_email_still_gets_a_link(store: Backend) -> None:
    # The store knows no customers at all: the link is sent anyway, so the page that asked
    # cannot tell customers from strangers. What the email maps to is decided after verify.
    login, mailer = links(store, ManualClock())
    await login.request("stranger@example.net", "10.0.0.1", LINK_BASE)
    assert [email for email, _ in mailer.sent] == ["stranger@example.net"]


async def test_malformed_email_sends_nothing_and_does_not_raise(store: Backend) -> None:
    login, mailer = links(store, ManualClock())
    await login.request("not-an-email", "10.0.0.1", LINK_BASE)
    await login.request("a@example.com\r\nBcc: victim@example.com", "10.0.0.1", LINK_BASE)
    assert mailer.sent == []


async def test_an_address_gets_one_mail_per_cooldown_whoever_asks(store: Backend) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock, limit=3)
    for _ in range(5):
        await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    await login.request("a@example.com", "10.0.0.8", LINK_BASE)  # another IP: the same address
    assert len(mailer.sent) == 1
    await login.request("b@example.com", "10.0.0.9", LINK_BASE)  # other addresses unaffected
    assert len(mailer.sent) == 2
    clock.advance(59)
    await login.request("a@example.com", "10.0.0.8", LINK_BASE)
    assert len(mailer.sent) == 2
    clock.advance(2)  # the cool-down (one minute) has passed
    await login.request("a@example.com", "10.0.0.8", LINK_BASE)
    assert [email for email, _ in mailer.sent] == [
        "a@example.com",
        "b@example.com",
        "a@example.com",
    ]


async def test_an_address_holds_a_bounded_number_of_links(store: Backend) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock, login_links_per_address=2, login_link_cooldown=0.0)
    for _ in range(4):
        await login.request("a@example.com", "10.0.0.1", LINK_BASE)
        clock.advance(1)
    assert len(mailer.sent) == 2  # the bound: nothing more while both work
    assert await login.verify(token_of(mailer.sent[0][1])) == "a@example.com"  # one is used
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    assert len(mailer.sent) == 3  # so one more may come
    clock.advance(898)  # the second has expired (the first was used); the third has not
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    assert len(mailer.sent) == 4  # one freed slot: one more
    assert await login.verify(token_of(mailer.sent[-1][1])) == "a@example.com"


async def test_sub_addresses_of_one_mailbox_share_the_per_address_limits(store: Backend) -> None:
    """``a+1@…``, ``A+2@…``, ``a@…`` land in one inbox (and on Gmail ``a.b@googlemail.com`` is
    ``ab@gmail.com``): the cool-down and the links held count per mailbox, whoever asks. Each
    mail goes to the address as typed, and its link signs in that exact address."""
    clock = ManualClock()
    login, mailer = links(store, clock, login_links_per_address=2, login_link_cooldown=60.0)
    await login.request("a+1@example.com", "10.0.0.1", LINK_BASE)
    await login.request("A+2@Example.com", "10.0.0.2", LINK_BASE)  # the same inbox: cool-down
    await login.request("a@example.com", "10.0.0.3", LINK_BASE)
    assert [email for email, _ in mailer.sent] == ["a+1@example.com"]
    clock.advance(61)
    await login.request("a+2@example.com", "10.0.0.2", LINK_BASE)
    clock.advance(61)
    await login.request("a+3@example.com", "10.0.0.3", LINK_BASE)  # two links held: refused
    await login.request("a@example.com", "10.0.0.4", LINK_BASE)
    assert [email for email, _ in mailer.sent] == ["a+1@example.com", "a+2@example.com"]
    await login.request("b+1@example.com", "10.0.0.5", LINK_BASE)  # another mailbox: its own
    assert len(mailer.sent) == 3
    # each link signs in the address it was sent to, not the mailbox
    assert await login.verify(token_of(mailer.sent[1][1])) == "a+2@example.com"
    await login.request("a@example.com", "10.0.0.4", LINK_BASE)  # a slot is free again
    assert mailer.sent[-1][0] == "a@example.com"
    assert await login.verify(token_of(mailer.sent[-1][1])) == "a@example.com"
    # Gmail: dots and googlemail.com are the same mailbox too
    clock.advance(61)
    await login.request("v.ic.tim+x@googlemail.com", "10.0.0.6", LINK_BASE)
    await login.request("victim@gmail.com", "10.0.0.7", LINK_BASE)
    assert [email for email, _ in mailer.sent[4:]] == ["v.ic.tim+x@googlemail.com"]


async def test_rate_limit_per_ip(store: Backend) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock, limit=3)
    for i in range(5):
        await login.request(f"u{i}@example.com", "10.9.9.9", LINK_BASE)  # a new email each time
    assert [email for email, _ in mailer.sent] == [f"u{i}@example.com" for i in range(3)]
    await login.request("u9@example.com", "10.9.9.10", LINK_BASE)  # other IPs unaffected
    assert len(mailer.sent) == 4
    clock.advance(60 + 1)
    await login.request("u5@example.com", "10.9.9.9", LINK_BASE)
    assert len(mailer.sent) == 5


async def test_rate_limited_tokens_are_not_created(store: Backend) -> None:
    login, mailer = links(store, ManualClock(), limit=1)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    assert len(mailer.sent) == 1


async def test_only_the_token_hash_is_stored(store: Backend, tmp_path: Path) -> None:
    login, mailer = links(store, ManualClock())
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    token = token_of(mailer.sent[0][1]).encode()
    for path in tmp_path.iterdir():
        assert token not in path.read_bytes(), path.name
    if isinstance(store, PostgresStore):  # every text the database holds for sign-in
        rows = await store._run(
            "t",
            lambda c: c.fetch(
                "SELECT token_hash, email FROM login_tokens UNION ALL SELECT bucket, '' FROM hits"
            ),
        )
        assert rows and all(token.decode() not in "".join(map(str, r.values())) for r in rows)


# --- nobody takes a user's link away or locks them out; a global cap on emails


async def test_asking_for_an_address_from_many_ips_never_takes_its_link_away(
    store: Backend,
) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock, 5, login_emails_per_minute=1000)
    await login.request("victim@example.com", "192.0.2.7", LINK_BASE)  # the victim's own
    [(_, link)] = mailer.sent
    for _ in range(10):  # then an attacker asks for the victim's address from many networks
        for i in range(10):
            await login.request("victim@example.com", f"10.{i}.0.1", LINK_BASE)
        clock.advance(61)
    assert len(mailer.sent) == 3  # LOGIN_LINKS_PER_ADDRESS: the attacker's mails stop there
    assert await login.redeem(token_of(link)) == Redeemed("ok", "victim@example.com")
    # a used link frees its slot: the victim gets a link again when asking
    await login.request("victim@example.com", "192.0.2.7", LINK_BASE)
    assert len(mailer.sent) == 4
    for _, later in mailer.sent[1:]:
        assert await login.redeem(token_of(later)) == Redeemed("ok", "victim@example.com")


async def test_the_victims_inbox_gets_a_bounded_number_of_mails_an_hour(store: Backend) -> None:
    """Asking for one address every 4 s from three IPs for three hours: at most
    LOGIN_LINKS_PER_ADDRESS mails per LOGIN_TOKEN_TTL (12 an hour with the defaults)."""
    clock = ManualClock()
    login, mailer = links(store, clock)
    times: list[float] = []
    for i in range(3 * 3600 // 4):
        await login.request("victim@example.com", f"203.0.113.{i % 3 + 1}", LINK_BASE)
        times += [clock.time()] * (len(mailer.sent) - len(times))
        clock.advance(4.05)
    assert times
    most = max(sum(1 for t in times if at <= t < at + 3600) for at in times)
    assert most <= 3 * 4, most
    assert len(times) >= 3 * 3 * 4 - 3  # and the links kept coming: nobody was locked out


async def test_on_a_shared_ip_the_lockout_lasts_at_most_a_minute(store: Backend) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock, limit=5)
    for i in range(50):  # someone behind the victim's NAT, for addresses of their own
        await login.request(f"u{i}@example.com", "192.0.2.7", LINK_BASE)
    assert len(mailer.sent) == 5
    clock.advance(30)
    await login.request("victim@example.com", "192.0.2.7", LINK_BASE)
    assert len(mailer.sent) == 5  # locked out...
    clock.advance(31)  # ...until a minute after the attacker stopped
    await login.request("victim@example.com", "192.0.2.7", LINK_BASE)
    assert mailer.sent[-1][0] == "victim@example.com"


async def test_the_global_cap_bounds_emails_whatever_the_ips_and_addresses(
    store: Backend,
) -> None:
    """Rotating X-Forwarded-For (a new client IP each time) and addresses: the per-IP and
    per-address limits never trigger, the global cap does."""
    clock = ManualClock()
    login, mailer = links(store, clock, 5, login_emails_per_minute=7)
    for i in range(40):
        await login.request(f"u{i}@example.com", f"198.{i}.100.1", LINK_BASE)
    assert len(mailer.sent) == 7
    clock.advance(61)
    for i in range(40, 80):
        await login.request(f"u{i}@example.com", f"198.{i}.100.1", LINK_BASE)
    assert len(mailer.sent) == 14


async def test_the_second_half_of_the_budget_serves_networks_without_a_link(
    store: Backend,
) -> None:
    clock = ManualClock()
    login, mailer = links(store, clock, 100, login_emails_per_minute=10)

    async def ask(email: str, ip: str) -> bool:
        before = len(mailer.sent)
        await login.request(email, ip, LINK_BASE)
        return len(mailer.sent) > before

    # One /24 (many IPs in it) takes the first half, and no more.
    assert [await ask(f"a{i}@example.com", f"198.51.100.{i}") for i in range(8)] == [True] * 5 + [
        False
    ] * 3
    # Each new network still gets one link; a second one from it waits.
    assert await ask("b1@example.com", "203.0.113.1")
    assert not await ask("b2@example.com", "203.0.113.2")  # the same /24
    assert await ask("c@example.com", "192.0.2.1")
    for i in range(3):
        assert await ask(f"d{i}@example.com", f"2001:db8:{i}::1")  # an IPv6 /64 each
    assert not await ask("e@example.com", "2001:db8:9::1")  # the cap: 10 in the minute
    clock.advance(61)
    assert await ask("e@example.com", "198.51.100.200")  # a new minute


@pytest.mark.parametrize(
    ("ip", "client", "network"),
    [
        ("192.0.2.7", "192.0.2.7", "192.0.2.0/24"),
        ("::ffff:192.0.2.7", "192.0.2.7", "192.0.2.0/24"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64", "fe80::/64"),
        ("", "", ""),
        ("not-an-ip", "not-an-ip", "not-an-ip"),
    ],
)
def test_clients_and_networks(ip: str, client: str, network: str) -> None:
    assert client_key(ip) == client
    assert sender_network(ip) == network


async def test_an_ipv6_client_is_limited_per_64(store: Backend) -> None:
    login, mailer = links(store, ManualClock(), limit=3)
    for i in range(6):  # one host rotating through its /64
        await login.request(f"u{i}@example.com", f"2001:db8:5:6::{i + 1:x}", LINK_BASE)
    assert len(mailer.sent) == 3


async def test_a_mail_that_failed_holds_no_cooldown(store: Backend) -> None:
    clock = ManualClock()
    settings = make_settings(smtp_host="127.0.0.1", smtp_port=closed_port())
    down = LoginLinks(settings, store, SMTPMailer(settings), clock=clock)
    with pytest.raises(MailError):
        await down.request("a@example.com", "10.0.0.1", LINK_BASE)
    login, mailer = links(store, clock)  # the mail server is back; the user tries again
    await login.request("a@example.com", "10.0.0.1", LINK_BASE)
    assert len(mailer.sent) == 1
    assert await login.verify(token_of(mailer.sent[0][1])) == "a@example.com"


async def test_xff_rotation_through_the_gate_is_capped(tmp_path: Path) -> None:
    """The same through the real gate: a trusted (loopback) peer rotating X-Forwarded-For."""
    env = {"LOGIN_EMAILS_PER_MINUTE": "4", "LOGIN_RATE_LIMIT": "100"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        async with client.get(stack.url("/_gate/login"), headers={"Accept": "text/html"}) as r:
            form = form_fields(await r.text(), "/_gate/login")
        for i in range(12):
            headers = {"Accept": "text/html", "X-Forwarded-For": f"203.0.{i}.113"}
            data = {**form, "email": f"x{i}@example.com"}
            async with client.post(stack.url("/_gate/login"), data=data, headers=headers) as r:
                assert r.status == 200  # the same answer whether or not a link was sent
        mailer = stack.services.mailer
        assert isinstance(mailer, LogMailer)
        assert len(mailer.sent) == 4


# --- the limits hold across workers and replicas: two stores on one database (two gate
# processes on one SQLite file, or two replicas on one PostgreSQL), requests at once


@pytest.fixture(params=BACKENDS)
async def two_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Backend, Backend]]:
    url = backend_url(request, request.param, tmp_path)
    async with opened(new_store(url)) as a, opened(new_store(url)) as b:
        yield a, b


def replicas_of(
    stores: tuple[Backend, Backend], clock: ManualClock, **overrides: float
) -> tuple[list[LoginLinks], LogMailer]:
    """A :class:`LoginLinks` on each store, sharing one recording mailer."""
    mailer = LogMailer()
    settings = make_settings(**overrides)
    return [LoginLinks(settings, s, mailer, clock=clock) for s in stores], mailer


async def test_one_address_asked_at_once_on_two_replicas_gets_one_mail(
    two_stores: tuple[Backend, Backend],
) -> None:
    clock = ManualClock()
    replicas, mailer = replicas_of(two_stores, clock, login_emails_per_minute=1000)
    for round_ in range(3):
        await asyncio.gather(
            *(
                replicas[i % 2].request("victim@example.com", f"10.{round_}.{i}.1", LINK_BASE)
                for i in range(20)
            )
        )
        assert len(mailer.sent) == round_ + 1  # one per cool-down, never a burst
        clock.advance(61)
    # the bound of live links holds too
    replicas, mailer = replicas_of(two_stores, clock, login_link_cooldown=0.0)
    await asyncio.gather(
        *(replicas[i % 2].request("other@example.com", f"10.9.{i}.1", LINK_BASE) for i in range(20))
    )
    assert len(mailer.sent) == 3


async def test_the_global_cap_holds_across_replicas(two_stores: tuple[Backend, Backend]) -> None:
    clock = ManualClock()
    replicas, mailer = replicas_of(two_stores, clock, login_emails_per_minute=10)
    await asyncio.gather(
        *(replicas[i % 2].request(f"u{i}@example.com", f"10.{i}.0.1", LINK_BASE) for i in range(40))
    )
    assert len(mailer.sent) == 10


# --- denial of service on sign-in, through the real gate (real HTTP, the recording mailer, the
# gate's clock moved instead of waiting)

VICTIM = "victim@example.com"
VICTIM_IP = "192.0.2.10"
#: attackers in ten networks (a /24 each)
ATTACKER_NETWORKS = tuple(f"198.51.{100 + i}.7" for i in range(10))
HTML = {"Accept": "text/html"}


def title_of(page: str) -> str:
    match = re.search(r"<h1[^>]*>([^<]*)</h1>", page)
    assert match, page
    return match.group(1)


class Inbox:
    """What the recording mailer sent, with the gate's time of each mail."""

    def __init__(self, stack: Stack, clock: ManualClock) -> None:
        mailer = stack.services.mailer
        assert isinstance(mailer, LogMailer)
        self.mailer, self.clock = mailer, clock
        self.times: list[float] = []

    def stamp(self) -> None:
        """Record the time of the mails sent since the last call."""
        self.times += [self.clock.time()] * (len(self.mailer.sent) - len(self.times))

    def to(self, email: str) -> list[str]:
        return [link for address, link in self.mailer.sent if address == email]

    def most_in_a_minute(self) -> int:
        return max(
            (sum(1 for t in self.times if at - 60 <= t <= at) for at in self.times), default=0
        )


async def ask_for_link(
    stack: Stack, client: aiohttp.ClientSession, form: dict[str, str], email: str, ip: str
) -> None:
    """POST the sign-in form for ``email`` as the client ``ip`` (X-Forwarded-For from the
    trusted loopback peer); the answer is the same page whatever happened."""
    async with client.post(
        stack.url("/_gate/login"),
        data={**form, "email": email},
        headers={**HTML, "X-Forwarded-For": ip},
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert title_of(await resp.text()) == "Check your inbox"


async def login_form(stack: Stack, client: aiohttp.ClientSession) -> dict[str, str]:
    async with client.get(stack.url("/_gate/login?next=/api/search"), headers=HTML) as resp:
        return form_fields(await resp.text(), "/_gate/login")


async def signs_in(stack: Stack, link: str) -> bool:
    """Whether ``link``, opened in a new browser, signs the victim in (and the app answers)."""
    async with stack.session() as device:
        resp = await follow_link(stack, device, link)
        if resp.status != 303 or SESSION_COOKIE not in resp.cookies:
            return False
        return await status_of(device, stack.url("/api/search?q=x")) == 200


async def test_attackers_filling_the_global_cap_never_stop_the_victims_link(
    tmp_path: Path,
) -> None:
    """Ten networks ask for links to new addresses as fast as LOGIN_RATE_LIMIT lets them (5 a
    minute each: 50 a minute, the cap is 30), minute after minute: the victim, from another
    network, gets a link every time and it signs in; the global cap still holds."""
    clock = ManualClock()
    cap = 30
    env = {"LOGIN_EMAILS_PER_MINUTE": str(cap), "LOGIN_RATE_LIMIT": "5"}
    async with running_stack(tmp_path, env, clock=clock) as stack:
        async with stack.session() as browser:
            assert (await stack.subscribe(browser, VICTIM)).status == 303
        inbox = Inbox(stack, clock)
        async with stack.session() as attacker:
            form = await login_form(stack, attacker)
            for minute in range(5):
                before = len(inbox.mailer.sent)
                for step in range(5):
                    for n, ip in enumerate(ATTACKER_NETWORKS):
                        await ask_for_link(
                            stack, attacker, form, f"m{minute}s{step}n{n}@bots.example", ip
                        )
                        inbox.stamp()
                        clock.advance(1.25)  # each IP every 12.5 s: never over its limit
                taken = len(inbox.mailer.sent) - before
                assert taken >= cap // 2, f"minute {minute}: the attackers got only {taken} links"
                async with stack.session() as victim:
                    await ask_for_link(
                        stack, victim, await login_form(stack, victim), VICTIM, VICTIM_IP
                    )
                    inbox.stamp()
                assert len(inbox.to(VICTIM)) == minute + 1, (
                    f"minute {minute}: no link for the victim"
                )
                assert await signs_in(stack, inbox.to(VICTIM)[-1])
                clock.advance(10)
        assert inbox.most_in_a_minute() <= cap


async def test_asking_for_the_victims_address_never_breaks_the_victims_link(
    tmp_path: Path,
) -> None:
    """The victim asks for a link; then, every 4 s for 14 minutes, an attacker asks for the
    victim's address from three IPs in turn (at most 5 a minute each: within LOGIN_RATE_LIMIT).
    The victim's link still signs in, and the victim's inbox got a few mails, not hundreds."""
    clock = ManualClock()
    async with running_stack(tmp_path, {"LOGIN_RATE_LIMIT": "5"}, clock=clock) as stack:
        async with stack.session() as browser:
            assert (await stack.subscribe(browser, VICTIM)).status == 303
        inbox = Inbox(stack, clock)
        async with stack.session() as victim:
            await ask_for_link(stack, victim, await login_form(stack, victim), VICTIM, VICTIM_IP)
        [first] = inbox.to(VICTIM)
        async with stack.session() as attacker:
            form = await login_form(stack, attacker)
            for i in range(14 * 60 // 4):
                clock.advance(4.05)  # each IP every 12.15 s: 4 or 5 in any minute
                ip = f"203.0.113.{i % 3 + 1}"
                await ask_for_link(stack, attacker, form, VICTIM, ip)
        assert await signs_in(stack, first)  # the victim's link was never replaced
        mails = inbox.to(VICTIM)
        assert len(mails) <= 3, f"{len(mails)} mails in 14 minutes"
        # every link the victim got works, once
        for link in mails[1:]:
            assert await signs_in(stack, link)
            assert not await signs_in(stack, link)


async def test_plus_tags_never_flood_the_victims_inbox(tmp_path: Path) -> None:
    """The red team's attack: every 4 s for 14 minutes, from three IPs in turn (within
    LOGIN_RATE_LIMIT), a sign-in link for ``victim+{i}@example.com`` — a new address each time,
    one inbox. The inbox gets at most LOGIN_LINKS_PER_ADDRESS (3) mails, as THREAT_MODEL's
    "Email bombing" row promises, and every ask gets the same page (``ask_for_link``)."""
    clock = ManualClock()
    async with running_stack(tmp_path, {"LOGIN_RATE_LIMIT": "5"}, clock=clock) as stack:
        inbox = Inbox(stack, clock)
        async with stack.session() as attacker:
            form = await login_form(stack, attacker)
            for i in range(14 * 60 // 4):
                clock.advance(4.05)
                await ask_for_link(
                    stack, attacker, form, f"victim+{i}@example.com", f"203.0.113.{i % 3 + 1}"
                )
        mails = [
            (address, link) for address, link in inbox.mailer.sent if mailbox_key(address) == VICTIM
        ]
        assert 1 <= len(mails) <= 3, f"{len(mails)} sign-in mails in the victim's inbox"
        # each went to the address as typed, and its link signs in that address
        for address, link in mails:
            assert address.startswith("victim+")
            assert await stack.services.login.peek(token_of(link)) == address
