"""Red team of API keys (issue 20): the attacker's requests against real servers (gate, demo
app, Stripe double on 127.0.0.1)."""

from pathlib import Path

import pytest

from tests.shipped import running_shipped_caddy, running_shipped_nginx, stack_behind
from tests.stack import form_fields, running_stack, subscribed
from tests.test_apikeys import HTML, account_page, create_on_page
from tests.test_apikeys_proxies import ask


async def test_rolling_keys_at_the_limit_is_a_clear_refusal_not_a_500(tmp_path: Path) -> None:
    """At ``MAX_API_KEYS_PER_CUSTOMER``, a roll with an overlap holds one key more (the old
    one, until the overlap ends); rolling again in the overlap is refused with the page that
    says so (409), never a 500 with a traceback, and no key beyond the bound is made."""
    env = {"MAX_API_KEYS_PER_CUSTOMER": "2"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        customer = await subscribed(stack, client, "roller@example.com")
        await create_on_page(stack, client, "one")
        await create_on_page(stack, client, "two")
        statuses = []
        for _ in range(3):
            form = form_fields(await account_page(stack, client), "/_gate/api-keys/roll")
            async with client.post(
                stack.url("/_gate/api-keys/roll"), data={**form, "overlap": "24h"}, headers=HTML
            ) as resp:
                statuses.append(resp.status)
                text = await resp.text()
        assert statuses == [200, 409, 409], text[:2000]
        assert "revoke one" in text
        keys = stack.services.apikeys
        assert keys is not None
        assert len(await keys.of_customer(customer)) == 3


@pytest.mark.parametrize("proxy", ["nginx", "caddy"])
async def test_the_per_key_rate_limit_holds_behind_the_shipped_proxies(
    tmp_path: Path, proxy: str
) -> None:
    """``API_KEY_RATE`` behind forward auth: nginx's auth cache kept a key's allow for up to
    a second and answered every request in it without asking the gate, so the limit let
    through whatever a client sent in that second. With a rate limit a key's allow is never
    cacheable: the gate counts each request (from memory)."""
    env = {"API_KEY_RATE": "1/h", "API_KEY_BURST": "3"}
    runner = {"nginx": running_shipped_nginx, "caddy": running_shipped_caddy}[proxy]
    async with stack_behind(tmp_path, runner, env) as (stack, base), stack.session() as client:
        customer = await subscribed(stack, client, "script@example.com")
        keys = stack.services.apikeys
        assert keys is not None
        key, _ = await keys.create(customer, "job")
        statuses = [(await ask(base, {"Authorization": f"Bearer {key}"}))[0] for _ in range(10)]
        assert statuses.count(200) == 3, statuses
        assert statuses[:3] == [200, 200, 200] and 200 not in statuses[3:], statuses
