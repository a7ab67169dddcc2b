"""Webhook delivery of the Stripe test double: events POSTed to every webhook URL, signed with
the SDK's own signer as Stripe signs them (``Stripe-Signature``, real time: the receiver checks
a 300 s tolerance against its own clock).

The hosted pages and the double's async methods deliver before they return
(:meth:`WebhookSender.deliver`); API calls answer first and deliver in a tracked background
task, as Stripe does (:meth:`WebhookSender.deliver_later`; :meth:`WebhookSender.wait` waits for
those). Each delivery's status (0: no answer) is appended to the owner's ``deliveries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import stripe
from aiohttp import web

if TYPE_CHECKING:
    from gateway.demo.stripe_double.state import DoubleState

__all__ = ["WEBHOOK_TIMEOUT", "WebhookSender"]

WEBHOOK_TIMEOUT = aiohttp.ClientTimeout(total=10)


class WebhookSender:
    """The webhook deliveries of one double (see the module docstring): to its
    ``webhook_urls`` while ``deliver_webhooks``, signed with its ``webhook_secret``, read at
    every delivery (tests change them)."""

    def __init__(self, owner: DoubleState) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def deliver(self, events: list[dict[str, Any]]) -> None:
        """POST each event to every webhook URL, in order; results go to ``deliveries``."""
        if not self.owner.deliver_webhooks:
            return
        for evt in events:
            for url in list(self.owner.webhook_urls):
                self.owner.deliveries.append((evt["id"], await self._post_event(url, evt)))

    def deliver_later(self, events: list[dict[str, Any]]) -> None:
        """Deliver in a tracked background task (API calls answer before their webhooks)."""
        if not events or not self.owner.deliver_webhooks or not self.owner.webhook_urls:
            return
        task = asyncio.get_running_loop().create_task(self.deliver(events))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Wait until the background deliveries are done."""
        while self._tasks:
            await asyncio.gather(*self._tasks)

    def sign(self, payload: str, timestamp: int | None = None) -> str:
        """A ``Stripe-Signature`` header for ``payload`` (real time by default)."""
        ts = int(time.time()) if timestamp is None else timestamp
        return str(
            stripe.WebhookSignature.generate_signature_header(
                payload, self.owner.webhook_secret, timestamp=ts
            )
        )

    async def client_session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """The app's ``cleanup_ctx``: one client session for its deliveries; at the end, the
        background deliveries are waited for, then the session closed."""
        self._session = aiohttp.ClientSession(timeout=WEBHOOK_TIMEOUT)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await self.wait()
            await self._session.close()
            self._session = None

    async def _post_event(self, url: str, evt: dict[str, Any]) -> int:
        payload = json.dumps(evt)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": self.sign(payload),
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
        try:
            if self._session is None or self._session.closed:
                async with aiohttp.ClientSession(timeout=WEBHOOK_TIMEOUT) as session:
                    return await self._post(session, url, payload, headers)
            return await self._post(self._session, url, payload, headers)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return 0

    @staticmethod
    async def _post(
        session: aiohttp.ClientSession, url: str, payload: str, headers: dict[str, str]
    ) -> int:
        async with session.post(url, data=payload.encode(), headers=headers) as resp:
            await resp.read()
            return resp.status
