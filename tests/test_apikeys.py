"""API keys against real servers (the demo upstream, the Stripe double, the gate): the
attacker's requests first — made-up and mistyped keys answered without the store, one answer
for every bad key, a key sent twice or in another header, a key of another customer, a key in
the URL, a key on the gate's own pages — then the owner's: create (account page with its CSRF
token, and the CLI), use, roll with an overlap, revoke, expiry on the gate's clock, the
customer cancelling, a feature-gated path, the rate limit; and no log line ever holds a key.
"""

import asyncio
import hmac
import json
import logging
import re
import subprocess
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.apikeys import format as key_format
from gateway.apikeys.format import KEY_PATTERN, checksum, new_key
from gateway.apikeys.keys import ApiKeys
from gateway.model import ManualClock
from gateway.settings import SESSION_COOKIE
from gateway.store import Backend
from tests.conftest import run_gate_once
from tests.stack import (
    Stack,
    echoed_headers,
    form_fields,
    running_stack,
    subscribed,
)

pytestmark = pytest.mark.timeout(120)

JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html"}
ECHO = "/api/echo"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **JSON}


def keys_of(stack: Stack) -> ApiKeys:
    keys = stack.services.apikeys
    assert keys is not None
    return keys


class StoreCalls:
    """Counts every statement the gate's store runs (reads and writes), by wrapping the
    backend's own entry points on the running gate."""

    def __init__(self, store: Backend) -> None:
        self.count = 0
        for name in ("_select", "_returning", "_execute", "_transaction"):
            original = getattr(store, name)
            setattr(store, name, self._counting(original))

    def _counting(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await original(*args, **kwargs)

        return counted


async def get(
    client: aiohttp.ClientSession, url: str, headers: Any = None
) -> tuple[int, dict[str, Any] | str, aiohttp.ClientResponse]:
    async with client.get(url, headers=headers, allow_redirects=False) as resp:
        text = await resp.text()
        try:
            body: dict[str, Any] | str = json.loads(text)
        except ValueError:
            body = text
        return resp.status, body, resp


async def paying_key(
    stack: Stack, client: aiohttp.ClientSession, email: str, name: str = "ci"
) -> tuple[str, str]:
    """A paying customer (the browser journey) and a key of theirs: (customer id, key)."""
    customer_id = await subscribed(stack, client, email)
    key, _ = await keys_of(stack).create(customer_id, name)
    return customer_id, key


def mistyped(key: str) -> str:
    """``key`` with one character of its random part changed (its checksum no longer fits)."""
    i = 12
    swap = "A" if key[i] != "A" else "B"
    return key[:i] + swap + key[i + 1 :]


# ------------------------------------------------------------------------------- the attacker


async def test_made_up_and_mistyped_keys_are_refused_without_the_store(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        _, key = await paying_key(stack, client, "owner@example.com")
        calls = StoreCalls(stack.services.store)
        made_up = [
            mistyped(key),
            key[:-1],  # too short
            key + "0",  # too long
            "gk_test_" + "0" * 36,  # a checksum that does not fit
            new_key(live=True),  # another mode's key (this gate runs a test Stripe key)
            key.replace("gk_test_", "gk_live_"),
            "gk_test_" + "!" * 36,
            "gk_" + "x" * 200,
        ]
        # brute force: a few hundred random guesses with a made-up checksum
        made_up += [new_key(live=False)[:-6] + "zzzzzz" for _ in range(300)]
        answers = set()
        for guess in made_up:
            async with aiohttp.ClientSession() as fresh:
                status, body, _ = await get(fresh, stack.url(ECHO), bearer(guess))
            answers.add((status, json.dumps(body, sort_keys=True)))
        assert calls.count == 0, "a made-up key reached the store"
        assert len(answers) == 1, answers
        status, body = answers.pop()
        assert status == 401
        assert json.loads(body)["error"] == "invalid_api_key"


async def test_unknown_expired_and_revoked_keys_get_the_same_answer(tmp_path: Path) -> None:
    clock = ManualClock()
    async with running_stack(tmp_path, clock=clock) as stack, stack.session() as client:
        customer_id, good = await paying_key(stack, client, "same@example.com")
        keys = keys_of(stack)
        revoked, row = await keys.create(customer_id, "gone")
        await keys.revoke(row.id)
        expiring, _ = await keys.create(customer_id, "short", timedelta(hours=1))
        body_ = "gk_test_" + "a" * 30
        unknown = body_ + checksum(body_)  # well formed, in no store
        clock.advance(3601)
        answers = set()
        for key in (unknown, revoked, expiring):
            status, body, _ = await get(client, stack.url(ECHO), bearer(key))
            answers.add((status, json.dumps(body, sort_keys=True)))
        assert len(answers) == 1, answers
        assert answers.pop()[0] == 401
        status, _, _ = await get(client, stack.url(ECHO), bearer(good))
        assert status == 200


async def test_the_key_is_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with running_stack(tmp_path) as stack, stack.session() as client:
        _, key = await paying_key(stack, client, "ct@example.com")
        compared.clear()
        status, _, _ = await get(client, stack.url(ECHO), bearer(key))
        assert status == 200
        digest = key_format.key_hash(key).encode()
        assert (digest, digest) in compared  # the stored SHA-256 against the key's


async def test_a_key_sent_twice_or_in_another_header_is_no_identity(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        _, key_a = await paying_key(stack, client, "a@example.com")
        async with stack.session() as other:
            _, key_b = await paying_key(stack, other, "b@example.com")
        async with aiohttp.ClientSession() as fresh:
            twice = CIMultiDict([("Authorization", f"Bearer {key_a}"), ("Accept", "a/json")])
            twice.add("Authorization", f"Bearer {key_b}")
            status, body, _ = await get(fresh, stack.url(ECHO), twice)
            assert (status, body["error"]) == (401, "invalid_api_key")  # type: ignore[index]
            basic_then_key = CIMultiDict([("Authorization", "Basic dXNlcjpwdw==")])
            basic_then_key.add("Authorization", f"Bearer {key_b}")
            status, body, _ = await get(fresh, stack.url(ECHO), basic_then_key)
            assert (status, body["error"]) == (401, "invalid_api_key")  # type: ignore[index]
            # not the configured header (API_KEY_HEADER=Authorization): nobody
            status, body, _ = await get(fresh, stack.url(ECHO), {"X-Api-Key": key_a, **JSON})
            assert (status, body["error"]) == (401, "login_required")  # type: ignore[index]


async def test_a_key_decides_alone_and_acts_as_its_own_customer(tmp_path: Path) -> None:
    """A paying user's cookie beside an unpaid customer's key: the key's customer decides
    (402), never the cookie's; and the upstream is told the key's customer."""
    async with running_stack(tmp_path) as stack, stack.session() as payer:
        payer_id, payer_key = await paying_key(stack, payer, "payer@example.com")
        cookie = next(m.value for m in payer.cookie_jar if m.key == SESSION_COOKIE)
        unpaid_key, _ = await keys_of(stack).create("cus_unpaid", "x")
        async with aiohttp.ClientSession() as fresh:
            headers = {"Cookie": f"{SESSION_COOKIE}={cookie}", **bearer(unpaid_key)}
            status, body, _ = await get(fresh, stack.url(ECHO), headers)
            assert status == 402, body
            status, body, _ = await get(fresh, stack.url(ECHO), bearer(payer_key))
            assert status == 200
            seen = echoed_headers(body)  # type: ignore[arg-type]
            assert seen["x-gate-user"] == [payer_id]


async def test_another_customers_key_cannot_be_revoked_or_rolled(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as alice:
        _, alice_key = await paying_key(stack, alice, "alice@example.com")
        (alice_row,) = await keys_of(stack).of_customer(
            next(iter(await stack.services.store.customer_ids_for_email("alice@example.com")))
        )
        async with stack.session() as mallory:
            await subscribed(stack, mallory, "mallory@example.com")
            page = await account_page(stack, mallory)
            form = form_fields(page, "/_gate/api-keys/revoke") if "api-keys/revoke" in page else {}
            form = form or dict(form_fields(page, "/_gate/api-keys"))
            for action, extra in (("revoke", {}), ("roll", {"overlap": "now"})):
                data = {"csrf": form["csrf"], "key": alice_row.id, **extra}
                async with mallory.post(
                    stack.url(f"/_gate/api-keys/{action}"), data=data, allow_redirects=False
                ) as resp:
                    assert resp.status == 404, await resp.text()
        status, _, _ = await get(alice, stack.url(ECHO), bearer(alice_key))
        assert status == 200


async def test_a_key_in_the_url_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        _, key = await paying_key(stack, client, "url@example.com")
        for query in (f"?api_key={key}", f"?q=x&token={key}&y=1"):
            status, body, _ = await get(client, stack.url(ECHO + query), JSON)
            assert status == 400
            assert body["error"] == "api_key_in_url"  # type: ignore[index]
            assert "never in the URL" in body["message"]  # type: ignore[index]
            # with the key in the header too
            status, _, _ = await get(client, stack.url(ECHO + query), bearer(key))
            assert status == 400


async def test_a_key_never_opens_the_gates_own_pages(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        _, key = await paying_key(stack, client, "pages@example.com")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as fresh:
            status, _, resp = await get(fresh, stack.url("/_gate/account"), bearer(key))
            assert status == 303 and "/_gate/login" in resp.headers["Location"]
            status, body, _ = await get(fresh, stack.url("/_gate/api/me"), bearer(key))
            assert status == 200 and not body.get("customer_id"), body  # type: ignore[union-attr]
            for action in ("portal", "checkout", "api-keys", "logout/everywhere"):
                async with fresh.post(
                    stack.url(f"/_gate/{action}"), data={"name": "x"}, headers=bearer(key)
                ) as resp:
                    assert resp.status in (303, 403), (action, resp.status)
                    assert SESSION_COOKIE not in resp.headers.get("Set-Cookie", "")


async def test_never_a_redirect_nor_a_cookie_for_a_key(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        key, _ = await keys_of(stack).create("cus_nopay", "x")
        async with aiohttp.ClientSession() as fresh:
            headers = {"Authorization": f"Bearer {key}", **HTML}
            status, body, resp = await get(fresh, stack.url("/"), headers)
            assert status == 402 and body["error"] == "subscription_required"  # type: ignore[index]
            assert "Set-Cookie" not in resp.headers
            status, body, resp = await get(fresh, stack.url("/"), {"Authorization": "Bearer gk_x"})
            assert status == 401 and "Set-Cookie" not in resp.headers


# ------------------------------------------------------------------------------- the owner


async def account_page(stack: Stack, client: aiohttp.ClientSession) -> str:
    async with client.get(stack.url("/_gate/account"), headers=HTML) as resp:
        assert resp.status == 200, resp.status
        return await resp.text()


def shown_key(page: str) -> str:
    match = re.search(r'id="api-key-value">([^<]+)<', page)
    assert match, page
    return match.group(1)


async def create_on_page(
    stack: Stack, client: aiohttp.ClientSession, name: str, expires: str = "90"
) -> str:
    form = form_fields(await account_page(stack, client), "/_gate/api-keys")
    data = {**form, "name": name, "expires": expires}
    async with client.post(stack.url("/_gate/api-keys"), data=data, headers=HTML) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        return shown_key(await resp.text())


async def test_create_on_the_account_page_use_and_revoke(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_stack(tmp_path) as stack, stack.session() as client:
        customer_id = await subscribed(stack, client, "page@example.com")
        # without the form's CSRF token: refused
        async with client.post(stack.url("/_gate/api-keys"), data={"name": "x"}) as resp:
            assert resp.status == 403
        key = await create_on_page(stack, client, "notebook")
        assert KEY_PATTERN.fullmatch(key) and key.startswith("gk_test_")
        page = await account_page(stack, client)
        assert key not in page and key[:12] in page and "notebook" in page
        async with aiohttp.ClientSession() as script:
            status, body, _ = await get(script, stack.url(ECHO), bearer(key))
            assert status == 200
            seen = echoed_headers(body)  # type: ignore[arg-type]
            assert seen["x-gate-user"] == [customer_id]
            (row,) = await keys_of(stack).of_customer(customer_id)
            assert seen["x-gate-key"] == [row.id]
            assert "authorization" not in seen  # the key never reaches the app
            assert all(key not in v for vs in seen.values() for v in vs)
            form = form_fields(page, "/_gate/api-keys/revoke")
            async with client.post(
                stack.url("/_gate/api-keys/revoke"), data=form, allow_redirects=False
            ) as resp:
                assert resp.status == 303
            status, body, _ = await get(script, stack.url(ECHO), bearer(key))
            assert (status, body["error"]) == (401, "invalid_api_key")  # type: ignore[index]
        assert key not in caplog.text
        assert not KEY_PATTERN.search(caplog.text)


async def test_the_app_that_uses_authorization_itself_keeps_it(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        await subscribed(stack, client, "basic@example.com")
        headers = {"Authorization": "Basic dXNlcjpwdw==", **JSON}
        status, body, _ = await get(client, stack.url(ECHO), headers)
        assert status == 200
        assert echoed_headers(body)["authorization"] == ["Basic dXNlcjpwdw=="]  # type: ignore[arg-type]


async def test_roll_with_an_overlap_then_only_the_new_key(tmp_path: Path) -> None:
    clock = ManualClock()
    async with running_stack(tmp_path, clock=clock) as stack, stack.session() as client:
        await subscribed(stack, client, "roll@example.com")
        old = await create_on_page(stack, client, "job")
        form = form_fields(await account_page(stack, client), "/_gate/api-keys/roll")
        async with client.post(
            stack.url("/_gate/api-keys/roll"), data={**form, "overlap": "1h"}, headers=HTML
        ) as resp:
            assert resp.status == 200, await resp.text()
            new = shown_key(await resp.text())
        assert new != old
        for key in (old, new):
            status, _, _ = await get(client, stack.url(ECHO), bearer(key))
            assert status == 200, key[:12]
        clock.advance(3601)
        status, _, _ = await get(client, stack.url(ECHO), bearer(old))
        assert status == 401
        status, _, _ = await get(client, stack.url(ECHO), bearer(new))
        assert status == 200


async def test_an_expired_key_is_refused_on_the_gates_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    async with running_stack(tmp_path, clock=clock) as stack, stack.session() as client:
        await subscribed(stack, client, "expiry@example.com")
        key = await create_on_page(stack, client, "month", expires="30")
        status, _, _ = await get(client, stack.url(ECHO), bearer(key))
        assert status == 200
        clock.advance(timedelta(days=30, seconds=1))
        status, body, _ = await get(client, stack.url(ECHO), bearer(key))
        assert (status, body["error"]) == (401, "invalid_api_key")  # type: ignore[index]


async def test_a_customer_who_cancels_gets_402_with_a_key(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        customer_id, key = await paying_key(stack, client, "cancel@example.com")
        status, _, _ = await get(client, stack.url(ECHO), bearer(key))
        assert status == 200
        (sub,) = stack.double.customer_subscriptions(customer_id)
        await stack.double.cancel_subscription(sub["id"])  # the webhook reaches the gate
        status, body, _ = await get(client, stack.url(ECHO), bearer(key))
        assert (status, body["error"]) == (402, "subscription_required")  # type: ignore[index]


async def test_a_feature_gated_path_with_a_key(tmp_path: Path) -> None:
    env = {"FEATURE_RULES": "/api/pro/*=pro_only", "PRICE_FEATURES": "price_demo_yearly=pro_only"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        _, key = await paying_key(stack, client, "tier@example.com")  # the monthly plan
        status, _, _ = await get(client, stack.url(ECHO), bearer(key))
        assert status == 200
        headers = {"Authorization": f"Bearer {key}", **HTML}  # even as a browser would ask
        status, body, _ = await get(client, stack.url("/api/pro/run"), headers)
        assert (status, body["error"]) == (402, "feature_required")  # type: ignore[index]


async def test_the_per_key_rate_limit(tmp_path: Path) -> None:
    clock = ManualClock()
    env = {"API_KEY_RATE": "2/s", "API_KEY_BURST": "3"}
    async with running_stack(tmp_path, env, clock=clock) as stack, stack.session() as client:
        _, key = await paying_key(stack, client, "rate@example.com")
        statuses = [(await get(client, stack.url(ECHO), bearer(key)))[0] for _ in range(3)]
        assert statuses == [200, 200, 200]
        status, body, resp = await get(client, stack.url(ECHO), bearer(key))
        assert (status, body["error"]) == (429, "rate_limited")  # type: ignore[index]
        assert int(resp.headers["Retry-After"]) >= 1
        clock.advance(1)
        assert (await get(client, stack.url(ECHO), bearer(key)))[0] == 200


def cli_env(stack: Stack) -> dict[str, str]:
    return {**stack.process_env(), "ALLOWED_HOSTS": "127.0.0.1:*", "LOG_LEVEL": "debug"}


async def gateway_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_gate_once, ["gateway", *args], env)


async def test_the_cli_creates_lists_and_revokes(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        customer_id = await subscribed(stack, client, "cli@example.com")
        env = cli_env(stack)
        made = await gateway_cli(
            env,
            "keys",
            "create",
            "cli@example.com",
            "--name",
            "nightly",
            "--expires",
            "90d",
            "--json",
        )
        assert made.returncode == 0, made.stderr
        created = json.loads(made.stdout)
        assert set(created) >= {"id", "key", "customer", "expires"}
        assert created["customer"] == customer_id and created["expires"]
        key = created["key"]
        assert key not in made.stderr  # not in its log lines
        status, body, _ = await get(client, stack.url(ECHO), bearer(key))
        assert status == 200
        assert echoed_headers(body)["x-gate-key"] == [created["id"]]  # type: ignore[arg-type]
        listed = await gateway_cli(env, "keys", "list", customer_id, "--json")
        assert listed.returncode == 0, listed.stderr
        (shown,) = json.loads(listed.stdout)
        assert shown["id"] == created["id"] and key not in listed.stdout
        revoked = await gateway_cli(env, "keys", "revoke", created["id"])
        assert revoked.returncode == 0, revoked.stderr
        # another process revoked it: this gate refuses it within 1 s (its cache bound)
        deadline = asyncio.get_running_loop().time() + 30
        while (await get(client, stack.url(ECHO), bearer(key)))[0] == 200:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
        assert (await get(client, stack.url(ECHO), bearer(key)))[0] == 401
        for out in (made, listed, revoked):
            assert key not in out.stderr


async def test_the_cli_refuses_a_bad_expiry_in_one_line(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        done = await gateway_cli(
            cli_env(stack), "keys", "create", "cus_x", "--name", "n", "--expires", "soon"
        )
        assert done.returncode == 2
        assert done.stderr.strip().count("\n") == 0 and "--expires" in done.stderr


async def test_max_api_keys_per_customer(tmp_path: Path) -> None:
    env = {"MAX_API_KEYS_PER_CUSTOMER": "2"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        await subscribed(stack, client, "max@example.com")
        await create_on_page(stack, client, "one")
        await create_on_page(stack, client, "two")
        page = await account_page(stack, client)
        assert "as many API keys as allowed" in page
        form = form_fields(page, "/_gate/api-keys/revoke")
        async with client.post(
            stack.url("/_gate/api-keys"), data={"csrf": form["csrf"], "name": "three"}
        ) as resp:
            assert resp.status == 409


async def test_revocation_closes_a_socket_opened_with_the_key(tmp_path: Path) -> None:
    """Revocation is announced like a sign-out: the watch closes the customer's WebSocket
    opened with the key at once (no periodic re-check here)."""
    env = {"WS_RECHECK_INTERVAL": "1h"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        customer_id, key = await paying_key(stack, client, "ws@example.com")
        (row,) = await keys_of(stack).of_customer(customer_id)
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as script,
            script.ws_connect(stack.url("/ws"), headers={"Authorization": f"Bearer {key}"}) as ws,
        ):
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=30) == "hello"
            await keys_of(stack).revoke(row.id)
            msg = await ws.receive(timeout=30)
            assert msg.type is aiohttp.WSMsgType.CLOSE, msg
            assert msg.data == 4401


@pytest.mark.parametrize("live", [True, False])
def test_the_key_format(live: bool) -> None:
    key = new_key(live)
    assert KEY_PATTERN.fullmatch(key) and len(key) == key_format.KEY_LENGTH == 44
    assert key.startswith("gk_live_" if live else "gk_test_")
    assert key[-6:] == checksum(key[:-6])
    assert key_format.well_formed(key, live)
    assert not key_format.well_formed(key, not live)  # the other mode's
    assert not key_format.well_formed(mistyped(key), live)
    assert key_format.key_start(key) == key[:12]
    assert key_format.key_hash(key) != key_format.key_hash(mistyped(key))
    assert checksum("") == "000000"  # zero-padded to 6 characters
