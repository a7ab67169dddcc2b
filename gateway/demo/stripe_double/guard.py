"""The HTTP edge of the Stripe test double's API: fault injection, API-key check, idempotency.

:class:`ApiGuard` is the middleware in front of every ``/v1`` call. In order: the call is
recorded in ``calls``; ``Faults`` may add latency, drop the connection or answer an error;
the ``Authorization`` key is checked (Bearer, or Basic with the key as user name, like Stripe);
a POST with an ``Idempotency-Key`` seen before replays the saved answer (same key with other
parameters: 400 ``idempotency_error``; while the first is still running: 409). Unknown
``/v1`` URLs answer Stripe's "Unrecognized request URL" 404.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from gateway.demo.stripe_double import objects
from gateway.demo.stripe_double.form import REQUEST_ID, ApiError

__all__ = [
    "IDEMPOTENCY_KEYS_KEPT",
    "ApiGuard",
    "Faults",
    "GuardedOwner",
    "Handler",
    "fault_error",
    "redact_key",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IDEMPOTENCY_KEYS_KEPT = 10_000  # stripe-python sends a fresh key with every POST


class Faults:
    """Fault injection for ``/v1`` API calls: added latency, error answers, dropped connections.

    Each API call consumes at most one queued fault; drops are served before failures.
    """

    def __init__(self) -> None:
        self.latency: float = 0.0
        #: While it is an Event not yet set, every API call waits for it (after being recorded
        #: in ``calls``): a test holds a request in flight.
        self.hold: asyncio.Event | None = None
        self._fail_count = 0
        self._fail_status = 500
        self._drop_count = 0
        self._always_status: int | None = None
        self._always_drop = False

    def fail_next(self, n: int, status: int = 500) -> None:
        """The next ``n`` API calls answer ``status`` (500: api_error, 429: rate_limit)."""
        self._fail_count, self._fail_status = n, status

    def drop_next(self, n: int) -> None:
        """The next ``n`` API calls get their connection closed without an answer."""
        self._drop_count = n

    def fail_always(self, status: int = 500) -> None:
        self._always_status = status

    def drop_always(self) -> None:
        self._always_drop = True

    def reset(self) -> None:
        """No faults, no latency, no hold."""
        self.latency = 0.0
        self.hold = None
        self._fail_count, self._fail_status, self._drop_count = 0, 500, 0
        self._always_status, self._always_drop = None, False

    def take(self) -> int | None:
        """The fault for the current call: 0 to drop, an HTTP status to fail, None for none."""
        if self._always_drop:
            return 0
        if self._drop_count > 0:
            self._drop_count -= 1
            return 0
        if self._always_status is not None:
            return self._always_status
        if self._fail_count > 0:
            self._fail_count -= 1
            return self._fail_status
        return None

    def snapshot(self) -> dict[str, Any]:
        return {
            "latency": self.latency,
            "fail_next": self._fail_count,
            "fail_status": self._fail_status,
            "drop_next": self._drop_count,
            "fail_always": self._always_status,
            "drop_always": self._always_drop,
        }


def fault_error(status: int) -> ApiError:
    if status == 429:
        return ApiError(
            429,
            "Request rate limit exceeded. (fault injected by the test double)",
            type_="invalid_request_error",
            code="rate_limit",
        )
    return ApiError(
        status, "An unknown error occurred (fault injected by the test double).", type_="api_error"
    )


def redact_key(key: str) -> str:
    """``sk_test_****************abcd``, as Stripe shows a wrong key."""
    prefix = key[: key.rfind("_") + 1] if "_" in key else ""
    tail = key[-4:] if len(key) > len(prefix) + 4 else ""
    return prefix + "*" * max(len(key) - len(prefix) - len(tail), 0) + tail


@dataclass
class _Saved:
    fingerprint: tuple[str, bytes]
    status: int
    body: bytes


class GuardedOwner(Protocol):
    """What the guard reads from the double, at every call (tests may swap them)."""

    api_key: str
    faults: Faults
    calls: list[tuple[str, str]]


class ApiGuard:
    """The ``/v1`` middleware of a double."""

    def __init__(self, owner: GuardedOwner) -> None:
        self.owner = owner
        self._idempotency: dict[str, _Saved] = {}
        self._in_flight: set[str] = set()

    @staticmethod
    def error_response(exc: ApiError) -> web.Response:
        return web.json_response(
            exc.body(), status=exc.status, headers={"Request-Id": objects.new_id("req_", 14)}
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Faults, then authentication, then idempotency, for ``/v1`` paths only."""
        if not request.path.startswith("/v1/"):
            return await handler(request)
        self.owner.calls.append((request.method, request.path))
        if self.owner.faults.latency > 0:
            await asyncio.sleep(self.owner.faults.latency)
        hold = self.owner.faults.hold
        if hold is not None:
            await hold.wait()
        fault = self.owner.faults.take()
        if fault == 0:
            self._drop(request)
            return web.Response(status=500)  # never reaches the client
        if fault is not None:
            return self.error_response(fault_error(fault))
        request_id = objects.new_id("req_", 14)
        request[REQUEST_ID] = request_id
        try:
            self._authenticate(request)
            response = await self._idempotent(request, handler)
        except ApiError as exc:
            return self.error_response(exc)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return self.error_response(
                ApiError(
                    404,
                    f"Unrecognized request URL ({request.method}: {request.path}). Please see "
                    "https://stripe.com/docs or we can help at https://support.stripe.com/.",
                )
            )
        response.headers["Request-Id"] = request_id
        response.headers["Stripe-Version"] = objects.API_VERSION
        return response

    @staticmethod
    def _drop(request: web.Request) -> None:
        """Break the connection without an HTTP answer.

        A bare close would be invisible for GET/DELETE: aiohttp's client re-sends idempotent
        requests once on a fresh connection when the server disconnects. A line that is not an
        HTTP status line before the close makes every client fail the call at once (stripe:
        ``APIConnectionError``), so one dropped call is exactly one failed call.
        """
        transport = request.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"DROPPED\r\n\r\n")
            transport.close()

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = credentials.strip()
        elif scheme.lower() == "basic":
            with contextlib.suppress(ValueError):
                key = base64.b64decode(credentials).decode().partition(":")[0]
        if not key:
            raise ApiError(
                401,
                "You did not provide an API key. You need to provide your API "
                "key in the Authorization header, using Bearer auth (e.g. "
                "'Authorization: Bearer YOUR_SECRET_KEY').",
            )
        if not hmac.compare_digest(key.encode(), self.owner.api_key.encode()):
            raise ApiError(401, f"Invalid API Key provided: {redact_key(key)}")

    async def _idempotent(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key")
        if request.method != "POST" or not key:
            return await handler(request)
        if len(key) > 255:
            raise ApiError(400, "Idempotency-Key must be at most 255 characters long.")
        fingerprint = (request.path, await request.read())
        saved = self._idempotency.get(key)
        if saved is not None:
            if saved.fingerprint != fingerprint:
                raise ApiError(
                    400,
                    "Keys for idempotent requests can only be used with the "
                    "same parameters they were first used with. Try using a key "
                    f"other than '{key}' if you meant to execute a different "
                    "request.",
                    type_="idempotency_error",
                )
            return web.Response(
                body=saved.body,
                status=saved.status,
                content_type="application/json",
                headers={"Idempotent-Replayed": "true", "Original-Request": request[REQUEST_ID]},
            )
        if key in self._in_flight:
            raise ApiError(
                409,
                "There is currently another in-progress request using this "
                "Idempotent Key (that probably means you submitted twice, and the "
                "other request is still going through).",
                code="idempotency_key_in_use",
            )
        self._in_flight.add(key)
        try:
            response = await handler(request)
        finally:
            self._in_flight.discard(key)
        if isinstance(response, web.Response) and isinstance(response.body, bytes):
            self._idempotency[key] = _Saved(fingerprint, response.status, response.body)
            while len(self._idempotency) > IDEMPOTENCY_KEYS_KEPT:
                del self._idempotency[next(iter(self._idempotency))]
        return response
