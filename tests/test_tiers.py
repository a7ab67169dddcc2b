"""Tiers: paths that need a Stripe Entitlements feature (``FEATURE_RULES``), the
features a price carries without Entitlements (``PRICE_FEATURES``), the ``feature_required``
answers on every surface, ``X-Gate-Features`` upstream, and plan changes opening and closing
the feature paths (WebSockets included).

Real servers throughout (gate, demo upstream, the Stripe double with the demo's features
attached: ``search`` on Basic and Pro, ``analysis`` and ``export`` on Pro only).
"""

import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, WSServerHandshakeError
from yarl import URL

from gateway.features import FeatureRules, parse_price_features
from gateway.settings import SettingsError, load_settings
from tests.shipped import running_shipped_nginx
from tests.stack import Stack, echoed_headers, status_of
from tests.tiers import BASIC, PRO, basic_and_pro, subscriber, tiers_stack

DEADLINE = 10.0
JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html"}


# ------------------------------------------------------------------ the rules table (pure)

RULES = FeatureRules(["/api/stream*=analysis", "/export=export", "/api/*=search"])


@pytest.mark.parametrize(
    ("path", "raw", "feature"),
    [
        ("/api/stream", None, "analysis"),
        ("/api/stream/x", None, "analysis"),  # a prefix: /api/stream* covers /api/streamed too
        ("/api/streamed", None, "analysis"),
        ("/api/search", None, "search"),  # first match wins: /api/stream* does not match
        ("/export", None, "export"),
        ("/export/", None, "export"),  # with or without a trailing slash
        ("/EXPORT", None, "export"),  # case-insensitively
        ("/exports", None, None),  # exact patterns are whole paths
        ("/", None, None),  # unmatched: any access, as without tiers
        ("/apix", None, None),
        # An ambiguous raw path is matched as sent too: an upstream that keeps %2F routes
        # /api/stream/..%2Fx under /api/stream although it normalizes to /api/x.
        ("/other", "/export/..%2F..%2Fother", None),
        ("/x", "/api/stream/..%2F..%2Fx", "analysis"),
        ("/x", "/api/stream/../../x", "analysis"),
    ],
)
def test_feature_rules_table(path: str, raw: str | None, feature: str | None) -> None:
    assert RULES.required(path, raw) == feature
    assert RULES.required(path, raw) == feature  # remembered: the same answer


def test_feature_rules_name_their_features() -> None:
    assert RULES.features == {"analysis", "export", "search"}
    assert not FeatureRules([]) and RULES


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["price_a=x|y", "price_b=z"], {"price_a": {"x", "y"}, "price_b": {"z"}}),
        (["price_a=x", " price_a = y "], {"price_a": {"x", "y"}}),
        ([], {}),
    ],
)
def test_price_features_parse(items: list[str], expected: dict[str, set[str]]) -> None:
    assert parse_price_features(items) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FEATURE_RULES", "/api/*x=analysis"),  # * only at the end
        ("FEATURE_RULES", "api/*=analysis"),  # not a path
        ("FEATURE_RULES", "/api/*"),  # no feature
        ("FEATURE_RULES", "/api/*=has space"),
        ("PRICE_FEATURES", "price_a"),
        ("PRICE_FEATURES", "price_a=x|"),
        ("PRICE_FEATURES", "price a=x"),
    ],
)
def test_bad_syntax_is_one_line_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({name: value, "BILLING_MODE": "off"}, demo=True)
    message = str(info.value)
    assert message.startswith(f"{name} is invalid") and "\n" not in message


# ------------------------------------------------------------------ helpers


async def switch_plan(stack: Stack, sub_id: str, price: str) -> None:
    """What the portal's plan switch does: the subscription's item moves to ``price`` (the
    double delivers the webhooks before it returns)."""
    item = stack.double.get_subscription(sub_id)["items"]["data"][0]
    await stack.double.update_subscription(sub_id, {"items": [{"id": item["id"], "price": price}]})


async def upstream_features(stack: Stack, client: aiohttp.ClientSession) -> list[str]:
    async with client.get(stack.url("/api/echo"), headers=JSON) as resp:
        assert resp.status == 200
        return echoed_headers(await resp.json()).get("x-gate-features", [])


# ------------------------------------------------------------------ the gate


async def test_basic_subscriber_gets_402_on_analysis_and_200_on_search(tmp_path: Path) -> None:
    async with tiers_stack(tmp_path) as stack, stack.session() as client:
        await subscriber(stack, client, "basic@example.com", BASIC)
        # Allowed twice: the second answer is the remembered verdict (the hot path) ...
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        assert len(stack.services.verdicts) == 1
        # ... which does not answer for a path needing a feature it lacks.
        async with client.get(stack.url("/api/stream?n=1&delay=0"), headers=JSON) as resp:
            assert resp.status == 402
            assert resp.headers["Cache-Control"] == "no-store"
            body = await resp.json()
        assert body["error"] == "feature_required"
        assert body["feature"] == "analysis"
        assert "analysis" in body["message"]
        # No Referer: once upgraded, the browser returns to the app's start page, never to
        # the stream it called (that would show raw event-stream text).
        assert body["upgrade_url"] == "/_gate/upgrade?feature=analysis&next=/"
        assert await upstream_features(stack, client) == ["search"]
        async with client.get(stack.url("/_gate/api/me"), headers=JSON) as resp:
            me = await resp.json()
        assert me["features"] == ["search"]
        assert me["feature_names"] == ["Patent search"]  # Stripe's names, for the badge


@pytest.mark.parametrize(
    ("referer", "back"),
    [
        ("{base}/?q=battery", "/%3Fq%3Dbattery"),  # the page that called: back there
        ("{base}/reports/2024", "/reports/2024"),
        ("https://evil.example/?q=x", "/"),  # another site's page: the start page
        ("{base}/_gate/account", "/"),  # a gate page is no page of the app
        ("{base}//evil.example/x", "/"),  # what safe_next refuses
        ("not a url", "/"),
    ],
)
async def test_an_api_refusal_returns_the_browser_to_the_calling_page(
    tmp_path: Path, referer: str, back: str
) -> None:
    async with tiers_stack(tmp_path) as stack, stack.session() as client:
        await subscriber(stack, client, "back@example.com", BASIC)
        headers = {**JSON, "Referer": referer.format(base=stack.base)}
        async with client.get(stack.url("/api/stream?n=1"), headers=headers) as resp:
            assert resp.status == 402
            body = await resp.json()
        assert body["upgrade_url"] == f"/_gate/upgrade?feature=analysis&next={back}"


async def test_browser_is_sent_to_the_upgrade_page_naming_the_plans(tmp_path: Path) -> None:
    async with tiers_stack(tmp_path) as stack, stack.session() as client:
        _, sub_id = await subscriber(stack, client, "page@example.com", BASIC)
        async with client.get(stack.url("/api/stream"), headers=HTML, allow_redirects=False) as r:
            assert r.status == 303
            location = r.headers["Location"]
        assert location == "/_gate/upgrade?feature=analysis&next=/api/stream"
        async with client.get(stack.url(location), headers=HTML) as resp:
            assert resp.status == 200
            page = await resp.text()
        # The feature by Stripe's name for it (entitlements.feature.name), not its lookup key.
        assert "Upgrade to use LLM analysis of claims" in page
        assert "PatentLLM Pro" in page and "PatentLLM Basic" not in page
        # A subscriber switches plan in the portal (one button per plan with the feature),
        # each saying which interval it is.
        assert re.search(
            r'id="switch-price_demo_monthly"[^>]*>Switch to PatentLLM Pro, monthly<', page
        )
        assert re.search(
            r'id="switch-price_demo_yearly"[^>]*>Switch to PatentLLM Pro, yearly<', page
        )
        assert 'name="flow" value="subscription_update"' in page
        assert "/_gate/checkout" not in page
        # The yearly button opens the portal's confirmation of exactly that price for the
        # customer's own subscription item (ids from the gate's lookup and Stripe, never from
        # the form), returning to the feature path when done.
        forms = re.findall(r'<form method="post" action="/_gate/portal">(.*?)</form>', page, re.S)
        yearly = [f for f in forms if "price_demo_yearly" in f]
        assert len(yearly) == 1
        fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', yearly[0]))
        async with client.post(
            stack.url("/_gate/portal"), data=fields, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            portal_id = resp.headers["Location"].rsplit("/", 1)[1]
        flow = stack.double.portal_sessions[portal_id]["flow"]
        item_id = stack.double.get_subscription(sub_id)["items"]["data"][0]["id"]
        assert flow["type"] == "subscription_update_confirm"
        assert flow["subscription_update_confirm"]["subscription"] == sub_id
        assert flow["subscription_update_confirm"]["items"] == [
            {"id": item_id, "price": "price_demo_yearly", "quantity": 1}
        ]
        assert flow["after_completion"]["redirect"]["return_url"] == stack.url("/api/stream")
        # A forged price (not sold) or the current one: the portal's own plan choice instead.
        for price in ("price_forged", BASIC):
            async with client.post(
                stack.url("/_gate/portal"), data={**fields, "price": price}, allow_redirects=False
            ) as resp:
                other_id = resp.headers["Location"].rsplit("/", 1)[1]
            assert stack.double.portal_sessions[other_id]["flow"]["type"] == "subscription_update"
        async with stack.session() as newcomer:
            # No subscription: Checkout for each plan with the feature.
            async with newcomer.get(stack.url(location), headers=HTML) as resp:
                page = await resp.text()
            assert 'id="subscribe-price_demo_monthly"' in page and "/_gate/checkout" in page
            assert "switch-price" not in page
            # An unknown feature is never echoed.
            async with newcomer.get(
                stack.url("/_gate/upgrade?feature=<b>x</b>"), headers=HTML
            ) as r:
                text = await r.text()
            assert "<b>x</b>" not in text and "&lt;b&gt;" not in text
            assert 'id="no-plans"' in text


async def test_upgrade_opens_the_feature_downgrade_closes_it_and_its_socket(
    tmp_path: Path,
) -> None:
    async with tiers_stack(tmp_path) as stack, stack.session() as client:
        customer_id, sub_id = await subscriber(stack, client, "up@example.com", BASIC)
        # Refused before upgrading.
        with pytest.raises(WSServerHandshakeError) as refused:
            async with client.ws_connect(stack.url("/ws")):
                pass
        assert refused.value.status == 402
        assert await status_of(client, stack.url("/api/stream?n=1&delay=0")) == 402

        await switch_plan(stack, sub_id, PRO)  # upgrade in the portal → webhooks
        summary = "entitlements.active_entitlement_summary.updated"
        assert summary in [e["type"] for e in stack.double.events]
        assert await status_of(client, stack.url("/api/stream?n=1&delay=0")) == 200
        assert await upstream_features(stack, client) == ["analysis,export,search"]

        async with client.ws_connect(stack.url("/ws")) as ws:
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=DEADLINE) == "hello"
            await switch_plan(stack, sub_id, BASIC)  # downgrade → webhooks → re-check
            msg = await ws.receive(timeout=DEADLINE)
            assert msg.type is WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (4402, "feature required")
        assert await status_of(client, stack.url("/api/stream?n=1&delay=0")) == 402
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        assert await upstream_features(stack, client) == ["search"]
        stored = await stack.services.store.get_entitlement(customer_id)
        assert stored is not None and stored.features == {"search"}


async def test_canceled_subscriptions_features_do_not_count(tmp_path: Path) -> None:
    async with tiers_stack(tmp_path) as stack, stack.session() as client:
        _, sub_id = await subscriber(stack, client, "gone@example.com", PRO)
        assert await status_of(client, stack.url("/api/stream?n=1&delay=0")) == 200
        await stack.double.cancel_subscription(sub_id)
        async with client.get(stack.url("/api/stream?n=1&delay=0"), headers=JSON) as resp:
            assert resp.status == 402
            assert (await resp.json())["error"] == "subscription_required"


#: Subscriptions the access rules refuse, each beside the customer's Basic one: (the case,
#: the Pro price, how it is subscribed). Stripe's active entitlements are the union over all
#: of a customer's subscriptions, so each of them (but ``incomplete``) gives Pro's features.
REFUSED = ["unsold", "legacy", "pause_collection", "paused", "incomplete"]


async def refused_pro_subscription(stack: Stack, customer_id: str, case: str) -> None:
    """A $1 Pro subscription the rules refuse (see :data:`REFUSED`), seeded on the double."""
    if case in ("unsold", "legacy"):
        # A price (or legacy Plan id) of the Pro product that STRIPE_PRICE_IDS does not sell.
        price = f"plan_pro_{case}" if case == "legacy" else "price_pro_one_dollar"
        stack.double.add_price(
            {"id": price, "unit_amount": 100, "product": "prod_demo", "product_name": "Pro"}
        )
        stack.double.create_subscription(customer_id, price, legacy_plan=case == "legacy")
        return
    status = "active" if case == "pause_collection" else case
    sub = stack.double.create_subscription(customer_id, PRO, status=status)
    if case == "pause_collection":  # payments paused from the portal: status stays active
        sub["pause_collection"] = {"behavior": "void", "resumes_at": None}


@pytest.mark.parametrize("case", REFUSED)
async def test_features_come_only_from_subscriptions_the_rules_accept(
    tmp_path: Path, case: str
) -> None:
    async with tiers_stack(tmp_path) as stack, stack.session() as client:
        customer_id, _ = await subscriber(stack, client, f"{case}@example.com", BASIC)
        await refused_pro_subscription(stack, customer_id, case)
        stripe_says = {
            e["lookup_key"] for e in stack.double.entitlements.active_entitlements(customer_id)
        }
        assert ("analysis" in stripe_says) is (case != "incomplete")  # the attack's premise
        async with client.get(stack.url("/api/stream?n=1&delay=0"), headers=JSON) as resp:
            assert resp.status == 402, case
            assert (await resp.json())["error"] == "feature_required"
        with pytest.raises(WSServerHandshakeError) as refused:
            async with client.ws_connect(stack.url("/ws")):
                pass
        assert refused.value.status == 402
        assert await upstream_features(stack, client) == ["search"]
        async with client.get(stack.url("/_gate/api/me"), headers=JSON) as resp:
            assert (await resp.json())["features"] == ["search"]
        stored = await stack.services.store.get_entitlement(customer_id)
        assert stored is not None and stored.features == {"search"}
        # Forward auth: refused, and the allow of another path is not one nginx may cache for
        # every path (the customer lacks features the rules name).
        for _ in range(2):
            fa = {"X-Original-URI": "/api/stream", **JSON}
            async with client.get(stack.url("/_gate/auth"), headers=fa) as resp:
                assert resp.status == 401
                assert resp.headers["X-Gate-Denial"] == "feature_required"
            fa = {"X-Original-URI": "/api/search"}
            async with client.get(stack.url("/_gate/auth"), headers=fa) as resp:
                assert resp.status == 200
                assert resp.headers["Cache-Control"] == "no-store"


async def test_features_of_every_accepted_subscription_count(tmp_path: Path) -> None:
    """Two sold subscriptions: the features of both; a paused one counts when
    ``PAUSED_ACCESS=true`` lets it in."""
    async with (
        tiers_stack(tmp_path, PAUSED_ACCESS="true") as stack,
        stack.session() as both,
        stack.session() as paused,
    ):
        customer_id, _ = await subscriber(stack, both, "both@example.com", BASIC)
        stack.double.create_subscription(customer_id, PRO)
        assert await status_of(both, stack.url("/api/stream?n=1&delay=0")) == 200
        assert await upstream_features(stack, both) == ["analysis,export,search"]
        customer_id, _ = await subscriber(stack, paused, "paused@example.com", BASIC)
        await refused_pro_subscription(stack, customer_id, "pause_collection")
        assert await status_of(paused, stack.url("/api/stream?n=1&delay=0")) == 200


async def test_price_features_without_stripe_entitlements(tmp_path: Path) -> None:
    env = {"PRICE_FEATURES": f"{PRO}=analysis|export,price_demo_yearly=analysis|export"}
    async with tiers_stack(tmp_path, **env) as stack:
        assert not stack.double.entitlements.product_features  # none attached in Stripe
        async with basic_and_pro(stack) as (basic, pro):
            assert await status_of(basic, stack.url("/api/stream?n=1&delay=0")) == 402
            assert await status_of(pro, stack.url("/api/stream?n=1&delay=0")) == 200
            assert await upstream_features(stack, pro) == ["analysis,export"]
            assert await upstream_features(stack, basic) == []
            # The upgrade page names the plans from PRICE_FEATURES.
            async with basic.get(
                stack.url("/_gate/upgrade?feature=analysis"), headers=HTML
            ) as resp:
                page = await resp.text()
            assert 'id="switch-price_demo_monthly"' in page
            assert 'id="switch-price_demo_yearly"' in page


async def test_clients_cannot_send_x_gate_features(tmp_path: Path) -> None:
    async with tiers_stack(tmp_path) as stack, stack.session() as client:
        await subscriber(stack, client, "forge@example.com", BASIC)
        forged = {**JSON, "X-Gate-Features": "analysis"}
        async with client.get(stack.url("/api/echo"), headers=forged) as resp:
            assert echoed_headers(await resp.json())["x-gate-features"] == ["search"]
        async with client.get(stack.url("/api/stream"), headers=forged) as resp:
            assert resp.status == 402


async def test_forward_auth_gives_the_same_answers(tmp_path: Path) -> None:
    async with tiers_stack(tmp_path) as stack, stack.session() as client:
        await subscriber(stack, client, "fa@example.com", BASIC)
        original = {"X-Original-URI": "/api/stream?n=1", "X-Forwarded-Host": "app.example.com"}
        async with client.get(stack.url("/_gate/auth"), headers={**original, **HTML}) as resp:
            # A navigation: nginx's redirect case, to the upgrade page.
            assert resp.status == 401 and resp.headers["X-Gate-Denial"] == "redirect"
            assert "/_gate/upgrade?feature=analysis" in resp.headers["X-Gate-Location"]
        async with client.get(stack.url("/_gate/auth"), headers={**original, **JSON}) as resp:
            assert resp.status == 401  # nginx-safe default
            assert resp.headers["X-Gate-Denial"] == "feature_required"
            upgrade = resp.headers["X-Gate-Location"]
            body = await resp.json()
        assert upgrade.endswith("/_gate/upgrade?feature=analysis&next=/")
        assert body["error"] == "feature_required" and body["upgrade_url"] == upgrade
        forwarded = {"X-Forwarded-Uri": "/api/stream", "X-Forwarded-Host": "app.example.com"}
        passthrough = stack.url("/_gate/auth?mode=passthrough")
        async with client.get(passthrough, headers={**forwarded, **JSON}) as resp:
            assert resp.status == 402
            assert (await resp.json())["feature"] == "analysis"
        async with client.get(
            passthrough, headers={**forwarded, **HTML}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            assert resp.headers["Location"].endswith(
                "/_gate/upgrade?feature=analysis&next=/api/stream"
            )
        allowed = {"X-Original-URI": "/api/search", "X-Forwarded-Host": "app.example.com"}
        async with client.get(stack.url("/_gate/auth"), headers=allowed) as resp:
            assert resp.status == 200
            assert resp.headers["X-Gate-Features"] == "search"


async def test_behind_the_shipped_nginx_with_its_auth_cache(tmp_path: Path) -> None:
    """nginx caches allow answers keyed on the session cookie alone (not the path): a Basic
    customer's allowed search must not answer for the Pro-only path, so the gate lets an allow
    be cached only for a customer with every feature the rules name."""
    async with tiers_stack(tmp_path, L1_TTL="30s") as stack:
        assert stack.gate_server.port is not None and stack.upstream.port is not None
        async with (
            running_shipped_nginx(stack.gate_server.port, stack.upstream.port) as base,
            stack.session() as basic,
            stack.session() as pro,
        ):
            await subscriber(stack, basic, "nb@example.com", BASIC)
            await subscriber(stack, pro, "np@example.com", PRO)
            for _ in range(3):
                async with basic.get(f"{base}/api/echo", headers=JSON) as resp:
                    assert resp.status == 200
                    assert echoed_headers(await resp.json())["x-gate-features"] == ["search"]
                async with basic.get(f"{base}/api/stream?n=1&delay=0", headers=JSON) as resp:
                    assert resp.status == 402
                    body = await resp.json()
                assert body["error"] == "feature_required"
                assert "/_gate/upgrade?feature=analysis" in body["upgrade_url"]
            async with basic.get(f"{base}/api/stream", headers=HTML, allow_redirects=False) as resp:
                assert resp.status == 303
                assert "/_gate/upgrade?feature=analysis" in resp.headers["Location"]
            async with pro.get(f"{base}/api/stream?n=1&delay=0", headers=JSON) as resp:
                assert resp.status == 200
            # What the gate told nginx: Basic's allow is not cacheable, Pro's is.
            for client, cacheable in ((basic, False), (pro, True)):
                cookie = client.cookie_jar.filter_cookies(URL(stack.base))
                header = "; ".join(f"{k}={v.value}" for k, v in cookie.items())
                fa = {"X-Original-URI": "/api/search", "Cookie": header}
                async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as plain:
                    for _ in range(2):  # the second answer is the remembered verdict
                        async with plain.get(stack.url("/_gate/auth"), headers=fa) as resp:
                            assert resp.status == 200
                            control = resp.headers["Cache-Control"]
                assert control.startswith("max-age=") is cacheable, control
