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
            # the store failing is not the user's fault: 503, come back later
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


# -------------------------------------------------------------------- framing, favicon, links

HTML = {"Accept": "text/html"}
FAVICON = '<link rel="icon" type="image/svg+xml" href="/_gate/static/favicon.svg">'


async def test_every_gate_page_refuses_framing_and_links_a_favicon(tmp_path: Path) -> None:
    """Clickjacking of Continue / Subscribe / Manage billing: no gate page may be framed. And
    every page names its icon, so browsers do not ask the app for /favicon.ico."""
    async with running_stack(tmp_path) as stack, stack.session() as client:
        pages = [
            ("GET", "/_gate/subscribe?next=/app", {}),
            ("GET", "/_gate/subscribe?signed_out=1", {}),
            ("GET", "/_gate/login", {}),
            ("GET", "/_gate/login/verify?token=abc", {}),
            ("GET", "/_gate/nonexistent", {}),  # 404
            ("GET", "/_gate/success?session_id=nope", {}),  # 400 error page
            ("POST", "/_gate/login", {}),  # 403 form expired
            ("GET", "/_gate/login", {"Host": "evil.example"}),  # 400 bad host
        ]
        seen = 0
        for method, path, headers in pages:
            async with client.request(
                method, stack.url(path), headers={**HTML, **headers}, allow_redirects=False
            ) as resp:
                assert resp.content_type == "text/html", path
                assert resp.headers["X-Frame-Options"] == "DENY", path
                assert resp.headers["Content-Security-Policy"] == "frame-ancestors 'none'", path
                assert FAVICON in await resp.text(), path
                seen += 1
        # signed in: the account page, and the landing of a payer
        customer_id = str(stack.double.create_customer("pay@example.com")["id"])
        stack.double.create_subscription(customer_id, "price_demo_monthly")
        await stack.sign_in(client, customer_id, "pay@example.com")
        for path in ("/_gate/account", "/_gate/subscribe"):
            async with client.get(stack.url(path), headers=HTML) as resp:
                assert resp.status == 200
                assert resp.headers["X-Frame-Options"] == "DENY", path
                assert resp.headers["Content-Security-Policy"] == "frame-ancestors 'none'", path
                assert FAVICON in await resp.text(), path
                seen += 1
        assert seen == len(pages) + 2
        async with client.get(stack.url("/_gate/static/favicon.svg")) as resp:
            assert resp.status == 200 and resp.content_type == "image/svg+xml"
            assert (await resp.text()).startswith("<svg")


async def test_gate_404_page_is_styled(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        async with client.get(stack.url("/_gate/no/such/page"), headers=HTML) as resp:
            assert resp.status == 404
            page = await resp.text()
        assert '<link rel="stylesheet" href="/_gate/static/gate.css">' in page
        assert '<main class="card">' in page and "404 Not Found" in page
        async with client.get(stack.url("/_gate/static/gate.css")) as resp:
            assert resp.status == 200 and resp.content_type == "text/css"
        # a missing static file, or the static folder itself, is the same styled page
        for path in ("/_gate/static/nope.css", "/_gate/static/", "/_gate/static/..%2fapp.py"):
            async with client.get(stack.url(path), headers=HTML) as resp:
                assert resp.status == 404, path
                page = await resp.text()
            assert '<main class="card">' in page and "404 Not Found" in page, path
        async with client.get(stack.url("/_gate/static/nope.css")) as resp:
            assert resp.status == 404
            assert await resp.json() == {"error": "not_found", "message": "There is nothing here."}


async def test_try_again_links_carry_only_validated_next(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        stack.double.faults.fail_always(500)
        url = stack.url("/_gate/subscribe?next=%2F%2Fevil.example%2F")
        async with client.get(url, headers=HTML) as resp:
            assert resp.status == 503
            page = await resp.text()
        assert 'id="retry" href="/_gate/subscribe?next=/"' in page
        assert "evil" not in page
        async with client.get(url, headers={"Accept": "application/json"}) as resp:
            body = await resp.json()
        assert body["retry_url"] == "/_gate/subscribe?next=/"
