"""Teams on three gate processes sharing one PostgreSQL: a member removed on one replica is
refused by the others and their open WebSocket there closes (the bound is 1 s; the deadline
here is generous — a wait on a condition, not a timing). ``L1_TTL`` is 300 s: only the
replica bus can make the other replicas forget."""

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from tests.replicas import HTML, Replicas, running_replicas, subscribe, until_all, wait_for_log
from tests.stack import form_fields

pytestmark = pytest.mark.timeout(240)

ENV = {"L1_TTL": "300s", "SEAT_PRICE_IDS": "price_demo_monthly"}
DEADLINE = 5.0


async def _post_form(
    replicas: Replicas, index: int, cookie: str, action: str, **fields: str
) -> aiohttp.ClientResponse:
    gate = replicas.gates[index]
    headers = {"Cookie": cookie, **HTML}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        async with client.get(gate.url("/_gate/account"), headers=headers) as resp:
            assert resp.status == 200, resp.status
            page = await resp.text()
            csrf_cookie = resp.headers.getall("Set-Cookie", [])
        extra = "; ".join(c.split(";", 1)[0] for c in csrf_cookie)
        form = {**form_fields(page, f"/_gate/{action}"), **fields}
        full = {"Cookie": f"{cookie}; {extra}" if extra else cookie, **HTML}
        resp = await client.post(
            gate.url(f"/_gate/{action}"), data=form, headers=full, allow_redirects=False
        )
        await resp.read()
        return resp


async def _join(replicas: Replicas, index: int, link: str) -> str:
    """Open the invitation on replica ``index`` and press Join; the member's Cookie header."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        async with client.get(link, headers=HTML) as resp:
            form = form_fields(await resp.text(), "/_gate/team/join")
        async with client.post(
            replicas.gates[index].url("/_gate/team/join"),
            data=form,
            headers=HTML,
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303, await resp.text()
        value = next(m.value for m in jar if m.key == "gate_session")
        return f"gate_session={value}"


async def test_a_member_removed_on_one_replica_is_out_on_every_replica(
    tmp_path: Path, pg_url: str
) -> None:
    async with running_replicas(tmp_path, pg_url, env=ENV) as replicas:
        owner = await subscribe(replicas.gates[0], "olga@firm.example")
        customer = replicas.customer_of("olga@firm.example")
        (sub,) = replicas.double.customer_subscriptions(customer)
        item = sub["items"]["data"][0]["id"]
        async with (
            aiohttp.ClientSession() as api,
            api.post(
                f"{replicas.double.public_url}/v1/subscriptions/{sub['id']}",
                data={"items[0][id]": item, "items[0][quantity]": "3"},
                headers={"Authorization": f"Bearer {replicas.env['STRIPE_SECRET_KEY']}"},
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
        resp = await _post_form(replicas, 0, owner, "team/invite", email="bob@firm.example")
        assert resp.status == 303 and "team=invited" in resp.headers["Location"], resp.headers
        await wait_for_log(replicas.gates[0], "team invitation for bob@firm.example", DEADLINE)
        found = re.search(
            r"team invitation for bob@firm\.example from \S+: ([^\s\"]+)", replicas.gates[0].log()
        )
        assert found
        bob = await _join(replicas, 0, found.group(1))
        await until_all(replicas, bob, 200, DEADLINE)
        async with aiohttp.ClientSession() as client:
            ws = await client.ws_connect(replicas.gates[1].url("/ws"), headers={"Cookie": bob})
            await ws.send_str("hi")
            assert (await ws.receive(timeout=30)).type == aiohttp.WSMsgType.TEXT
            resp = await _post_form(replicas, 0, owner, "team/remove", email="bob@firm.example")
            assert resp.status == 303 and "team=removed" in resp.headers["Location"]
            took = await until_all(replicas, bob, 401, DEADLINE)
            msg = await ws.receive(timeout=30)
            while msg.type == aiohttp.WSMsgType.TEXT:
                msg = await ws.receive(timeout=30)
            assert 4401 in (msg.data, ws.close_code), (msg, ws.close_code)
            await ws.close()
        print(f"member refused on every replica after {took:.3f}s")
        assert await until_all(replicas, owner, 200, DEADLINE) >= 0
        await asyncio.sleep(0)
