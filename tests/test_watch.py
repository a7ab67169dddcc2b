"""Open WebSockets and streams are re-checked: a canceled or signed-out user's
socket is closed with a clear code, a paying user's stays open, an SSE stream is cut.

Real servers throughout (the gate, the demo upstream's ``/ws`` echo and ``/api/stream``, the
Stripe double). Waiting is a deadline, never a sleep used as an assertion.
"""

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, WSServerHandshakeError, web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.app import PROXY
from gateway.changes import Change
from gateway.demo.upstream import create_upstream_app
from gateway.forwarded import ClientInfo
from gateway.gate import GateVerdict
from gateway.model import Denial, Identity, Pass
from gateway.settings import SESSION_COOKIE
from gateway.watch import Watch, close_for
from tests.conftest import GateFactory, eventually, gate_settings
from tests.stack import Stack, running_stack, status_of

DEADLINE = 10.0
JSON = {"Accept": "application/json"}
#: No periodic re-check within a test: only an announced change can close the socket.
NO_PERIODIC = {"WS_RECHECK_INTERVAL": "1h"}


async def paying(stack: Stack, client: aiohttp.ClientSession, email: str) -> tuple[str, str]:
    """A customer with an active subscription on the double, signed in in ``client``;
    (customer id, subscription id)."""
    customer_id = str(stack.double.create_customer(email)["id"])
    sub = stack.double.create_subscription(customer_id, "price_demo_monthly")
    await stack.sign_in(client, customer_id, email)
    return customer_id, str(sub["id"])


async def echo(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    await ws.send_str(text)
    assert await ws.receive_str(timeout=DEADLINE) == text


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, str]:
    """The close frame the gate sends (waits up to DEADLINE)."""
    msg = await ws.receive(timeout=DEADLINE)
    assert msg.type is WSMsgType.CLOSE, msg
    return int(msg.data), str(msg.extra)


def watch_of(stack: Stack) -> Watch:
    watch = stack.gate_server.app[PROXY].watch
    assert watch is not None
    return watch


# ------------------------------------------------------------------ invalidation: at once


async def test_cancel_closes_the_open_socket_with_4402_at_once(tmp_path: Path) -> None:
    async with running_stack(tmp_path, NO_PERIODIC) as stack, stack.session() as client:
        customer_id, sub_id = await paying(stack, client, "ws@example.com")
        other = stack.session()
        other_id, _ = await paying(stack, other, "other@example.com")
        async with (
            other,
            client.ws_connect(stack.url("/ws")) as ws,
            other.ws_connect(stack.url("/ws")) as ws_other,
        ):
            await echo(ws, "before")
            await echo(ws_other, "before")
            assert watch_of(stack).count(customer_id) == 1
            await stack.double.cancel_subscription(sub_id)  # the webhook is delivered
            assert await closed_with(ws) == (4402, "subscription required")
            assert await status_of(client, stack.url("/api/search?q=x")) == 402
            # The reload lands on the gate's page, which says why.
            async with client.get(stack.url("/"), headers={"Accept": "text/html"}) as page:
                assert page.url.path == "/_gate/subscribe"
                assert "Your subscription has ended" in await page.text()
            # Another user's socket is untouched.
            await echo(ws_other, "after")
            assert watch_of(stack).count(other_id) == 1
        await eventually(lambda: len(watch_of(stack)) == 0, "sockets to leave the watch")


async def test_change_announcement_finds_l1_and_verdicts_already_dropped(tmp_path: Path) -> None:
    """The re-check must not be answered by what was remembered before the change."""
    async with running_stack(tmp_path, NO_PERIODIC) as stack, stack.session() as client:
        customer_id, sub_id = await paying(stack, client, "order@example.com")
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        ents = stack.services.entitlements
        identity = Identity("order@example.com", customer_id, "cookie")
        value = client.cookie_jar.filter_cookies(URL(stack.base))[SESSION_COOKIE].value
        cookie = f"{SESSION_COOKIE}={value}"  # the Cookie header the client sends
        verdicts = stack.services.verdicts
        assert verdicts.remembered(cookie) is not None
        assert ents.lookup_cached(identity) is not None
        seen: list[tuple[bool, bool]] = []

        def listener(change: Change) -> None:
            if change == Change("customer", customer_id):
                seen.append(
                    (verdicts.remembered(cookie) is None, ents.lookup_cached(identity) is None)
                )

        stop = stack.services.changes.listen(listener)
        try:
            await stack.double.cancel_subscription(sub_id)
        finally:
            stop()
        assert seen and all(s == (True, True) for s in seen)


async def test_session_change_rechecks_that_users_sockets(tmp_path: Path) -> None:
    """A revoked session is announced as Change("session", id, user): that user's sockets are
    re-checked at once (server-side sessions decide the answer; announced directly here)."""
    async with running_stack(tmp_path, NO_PERIODIC) as stack, stack.session() as client:
        customer_id, _ = await paying(stack, client, "sess@example.com")
        async with client.ws_connect(stack.url("/ws")) as ws:
            await echo(ws, "x")
            watch = watch_of(stack)
            before = watch.rechecks
            stack.services.changes.session("sess_1", user=customer_id)
            await eventually(lambda: watch.rechecks > before, "the re-check")
            await echo(ws, "still paying")  # the session is still valid: stays open
            stack.services.changes.everyone()
            await eventually(lambda: watch.rechecks > before + 1, "the re-check of everyone")
            await echo(ws, "still")


# ------------------------------------------------------------------ periodic


async def test_paying_users_socket_stays_open_across_rechecks(tmp_path: Path) -> None:
    env = {"WS_RECHECK_INTERVAL": "50ms", "L1_TTL": "0"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        await paying(stack, client, "stay@example.com")
        async with client.ws_connect(stack.url("/ws")) as ws:
            await echo(ws, "a")
            watch = watch_of(stack)
            await eventually(lambda: watch.rechecks >= 5, "five periodic re-checks")
            await echo(ws, "b")
            assert watch.ended == 0 and not ws.closed


async def test_cancel_without_webhook_is_closed_by_the_periodic_recheck(tmp_path: Path) -> None:
    env = {"WS_RECHECK_INTERVAL": "100ms", "L1_TTL": "0", "CACHE_TTL": "1s"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        stack.double.deliver_webhooks = False
        _, sub_id = await paying(stack, client, "lost@example.com")
        async with client.ws_connect(stack.url("/ws")) as ws:
            await echo(ws, "a")
            await stack.double.cancel_subscription(sub_id)
            assert not stack.double.deliveries
            # Closed once CACHE_TTL lets the gate re-read Stripe (no announcement came).
            assert await closed_with(ws) == (4402, "subscription required")


# ------------------------------------------------------------------ SSE / streams


async def test_sse_stream_is_cut_when_the_subscription_ends(tmp_path: Path) -> None:
    async with running_stack(tmp_path, NO_PERIODIC) as stack, stack.session() as client:
        customer_id, sub_id = await paying(stack, client, "sse@example.com")
        url = stack.url("/api/stream?n=100000&delay=0.02")
        async with client.get(url, headers={"Accept": "text/event-stream"}) as resp:
            assert resp.status == 200
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), DEADLINE)
            assert first.startswith(b"id: 0")
            assert watch_of(stack).count(customer_id) == 1
            await stack.double.cancel_subscription(sub_id)
            rest = b""
            with pytest.raises(aiohttp.ClientPayloadError):  # truncated: never "complete"
                async with asyncio.timeout(DEADLINE):
                    while chunk := await resp.content.readany():
                        rest += chunk
            assert b"event: done" not in rest
        await eventually(lambda: watch_of(stack).count(customer_id) == 0, "stream unwatched")
        async with client.get(url, headers={"Accept": "text/event-stream"}) as resp:
            assert resp.status == 402  # EventSource's reconnect is refused


async def test_without_a_gate_nothing_is_watched(
    echo_upstream: TestServer, gate: GateFactory
) -> None:
    client = await gate(gate_settings(echo_upstream))  # billing off, no gate hook
    assert client.app[PROXY].watch is None
    async with client.ws_connect("/ws") as ws:
        await echo(ws, "open as before")


async def test_short_responses_are_not_watched(tmp_path: Path) -> None:
    async with running_stack(tmp_path, NO_PERIODIC) as stack, stack.session() as client:
        await paying(stack, client, "short@example.com")
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        assert watch_of(stack).rechecks == 0 and len(watch_of(stack)) == 0


# ------------------------------------------------------------------ the gate's answer


class FlipGate:
    """A gate hook that allows as user ``u1`` until told to deny."""

    def __init__(self) -> None:
        self.verdict: GateVerdict = Pass({"X-Gate-User": "u1"})
        self.calls = 0

    async def __call__(self, request: web.Request, client: ClientInfo) -> GateVerdict:
        self.calls += 1
        return self.verdict


@pytest.fixture
async def echo_upstream() -> Any:
    server = TestServer(create_upstream_app(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.mark.parametrize(
    ("denial", "expected"),
    [
        (Denial("unauthorized", 401, "login_required"), (4401, "login required")),
        (Denial("payment_required", 402, "subscription_required"), (4402, "subscription required")),
        (Denial("redirect", 303, "login_required", "/_gate/subscribe"), (4401, "login required")),
    ],
    ids=["signed-out", "subscription", "navigation-denial"],
)
async def test_denied_recheck_closes_both_sides(
    echo_upstream: TestServer, gate: GateFactory, denial: Denial, expected: tuple[int, str]
) -> None:
    hook = FlipGate()
    client = await gate(gate_settings(echo_upstream, ws_recheck_interval=0.05), gate=hook)
    async with client.ws_connect("/ws") as ws:
        await echo(ws, "a")
        hook.verdict = denial
        assert await closed_with(ws) == expected
    assert close_for(denial) == expected


async def test_billing_unavailable_keeps_the_socket_open(
    echo_upstream: TestServer, gate: GateFactory
) -> None:
    hook = FlipGate()
    client = await gate(gate_settings(echo_upstream, ws_recheck_interval=0.05), gate=hook)
    async with client.ws_connect("/ws") as ws:
        await echo(ws, "a")
        hook.verdict = Denial("unavailable", 503, "billing_unavailable", retry_after=30)
        calls = hook.calls
        await eventually(lambda: hook.calls >= calls + 5, "re-checks while Stripe is down")
        await echo(ws, "still connected")
    assert close_for(Denial("unavailable", 503, "billing_unavailable")) is None


async def test_a_failing_recheck_keeps_the_socket(
    echo_upstream: TestServer, gate: GateFactory, caplog: pytest.LogCaptureFixture
) -> None:
    hook = FlipGate()
    failing = {"on": False}

    async def flaky(request: web.Request, client_info: ClientInfo) -> GateVerdict:
        if failing["on"]:
            hook.calls += 1
            raise RuntimeError("store exploded")
        return await hook(request, client_info)

    client = await gate(gate_settings(echo_upstream, ws_recheck_interval=0.05), gate=flaky)
    async with client.ws_connect("/ws") as ws:
        await echo(ws, "a")
        calls = hook.calls
        failing["on"] = True
        await eventually(lambda: hook.calls >= calls + 2, "failing re-checks")
        await echo(ws, "kept")
    assert any("recheck_failed" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ WebSocket caps


async def test_websockets_per_user_are_capped(tmp_path: Path) -> None:
    env = {**NO_PERIODIC, "MAX_WEBSOCKETS_PER_USER": "2"}
    async with running_stack(tmp_path, env) as stack, stack.session() as alice:
        await paying(stack, alice, "cap@example.com")
        async with stack.session() as bob:
            await paying(stack, bob, "cap2@example.com")
            first = await alice.ws_connect(stack.url("/ws"))
            second = await alice.ws_connect(stack.url("/ws"))
            with pytest.raises(WSServerHandshakeError) as refused:
                await alice.ws_connect(stack.url("/ws"))
            assert refused.value.status == 503
            async with bob.ws_connect(stack.url("/ws")) as ws_bob:
                await echo(ws_bob, "bob gets in")
            await first.close()
            third: list[aiohttp.ClientWebSocketResponse] = []

            async def connects() -> bool:
                try:
                    third.append(await alice.ws_connect(stack.url("/ws")))
                except WSServerHandshakeError as exc:
                    assert exc.status == 503
                    return False
                return True

            await eventually(connects, "a freed slot")
            await echo(third[0], "in again")
            await third[0].close()
            await second.close()


# ------------------------------------------------------------------ shutdown


async def test_no_watch_tasks_left_after_shutdown(tmp_path: Path) -> None:
    env = {"WS_RECHECK_INTERVAL": "50ms"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        async with running_stack(tmp_path, env) as stack:
            await paying(stack, client, "bye@example.com")
            ws = await client.ws_connect(stack.url("/ws"))
            await echo(ws, "a")
            watch = watch_of(stack)
            names = {t.get_name() for t in asyncio.all_tasks()}
            assert {"watch-changes", "watch-periodic"} <= names
        # The gate is gone (with the socket open): its watch tasks went with it.
        left = [t for t in asyncio.all_tasks() if t.get_name().startswith("watch-")]
        assert left == []
        assert len(watch) == 0
        assert (await ws.receive(timeout=DEADLINE)).type is WSMsgType.CLOSE
