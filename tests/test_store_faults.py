"""Store failures on the gate's pages, through the real stack, on both backends: the store is
made read-only inside the database (SQLite: ``PRAGMA query_only`` on the writer connection;
PostgreSQL: ``default_transaction_read_only``), so every write fails exactly where a full disk
or a read-only volume makes it fail, and surfaces through the store's real error path as
``StoreError``."""

from pathlib import Path

import aiohttp

from tests.stack import Stack, form_fields, running_stack
from tests.stores import set_read_only

JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html"}


async def break_writes(stack: Stack) -> None:
    await set_read_only(stack.services.store, True)


async def test_paying_user_gets_in_although_the_store_cannot_write(
    tmp_path: Path, database_env: dict[str, str]
) -> None:
    """Stripe confirms the payment but no session can be stored (sessions are server-side
    rows, so that signing out revokes them): the user is told exactly how to finish (503 +
    Retry-After, a Try again link to the same /success), and that link signs them in once
    writes work."""
    async with running_stack(tmp_path, database_env) as stack, stack.session() as client:
        await break_writes(stack)
        assert not await stack.services.store.check_writable()
        resp = await stack.subscribe(client, "alice@example.com", "/api/echo")
        assert resp.status == 503, await resp.text()
        assert resp.headers["Retry-After"].isdigit()
        body = await resp.json()
        assert body["error"] == "store_unavailable"
        retry = body["retry_url"]
        assert retry.startswith("/_gate/success?session_id=")
        await set_read_only(stack.services.store, False)  # the disk has room again
        async with client.get(stack.url(retry), allow_redirects=False) as resp:
            assert resp.status == 303, await resp.text()
            assert resp.headers["Location"] == "/api/echo"
        async with client.get(stack.url("/api/echo"), headers=JSON) as resp:
            assert resp.status == 200


async def test_sign_in_while_the_store_cannot_write_is_503_with_retry_after(
    tmp_path: Path, database_env: dict[str, str]
) -> None:
    async with running_stack(tmp_path, database_env) as stack, stack.session() as client:
        page = await client.get(stack.url("/_gate/login"), headers=HTML)
        await page.read()
        await break_writes(stack)
        for accept in (JSON, HTML):
            resp = await post_login(stack, client, accept)
            assert resp.status == 503
            assert resp.headers["Retry-After"].isdigit()
            body = await resp.text()
            assert "Traceback" not in body
            if accept is JSON:
                assert (await resp.json())["error"] == "store_unavailable"
            else:
                assert "try again" in body.lower()


async def post_login(
    stack: Stack, client: aiohttp.ClientSession, accept: dict[str, str]
) -> aiohttp.ClientResponse:
    async with client.get(stack.url("/_gate/login"), headers=HTML) as resp:
        form = form_fields(await resp.text(), "/_gate/login")
    form["email"] = "alice@example.com"
    resp = await client.post(
        stack.url("/_gate/login"), data=form, headers=accept, allow_redirects=False
    )
    await resp.read()
    return resp
