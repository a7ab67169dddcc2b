"""Badge injection: the pure rewrite, and the proxy doing it only where it should."""

import gzip
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.inject import MAX_INJECT_BYTES, badge_tag, inject, should_inject
from tests.stack import running_stack

TAG = badge_tag("/_gate")


def headers(**items: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in items.items()}))


def test_inject_before_the_last_body_close() -> None:
    page = b"<html><body><p>x</p><!-- </body> in a comment --></BODY ></html>"
    out = inject(page, TAG)
    assert out == page.replace(b"</BODY >", TAG + b"</BODY >")
    assert out.count(TAG) == 1


@pytest.mark.parametrize("head", [b"<head>", b"<HEAD>", b'<head lang="en">', b"<head\n  data-x=1>"])
def test_inject_first_in_head_before_the_apps_scripts(head: bytes) -> None:
    page = b"<!doctype html><html>" + head + b"<script>app()</script></head><body>x</body>"
    out = inject(page, TAG)
    assert out == page.replace(head, head + TAG)
    assert out.index(TAG) < out.index(b"<script>app()")
    assert inject(b"<html><header>nav</header></html>", TAG).endswith(TAG)  # not a <head>


def test_inject_appends_without_body_close() -> None:
    assert inject(b"<p>fragment", TAG) == b"<p>fragment" + TAG


@pytest.mark.parametrize(
    ("status", "hdrs", "expected"),
    [
        (200, {"Content_Type": "text/html; charset=utf-8"}, True),
        (200, {"Content_Type": "text/html", "Content_Length": "1000"}, True),
        (200, {"Content_Type": "text/html", "Content_Length": str(MAX_INJECT_BYTES + 1)}, False),
        (200, {"Content_Type": "text/html", "Content_Encoding": "gzip"}, False),
        (200, {"Content_Type": "application/json"}, False),
        (404, {"Content_Type": "text/html"}, False),
        (200, {}, False),
    ],
)
def test_should_inject(status: int, hdrs: dict[str, str], expected: bool) -> None:
    assert should_inject(status, headers(**hdrs)) is expected


async def test_paying_user_gets_the_badge_on_html_only(tmp_path: Path) -> None:
    env = {"INJECT_BADGE": "true"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        resp = await stack.subscribe(client, "erin@example.com")
        assert resp.status == 303
        async with client.get(stack.url("/")) as page:
            body = await page.read()
            assert page.status == 200
            assert body.count(TAG) == 1
            assert body.index(b"<head>") < body.index(TAG) < body.index(b"<script>")
            assert int(page.headers["Content-Length"]) == len(body)
        async with client.get(stack.url("/api/search?q=x")) as api:
            assert TAG not in await api.read()
        async with client.get(stack.url("/api/gzip"), auto_decompress=False) as gz:
            raw = await gz.read()
            assert gz.headers["Content-Encoding"] == "gzip"
            assert TAG not in gzip.decompress(raw)
        async with client.get(stack.url("/_gate/static/badge.js")) as js:
            assert js.status == 200
            assert "/api/me" in await js.text()


async def test_no_badge_unless_enabled(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        await stack.subscribe(client, "frank@example.com")
        async with client.get(stack.url("/")) as page:
            assert TAG not in await page.read()
