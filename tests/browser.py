"""Headless-Chromium helpers for the browser tests (Playwright's async API).

``async with open_browser(stack, name) as gb:`` launches Debian's Chromium (the browser
Playwright would download cannot be fetched on these machines) in the test's own event loop,
next to the servers of :func:`tests.stack.running_stack`. If the body raises, every open page
is saved (screenshot + HTML) under ``test-artifacts/<name>/`` before the browser closes, and
the error propagates: a missing Chromium fails the test, it never skips it.
"""

import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
#: Screenshots of the journeys that passed, to look at (:func:`screenshot`).
SHOTS = ARTIFACTS / "browser"
CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # No network on these machines: no background fetches, updates or QUIC probes.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
#: Every wait (auto-wait, navigation, ``expect``) gives up after this many milliseconds.
TIMEOUT_MS = 10_000


class GateBrowser:
    """One Chromium for one test; each :meth:`new_page` is a fresh device (own cookies)."""

    def __init__(self, browser: Browser, stack: Stack, name: str) -> None:
        self.browser = browser
        self.stack = stack
        self.name = name
        self.contexts: list[BrowserContext] = []

    async def new_page(self) -> Page:
        context = await self.browser.new_context(
            base_url=self.stack.base, viewport={"width": 1000, "height": 800}
        )
        context.set_default_timeout(TIMEOUT_MS)
        context.set_default_navigation_timeout(TIMEOUT_MS)
        self.contexts.append(context)
        return await context.new_page()

    async def save_artifacts(self, directory: Path | None = None) -> list[Path]:
        """Screenshot and HTML of every open page (a page that cannot be saved is skipped)."""
        directory = directory or ARTIFACTS / self.name
        directory.mkdir(parents=True, exist_ok=True)
        saved: list[Path] = []
        for c, context in enumerate(self.contexts):
            for p, page in enumerate(context.pages):
                stem = directory / f"context{c}-page{p}-{page_label(page.url)}"
                with suppress(Exception):
                    await page.screenshot(path=f"{stem}.png", full_page=True, timeout=5_000)
                    saved.append(Path(f"{stem}.png"))
                with suppress(Exception):
                    html = await page.content()
                    Path(f"{stem}.html").write_text(f"<!-- {page.url} -->\n{html}")
                    saved.append(Path(f"{stem}.html"))
        return saved


def page_label(url: str) -> str:
    """``app`` for the app's root page, else the path as a slug (``_gate-account``)."""
    path = urlsplit(url).path.strip("/")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", path)[:60] or "app"


def artifact_name(nodeid_name: str) -> str:
    """A directory name for a test (``test_x[param]`` → ``test_x-param``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", nodeid_name).strip("-")


@asynccontextmanager
async def open_browser(stack: Stack, name: str) -> AsyncIterator[GateBrowser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000
        )
        gb = GateBrowser(browser, stack, artifact_name(name))
        shutil.rmtree(ARTIFACTS / gb.name, ignore_errors=True)  # only this run's failure
        try:
            yield gb
        except BaseException:
            with suppress(Exception):  # never hide the test's own error
                await gb.save_artifacts()
            raise
        finally:
            # Before the stack stops: open pages hold a WebSocket through the gate.
            await browser.close()


async def screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    """``page`` as ``<name>.png`` under :data:`SHOTS` (the whole page unless not
    ``full_page``); the file."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=full_page)
    return path
