"""The Stripe test double's own controls, for the demo and browser tests: ``/_double/...``
moves the clock, sets a subscription's status, injects faults, adds or drops webhook
endpoints and shows the whole state as JSON; ``GET /`` is an index page with those controls
(no JavaScript: plain forms that come back to it)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.demo.common import favicon_handler
from gateway.demo.stripe_double import objects
from gateway.demo.stripe_double.form import ApiError
from gateway.demo.stripe_double.handlers import DoubleHandlers
from gateway.demo.stripe_double.markup import day, esc, local_redirect, page, when

__all__ = ["Controls"]


class Controls(DoubleHandlers):
    """Routes and handlers of the ``/_double`` controls and the index page."""

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.index),
            web.get("/favicon.ico", favicon_handler("S", "#635bff")),
            web.post("/_double/advance", self.helper_advance),
            web.post("/_double/subscriptions/{id}/status", self.helper_status),
            web.post("/_double/faults", self.helper_faults),
            web.post("/_double/webhooks", self.helper_webhooks),
            web.get("/_double/state", self.helper_state),
        ]

    @staticmethod
    async def _fields(request: web.Request) -> dict[str, str]:
        form = await request.post()
        fields = {k: v for k, v in request.query.items()}
        fields.update({k: v for k, v in form.items() if isinstance(v, str)})
        return fields

    @staticmethod
    def _reply(fields: dict[str, str], data: Any) -> web.Response:
        if "next" in fields:
            raise web.HTTPSeeOther(local_redirect(fields["next"], "/"))
        return web.json_response(data)

    async def helper_advance(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        try:
            seconds = int(fields.get("seconds", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="seconds must be an integer") from None
        await self.double.advance_time(seconds)
        return self._reply(fields, {"now": self.double.now()})

    async def helper_status(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        extra: dict[str, Any] = {}
        if "cancel_at_period_end" in fields:
            extra["cancel_at_period_end"] = fields["cancel_at_period_end"] == "true"
        try:
            sub = await self.double.set_status(
                request.match_info["id"], fields.get("status", ""), **extra
            )
        except ApiError as exc:
            return web.json_response(exc.body(), status=exc.status)
        except ValueError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        return self._reply(fields, sub)

    async def helper_faults(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        faults = self.double.faults
        try:
            if fields.get("reset"):
                faults.reset()
            if "latency" in fields:
                faults.latency = float(fields["latency"])
            status = int(fields.get("status", "500"))
            if "fail_next" in fields:
                faults.fail_next(int(fields["fail_next"]), status)
            if "drop_next" in fields:
                faults.drop_next(int(fields["drop_next"]))
            if fields.get("fail_always"):
                faults.fail_always(status)
            if fields.get("drop_always"):
                faults.drop_always()
        except ValueError:
            raise web.HTTPBadRequest(
                text="latency: seconds; fail_next, drop_next, status: integers"
            ) from None
        return self._reply(fields, faults.snapshot())

    async def helper_webhooks(self, request: web.Request) -> web.Response:
        """Add (``url=``) or drop (``remove=``) a webhook endpoint: another gate pointed at
        this double (``STRIPE_API_BASE``) gets its events too."""
        fields = await self._fields(request)
        urls = self.double.webhook_urls
        for key in ("url", "remove"):
            value = fields.get(key, "")
            if value and not value.startswith(("http://", "https://")):
                raise web.HTTPBadRequest(text=f"{key}: an http:// or https:// URL")
        if fields.get("url") and fields["url"] not in urls:
            urls.append(fields["url"])
        if fields.get("remove") in urls:
            urls.remove(fields["remove"])
        return self._reply(fields, {"webhook_urls": urls})

    async def helper_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.double.state(), dumps=lambda d: json.dumps(d, indent=1))

    async def index(self, request: web.Request) -> web.Response:
        rows = "".join(
            f"<tr><td>{esc(s['id'])}</td><td>{esc(s['customer'])}</td>"
            f"<td>{esc(s['status'])}</td><td>{esc(when(s))}</td><td>"
            f'<form method="post" action="/_double/subscriptions/{esc(s["id"])}/status">'
            f'<input type="hidden" name="next" value="/"><select name="status">'
            + "".join(
                f"<option{' selected' if st == s['status'] else ''}>{st}</option>"
                for st in objects.SUBSCRIPTION_STATUSES
            )
            + '</select> <button type="submit">Set</button></form></td></tr>'
            for s in reversed(self.double.subscriptions.values())
        )
        advance = "".join(
            f'<form method="post" action="/_double/advance"><input type="hidden" '
            f'name="next" value="/"><input type="hidden" name="seconds" value="{sec}">'
            f'<button type="submit">+{label}</button></form>'
            for sec, label in ((3600, "1 hour"), (86_400, "1 day"), (32 * 86_400, "32 days"))
        )
        body = (
            f"<h1>Stripe test double</h1><p>Clock: {esc(day(self.double.now()))} "
            f"({self.double.now()})</p><p>{advance}</p>"
            f"<h2>Subscriptions</h2><table><tr><th>id</th><th>customer</th><th>status</th>"
            f"<th>period</th><th></th></tr>{rows}</table>"
            f'<h2>Faults</h2><form method="post" action="/_double/faults">'
            f'<input type="hidden" name="next" value="/">latency s <input name="latency" '
            f'value="{esc(self.double.faults.latency)}" size="4"> fail next <input '
            f'name="fail_next" value="0" size="3"> with <input name="status" value="500"'
            f' size="4"> <button type="submit">Apply</button></form>'
            f'<form method="post" action="/_double/faults"><input type="hidden" '
            f'name="next" value="/"><input type="hidden" name="reset" value="1">'
            f'<button type="submit">Reset faults</button></form>'
            f'<p><a href="/_double/state">State (JSON)</a> · {len(self.double.events)} events,'
            f" {len(self.double.deliveries)} deliveries</p>"
        )
        return page("Stripe test double", body)
