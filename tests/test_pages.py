"""Gate pages fail gracefully: an unexpected failure behind a page (here the store going away)
is a friendly page for browsers and JSON for APIs, with no traceback shown."""

from pathlib import Path

from tests.stack import form_fields, running_stack


async def test_store_failure_on_a_page_is_a_friendly_503(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        async with client.get(stack.url("/_gate/login"), headers={"Accept": "text/html"}) as r:
            form = form_fields(await r.text(), "/_gate/login")
        await stack.services.store.close()  # every store call now fails
        form["email"] = "zoe@example.com"
        async with client.post(
            stack.url("/_gate/login"), data=form, headers={"Accept": "text/html"}
        ) as resp:
            body = await resp.text()
            # issue 7 item 8: the store failing is not the user's fault: 503, come back later
            assert resp.status == 503
            assert resp.headers["Retry-After"].isdigit()
            assert "Temporarily unavailable" in body
            assert "Traceback" not in body and "Error" not in body.replace("error-", "")
        async with client.get(
            stack.url("/_gate/api/me"), headers={"Accept": "application/json"}
        ) as resp:
            # api/me for an anonymous user needs no store: still answers
            assert resp.status == 200


async def test_page_errors_have_the_one_json_shape(tmp_path: Path) -> None:
    """A form without its CSRF token: 403, a page for browsers, the JSON error for the rest."""
    async with running_stack(tmp_path) as stack, stack.session() as client:
        url = stack.url("/_gate/login")
        data = {"email": "zoe@example.com"}
        async with client.post(url, data=data, headers={"Accept": "application/json"}) as resp:
            assert resp.status == 403
            assert resp.headers["Cache-Control"] == "no-store"
            assert await resp.json() == {
                "error": "form_expired",
                "message": "Please go back, reload the page and try again.",
                "retry_url": "/_gate/subscribe",
            }
        async with client.post(url, data=data, headers={"Accept": "text/html"}) as resp:
            assert resp.status == 403 and resp.content_type == "text/html"
            page = await resp.text()
            assert "This form has expired" in page and 'href="/_gate/subscribe"' in page
