"""The gate's own pages under ``GATE_PREFIX``, one module per concern:

- :mod:`~gateway.pages.checkout`: landing (``subscribe``), ``checkout``, ``success``, ``portal``;
- :mod:`~gateway.pages.signin`: ``login``, ``login/verify``, ``logout``;
- :mod:`~gateway.pages.account`: ``account`` and ``api/me`` (and their billing-off answers);
- :mod:`~gateway.pages.common`: what they share (templates with CSRF, checked forms).

The account facts themselves are :mod:`gateway.accounts`; every error page and JSON error is
:mod:`gateway.responses`. A bug or an unexpected failure in a handler becomes a friendly page
(:func:`friendly_errors`), never a traceback.
"""

import functools
import logging

from aiohttp import web

from gateway.apikeys.pages import ROUTES as API_KEY_ROUTES
from gateway.logs import log_event
from gateway.pages.account import account, api_me, billing_disabled, logout_everywhere
from gateway.pages.checkout import checkout, portal, subscribe, success
from gateway.pages.common import CSRF_KEY, Handler
from gateway.pages.signin import login_form, login_submit, login_verify, login_verify_form, logout
from gateway.pages.upgrade import upgrade
from gateway.responses import error_page
from gateway.services import SETTINGS
from gateway.settings import Settings
from gateway.store import StoreError
from gateway.teams.pages import TEAM_ROUTES

__all__ = ["CSRF_KEY", "add_routes", "friendly_errors"]

log = logging.getLogger("gateway.pages")


def friendly_errors(handler: Handler) -> Handler:
    """A bug or an unexpected failure (store, mail) in a page handler becomes a friendly
    page or JSON, logged with its traceback for the operator, never shown to the user."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except StoreError as exc:
            # The disk is full, the database read-only or gone: nothing the user did. A 503
            # with Retry-After, so browsers and scripts come back (readyz says so, too).
            log_event(
                log, "page_store_failed", level=logging.ERROR, path=request.path, error=str(exc)
            )
            return _failure_page(
                request,
                "store_unavailable",
                "Temporarily unavailable",
                "The gate cannot save anything right now. Please try again in a moment.",
                503,
            )
        except Exception:
            log.exception("page_failed path=%s", request.path)
            return _failure_page(
                request,
                "internal_error",
                "Something went wrong",
                "The page could not be shown. Please try again in a moment.",
                500,
            )

    return wrapper


def _failure_page(
    request: web.Request, code: str, title: str, message: str, status: int
) -> web.StreamResponse:
    """The page for a failure of the gate itself; a GET offers to try the same URL again."""
    return error_page(
        request,
        request.app[SETTINGS],
        code,
        title,
        message,
        status=status,
        retry_url=request.path_qs if request.method == "GET" else None,
    )


def add_routes(app: web.Application, settings: Settings) -> None:
    """Register the pages (with billing off: only the ones that say so)."""
    p = settings.gate_prefix
    if not settings.billing_enabled:
        for path in ("subscribe", "account", "login"):
            app.router.add_get(f"{p}/{path}", billing_disabled)
        app.router.add_get(f"{p}/api/me", billing_disabled)
        return
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "subscribe", subscribe),
        ("POST", "checkout", checkout),
        ("GET", "success", success),
        ("POST", "portal", portal),
        ("GET", "account", account),
        ("GET", "upgrade", upgrade),
        ("GET", "api/me", api_me),
        ("GET", "login", login_form),
        ("POST", "login", login_submit),
        ("GET", "login/verify", login_verify_form),
        ("POST", "login/verify", login_verify),
        ("POST", "logout", logout),
        ("POST", "logout/everywhere", logout_everywhere),
        *API_KEY_ROUTES,
    ]
    if settings.seat_price_ids:
        routes.extend(TEAM_ROUTES)
    for method, path, handler in routes:
        app.router.add_route(method, f"{p}/{path}", friendly_errors(handler))
